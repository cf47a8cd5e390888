"""A one-minute look at the model: a T5.1.1 (tiny by default) as MHA, GQA-2, MQA; forward + decode.

  gqa-t5x-demo [--gin_file=models/t5_1_1/small.gin] [--kv_heads=8,2,1]

Prints the parameter count, decoder KV-cache bytes per token, the teacher-forced loss and the
greedy outputs of each attention kind (random weights: the point is the mechanics, not the text).
"""
import time

from absl import flags
import jax
import jax.numpy as jnp
import numpy as np

from gqa_t5x import cli
from gqa_t5x import common_flags
from gqa_t5x import gin_utils
from gqa_t5x.decoding import greedy_decode
from gqa_t5x.network import T5Config, Transformer

DEFAULT_GIN_FILE = 'models/t5_1_1/tiny.gin'
_DECODE_LENGTH = flags.DEFINE_integer('decode_length', 16, 'Greedy decode length.', lower_bound=1)
_GIN, _KV_HEADS = common_flags.gin(), common_flags.kv_heads()


def model_config(kv_heads: int) -> T5Config:
  """The T5Config of the gin flags (default: tiny.gin), with NUM_KV_HEADS = kv_heads."""
  return gin_utils.model_config(_GIN.files.value or [DEFAULT_GIN_FILE],
                                [*_GIN.bindings.value, f'NUM_KV_HEADS = {kv_heads}'],
                                _GIN.search_paths.value)


def kv_cache_bytes_per_token(cfg: T5Config, bytes_per_value: int = 4) -> int:
  """Decoder self-attention K and V bytes cached per generated token, over all layers."""
  return 2 * cfg.num_decoder_layers * cfg.decoder_self_kv_heads * cfg.head_dim * bytes_per_value


def _main(argv):
  cli.no_positional_arguments(argv)
  num_heads = model_config(1).num_heads
  kv_head_counts = common_flags.checked_kv_heads(num_heads, _KV_HEADS.value or [num_heads, 2, 1])
  rng = np.random.default_rng(0)
  print(f'jax {jax.__version__} on {jax.devices()[0].platform}; '
        f'{" ".join(_GIN.files.value or [DEFAULT_GIN_FILE])}, batch 4, input 32 tokens')
  for kv_heads in kv_head_counts:
    cfg = model_config(kv_heads)
    inputs = jnp.asarray(rng.integers(2, cfg.vocab_size, size=(4, 32)), jnp.int32)
    targets = jnp.asarray(rng.integers(2, cfg.vocab_size, size=(4, _DECODE_LENGTH.value)),
                          jnp.int32)
    decoder_inputs = jnp.pad(targets[:, :-1], ((0, 0), (1, 0)))
    model = Transformer(cfg)
    params = jax.jit(model.init)(jax.random.PRNGKey(0), inputs, decoder_inputs, targets)['params']
    logits = jax.jit(lambda p: model.apply({'params': p}, inputs, decoder_inputs, targets,
                                           enable_dropout=False))(params)
    loss = -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits), targets[..., None], -1))
    greedy_decode(model, params, inputs, _DECODE_LENGTH.value, eos_id=1).block_until_ready()
    start = time.perf_counter()
    outputs = greedy_decode(model, params, inputs, _DECODE_LENGTH.value, eos_id=1)
    outputs.block_until_ready()
    seconds = time.perf_counter() - start
    kind = 'MHA' if kv_heads == cfg.num_heads else 'MQA' if kv_heads == 1 else f'GQA-{kv_heads}'
    count = sum(x.size for x in jax.tree.leaves(params))
    cache_bytes = kv_cache_bytes_per_token(cfg, jnp.dtype(cfg.dtype).itemsize)
    print(f'{kind:>6}: {count:,} params, KV cache {cache_bytes} B/token, '
          f'loss {float(loss):.3f}, greedy decode {seconds * 1e3:.1f} ms, '
          f'first output {np.asarray(outputs[0, :8]).tolist()}')


def main(argv=None):
  cli.run('gqa-t5x-demo', _main, __doc__, argv)


if __name__ == '__main__':
  main()
