"""The whole greedy decode: gqa_t5x.decoding.greedy_decode on a Transformer with random weights.

Why: the attention step is only part of a decoder step (MLP and logits weights are read too) and
the encoder runs once per sample; this is the time a user waits, the paper's "time per sample".
"""
import jax
import jax.numpy as jnp

from gqa_t5x import huge_pages
from gqa_t5x.benchmark import random_state
from gqa_t5x.benchmark.roofline import Geometry
from gqa_t5x.decoding import greedy_decode
from gqa_t5x.network import T5Config, Transformer

# argmax never returns -1, so every row decodes exactly output_length tokens for every G.
NEVER_EOS = -1


def model_config(g: Geometry, num_encoder_layers: int, dtype,
                 cpu_kernels: bool = True) -> T5Config:
  """T5.1.1 with the geometry's sizes; GQA (G = kv_heads) in decoder self- and cross-attention."""
  return T5Config(
      vocab_size=g.vocab_size, dtype=dtype, emb_dim=g.emb_dim, num_heads=g.num_heads,
      num_encoder_layers=num_encoder_layers, num_decoder_layers=g.num_decoder_layers,
      head_dim=g.head_dim, mlp_dim=g.mlp_dim, dropout_rate=0.0,
      num_decoder_self_kv_heads=g.kv_heads, num_decoder_cross_kv_heads=g.kv_heads,
      cpu_decode_kernels=cpu_kernels)


def random_inputs(g: Geometry, seed: int) -> jax.Array:
  """[b, s] token ids in [2, vocab): no padding (0) and no EOS (1)."""
  return jax.random.randint(jax.random.key(seed), (g.batch, g.input_length), 2, g.vocab_size,
                            jnp.int32)


def build(g: Geometry, num_encoder_layers: int, dtype, seed: int = 0, cpu_kernels: bool = True,
          weights_on_huge_pages: bool = True):
  """Returns (run, peak_bytes): run() greedy-decodes one batch of output_length tokens, blocking.

  Weights are stored in the compute dtype (as for serving), not T5X's float32 training params,
  and moved onto huge pages (gqa_t5x.huge_pages) unless weights_on_huge_pages=False, as
  gqa_t5x.predicting does. cpu_kernels=False keeps XLA's einsums where gqa_t5x.cpu_kernels would
  run.
  """
  model = Transformer(model_config(g, num_encoder_layers, dtype, cpu_kernels))
  tokens = random_inputs(g, seed)
  targets = jnp.ones((g.batch, g.output_length), jnp.int32)
  shapes = jax.eval_shape(lambda: model.init(jax.random.key(seed), tokens, targets, targets))
  params = random_state.random_tree(shapes['params'], seed, dtype)
  if weights_on_huge_pages:
    huge_pages.apply(params)
  compiled = greedy_decode.lower(model, params, tokens, max_decode_length=g.output_length,
                                 eos_id=NEVER_EOS).compile()
  return (lambda: compiled(params, tokens).block_until_ready(),
          random_state.peak_bytes(compiled))
