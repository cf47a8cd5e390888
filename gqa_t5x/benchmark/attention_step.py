"""The attention decode step alone: self-attention over the cache, then cross-attention over the
cached encoder keys/values, for one decoder layer (GroupedQueryAttention with decode=True).

Why: this is the part of a decoder step that GQA changes; timing it alone against its byte floor
shows whether the grouped einsums stream the cache at full bandwidth for every G.
"""
import jax
import jax.numpy as jnp

from gqa_t5x import huge_pages
from gqa_t5x.attention import GroupedQueryAttention
from gqa_t5x.benchmark import random_state
from gqa_t5x.benchmark.roofline import Geometry


def build(g: Geometry, dtype, seed: int = 0, weights_on_huge_pages: bool = True):
  """Returns (run, peak_bytes): run() times one step at the last output position, blocking.

  The self-attention cache holds output_length positions (the step writes the last one); the
  cross-attention cache is already projected (cache_index 1), as after a decode's prefill.
  The weights (not the caches, a decode's temporaries) go onto huge pages as in decode.build.
  """
  attention = lambda cross: GroupedQueryAttention(
      g.num_heads, g.kv_heads, g.head_dim, cross_attention=cross, dtype=dtype)
  self_attention, cross_attention = attention(False), attention(True)
  x = jnp.ones((g.batch, 1, g.emb_dim), dtype)  # [b, 1, e]: the decoded position
  encoded = jnp.ones((g.batch, g.input_length, g.emb_dim), dtype)  # [b, s, e]
  full = jax.ShapeDtypeStruct((g.batch, g.output_length, g.emb_dim), dtype)  # cache creation
  key = jax.random.key(seed)
  shapes = {
      'self': jax.eval_shape(lambda f: self_attention.init(key, f, f, decode=True), full),
      'cross': jax.eval_shape(lambda: cross_attention.init(key, x, encoded, decode=True)),
  }
  variables = {
      name: {'params': random_state.random_tree(s['params'], seed + i, dtype),
             'cache': random_state.filled_cache(s['cache'], seed + 10 + i, dtype, index)}
      for i, (name, s, index) in enumerate(
          (('self', shapes['self'], g.output_length - 1), ('cross', shapes['cross'], 1)))}
  if weights_on_huge_pages:
    huge_pages.apply([v['params'] for v in variables.values()])

  def step(variables, x):  # -> [b, 1, e]; cross-attention reads its cache, as greedy_decode does
    y, _ = self_attention.apply(variables['self'], x, x, decode=True, mutable=['cache'])
    z, _ = cross_attention.apply(variables['cross'], y, None, decode=True, mutable=['cache'])
    return z

  compiled = jax.jit(step).lower(variables, x).compile()
  return (lambda: compiled(variables, x).block_until_ready(), random_state.peak_bytes(compiled))
