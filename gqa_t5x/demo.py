"""A one-minute look at the model: a T5.1.1 (tiny by default) as MHA, GQA-2, MQA; forward + decode.

  python -m gqa_t5x.demo [--gin_file=models/t5_1_1/small.gin] [--kv_heads=8,2,1]

Prints the parameter count, decoder KV-cache bytes per token, the teacher-forced loss and the
greedy outputs of each attention kind (random weights: the point is the mechanics, not the text).
"""
import time

from absl import app
from absl import flags
import jax
import jax.numpy as jnp
import numpy as np

from gqa_t5x import common_flags
from gqa_t5x import gin_utils
from gqa_t5x.decoding import greedy_decode
from gqa_t5x.network import T5Config, Transformer

_DECODE_LENGTH = flags.DEFINE_integer('decode_length', 16, 'Greedy decode length.')


def model_config(gin_file: str, kv_heads: int) -> T5Config:
  """The T5Config a model gin file binds, with NUM_KV_HEADS = kv_heads."""
  return gin_utils.model_config([gin_file], [f'NUM_KV_HEADS = {kv_heads}'])


def kv_cache_bytes_per_token(cfg: T5Config, bytes_per_value: int = 4) -> int:
  """Decoder self-attention K and V bytes cached per generated token, over all layers."""
  return 2 * cfg.num_decoder_layers * cfg.decoder_self_kv_heads * cfg.head_dim * bytes_per_value


def main(argv):
  del argv
  rng = np.random.default_rng(0)
  gin_file = (common_flags.GIN_FILES.value or ['models/t5_1_1/tiny.gin'])[0]
  print(f'jax {jax.__version__} on {jax.devices()[0].platform}; {gin_file}, batch 4, '
        f'input 32 tokens')
  for kv_heads in map(int, common_flags.KV_HEADS.value or ['8', '2', '1']):
    cfg = model_config(gin_file, kv_heads)
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


if __name__ == '__main__':
  app.run(main)
