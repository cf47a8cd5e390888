"""GroupedQueryAttention against an independent per-head numpy reference."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gqa_t5x import cpu_kernels
from gqa_t5x.attention import GroupedQueryAttention
from tests import reference

H, D, E = 8, 4, 16


def _inputs(seed=0, b=2, t=5, s=7):
  rng = np.random.default_rng(seed)
  x_q = rng.normal(size=(b, t, E)).astype(np.float32)
  x_kv = rng.normal(size=(b, s, E)).astype(np.float32)
  mask = (rng.random((b, 1, t, s)) > 0.3).astype(np.float32)
  mask[..., 0] = 1  # every query attends somewhere
  bias = rng.normal(size=(1, H, t, s)).astype(np.float32)
  return x_q, x_kv, mask, bias


def _kernels(params):
  return [np.asarray(params[n]['kernel'], np.float64) for n in ('query', 'key', 'value', 'out')]


@pytest.mark.parametrize('num_kv_heads', [1, 2, 4, 8])
def test_gqa_equals_mha_reference_with_repeated_kv_heads(num_kv_heads):
  x_q, x_kv, mask, bias = _inputs()
  layer = GroupedQueryAttention(H, num_kv_heads, D)
  params = layer.init(jax.random.PRNGKey(num_kv_heads), x_q, x_kv)['params']
  wq, wk, wv, wo = _kernels(params)
  assert wk.shape == wv.shape == (E, num_kv_heads * D)

  got = layer.apply({'params': params}, x_q, x_kv, mask, bias)
  want = reference.mha(x_q, x_kv, wq, reference.repeat_kv_kernel(wk, H, num_kv_heads, D),
                       reference.repeat_kv_kernel(wv, H, num_kv_heads, D), wo, H, D, mask, bias)
  np.testing.assert_allclose(got, want, rtol=2e-5, atol=2e-5)


def test_g_equals_h_is_plain_mha():
  x_q, x_kv, mask, bias = _inputs(seed=1)
  layer = GroupedQueryAttention(H, H, D)
  params = layer.init(jax.random.PRNGKey(0), x_q, x_kv)['params']
  got = layer.apply({'params': params}, x_q, x_kv, mask, bias)
  np.testing.assert_allclose(got, reference.mha(x_q, x_kv, *_kernels(params), H, D, mask, bias),
                             rtol=2e-5, atol=2e-5)


def test_query_kernel_init_is_scaled_by_head_dim():
  x = jnp.ones((1, 1, 256))
  params = GroupedQueryAttention(4, 4, 64).init(jax.random.PRNGKey(0), x, x)['params']
  # fan_in normal init: std 1/sqrt(256) for key; query additionally / sqrt(64).
  assert np.std(params['key']['kernel']) == pytest.approx(1 / 16, rel=0.05)
  assert np.std(params['query']['kernel']) == pytest.approx(1 / 16 / 8, rel=0.05)


@pytest.mark.parametrize('num_kv_heads', [0, 3, 5, 16])
def test_kv_heads_that_do_not_divide_heads_are_rejected_with_valid_values(num_kv_heads):
  x = jnp.ones((1, 2, E))
  with pytest.raises(ValueError, match=r'valid values: 1, 2, 4, 8'):
    GroupedQueryAttention(H, num_kv_heads, D).init(jax.random.PRNGKey(0), x, x)


def test_mismatched_embed_dims_are_rejected():
  with pytest.raises(ValueError, match='embed dimension'):
    GroupedQueryAttention(H, 2, D).init(jax.random.PRNGKey(0), jnp.ones((1, 2, E)),
                                        jnp.ones((1, 3, E + 1)))


def _decode_steps(layer, params, x, bias=None):
  """Runs the cached self-attention one position at a time; returns outputs and the cache."""
  _, state = layer.apply({'params': params}, x, x, decode=True, mutable=['cache'])
  cache = jax.tree.map(jnp.zeros_like, state['cache'])
  outputs = []
  for i in range(x.shape[1]):
    row_bias = None if bias is None else bias[:, :, i:i + 1]
    out, state = layer.apply({'params': params, 'cache': cache}, x[:, i:i + 1], x[:, i:i + 1],
                             None, row_bias, decode=True, mutable=['cache'])
    cache = state['cache']
    outputs.append(out)
  return jnp.concatenate(outputs, axis=1), cache


@pytest.mark.parametrize('num_kv_heads', [1, 2, 8])
def test_self_attention_cache_holds_g_heads_and_matches_causal_reference(num_kv_heads):
  b, t = 2, 6
  x = np.random.default_rng(2).normal(size=(b, t, E)).astype(np.float32)
  bias = np.random.default_rng(3).normal(size=(1, H, t, t)).astype(np.float32)
  layer = GroupedQueryAttention(H, num_kv_heads, D)
  params = layer.init(jax.random.PRNGKey(0), x, x)['params']
  got, cache = _decode_steps(layer, params, x, bias)

  assert cache['cached_key'].shape == (b, num_kv_heads, D, t)  # [batch, G, head_dim, length]
  assert cache['cached_value'].shape == (b, num_kv_heads, D, t)
  assert int(cache['cache_index']) == t
  wq, wk, wv, wo = _kernels(params)
  causal = np.tril(np.ones((t, t)))[None, None]
  want = reference.mha(x, x, wq, reference.repeat_kv_kernel(wk, H, num_kv_heads, D),
                       reference.repeat_kv_kernel(wv, H, num_kv_heads, D), wo, H, D,
                       causal, bias)
  np.testing.assert_allclose(got, want, rtol=2e-5, atol=2e-5)


# The cache fill takes one of two routes by its width k * d (attention._JOINED_CACHE_FILL): 2 x 4
# key columns are projected with the value columns in one product, 2 x 72 in one product each.
@pytest.mark.parametrize('d', [D, 72], ids=['keys-and-values-joined', 'keys-and-values-apart'])
def test_cross_attention_projects_encoder_once_and_reuses_the_cache(d):
  x_q, x_kv, _, _ = _inputs(seed=4, b=2, t=1, s=7)
  layer = GroupedQueryAttention(H, 2, d, cross_attention=True)
  params = layer.init(jax.random.PRNGKey(0), x_q, x_kv)['params']
  _, state = layer.apply({'params': params}, x_q, x_kv, decode=True, mutable=['cache'])
  cache = jax.tree.map(jnp.zeros_like, state['cache'])
  first, state = layer.apply({'params': params, 'cache': cache}, x_q, x_kv, decode=True,
                             mutable=['cache'])
  assert state['cache']['cached_key'].shape == (2, 2, d, 7)
  # Later steps must not re-project: different (here: zero) encoder inputs give the same result.
  again, _ = layer.apply({'params': params, 'cache': state['cache']}, x_q, jnp.zeros_like(x_kv),
                         decode=True, mutable=['cache'])
  np.testing.assert_allclose(again, first, rtol=1e-6)
  from_cache, _ = layer.apply({'params': params, 'cache': state['cache']}, x_q, None,
                              decode=True, mutable=['cache'])
  np.testing.assert_allclose(from_cache, first, rtol=1e-6)
  # Filled without a query (greedy decoding's prefill), the cache is the same and so is a step.
  nothing, filled = layer.apply({'params': params, 'cache': cache}, None, x_kv, decode=True,
                                mutable=['cache'])
  assert nothing is None and int(filled['cache']['cache_index']) == 1
  for name in ('cached_key', 'cached_value'):
    np.testing.assert_allclose(filled['cache'][name], state['cache'][name], rtol=1e-6, atol=1e-6)
  after_fill, _ = layer.apply({'params': params, 'cache': filled['cache']}, x_q, None,
                              decode=True, mutable=['cache'])
  np.testing.assert_allclose(after_fill, first, rtol=1e-5, atol=1e-6)
  wq, wk, wv, wo = _kernels(params)
  want = reference.mha(x_q, x_kv, wq, reference.repeat_kv_kernel(wk, H, 2, d),
                       reference.repeat_kv_kernel(wv, H, 2, d), wo, H, d)
  np.testing.assert_allclose(first, want, rtol=2e-5, atol=2e-5)
  # The first step fills the cache with the projected encoder output as [b, G, d, s]: column
  # head * d + dim of the kernel, moved by hand.
  for name, kernel in (('cached_key', wk), ('cached_value', wv)):
    projected = (x_kv @ kernel).reshape(2, 7, 2, d).transpose(0, 2, 3, 1)
    np.testing.assert_allclose(state['cache'][name], projected, rtol=1e-5, atol=1e-5)


def test_missing_inputs_kv_outside_cached_attention_is_a_clear_error():
  x = jnp.ones((1, 1, E))
  with pytest.raises(ValueError, match='only accepted by cached cross-attention'):
    GroupedQueryAttention(H, 2, D, cross_attention=True).init(jax.random.PRNGKey(0), x, None)


def test_filling_a_cache_without_a_query_outside_cached_attention_is_a_clear_error():
  _, x_kv, _, _ = _inputs(seed=4, b=2, t=1, s=7)
  for layer, cache in ((GroupedQueryAttention(H, 2, D, cross_attention=True), None),
                       (GroupedQueryAttention(H, 2, D), 'self-attention cache')):
    variables = layer.init(jax.random.PRNGKey(0), x_kv, x_kv)
    if cache:
      variables = {**variables, 'cache': layer.apply(variables, x_kv[:, :1], x_kv[:, :1],
                                                     decode=True, mutable=['cache'])[1]['cache']}
    with pytest.raises(ValueError, match='only accepted by cross-attention with decode=True'):
      layer.apply(variables, None, x_kv, decode=True, mutable=['cache'])


def _largest_intermediate(fn, *args):
  """The largest array any equation makes, in branches too (on CPU both the kernel's and the
  einsums' branch of cpu_kernels.on_cpu are traced)."""
  def sizes(jaxpr):
    for eqn in jaxpr.eqns:
      yield from (int(np.prod(v.aval.shape)) for v in eqn.outvars if hasattr(v.aval, 'shape'))
      for branch in eqn.params.get('branches', ()):
        yield from sizes(branch.jaxpr)
  return max(sizes(jax.make_jaxpr(fn)(*args).jaxpr))


@pytest.mark.parametrize('num_kv_heads', [1, 2])
def test_decode_step_never_materialises_kv_repeated_to_all_heads(num_kv_heads):
  b, length, e = 3, 64, 8  # small embed so no kernel is as large as repeated keys
  layer = GroupedQueryAttention(H, num_kv_heads, D)
  x = jnp.ones((b, length, e))
  params = layer.init(jax.random.PRNGKey(0), x, x)['params']
  _, state = layer.apply({'params': params}, x, x, decode=True, mutable=['cache'])
  step = lambda cache, xt: layer.apply({'params': params, 'cache': cache}, xt, xt, decode=True,
                                       mutable=['cache'])
  largest = _largest_intermediate(step, state['cache'], x[:, :1])
  # The largest arrays are the G-head cache [b, G, d, s] and the logits [b, G, H/G, 1, s]; keys or
  # values repeated to H heads would be [b, H, d, s].
  assert largest == max(b * num_kv_heads * D * length, b * H * length)
  assert largest < b * H * D * length


@pytest.mark.parametrize('cross', [False, True], ids=['self-attention', 'cross-attention'])
def test_a_decode_step_with_dropout_drops_in_the_einsums_and_without_runs_the_kernel(cross):
  x_q, x_kv, _, _ = _inputs(seed=6, b=2, t=1, s=9)
  layer = GroupedQueryAttention(H, 2, D, cross_attention=cross, dropout_rate=0.5)
  created = (x_q, x_kv) if cross else (x_kv, x_kv)  # self-attention: a cache of 9 positions
  params = layer.init(jax.random.PRNGKey(0), *created)['params']
  _, state = layer.apply({'params': params}, *created, decode=True, mutable=['cache'])
  filled = layer.apply({'params': params, 'cache': state['cache']}, *((None, x_kv) if cross else
                                                                       (x_q, x_q)),
                       decode=True, mutable=['cache'])[1]['cache']
  inputs_kv = None if cross else x_q

  def step(deterministic):
    return jax.jit(lambda c, x: layer.apply(
        {'params': params, 'cache': c}, x, inputs_kv, decode=True, mutable=['cache'],
        deterministic=deterministic, rngs={'dropout': jax.random.PRNGKey(1)})[0])

  kernel = cpu_kernels.ATTENTION_TARGET
  assert (kernel in step(True).lower(filled, x_q).compile().as_text()) == cpu_kernels.available()
  assert kernel not in step(False).lower(filled, x_q).compile().as_text()
  kept, dropped = step(True)(filled, x_q), step(False)(filled, x_q)
  assert np.abs(np.asarray(kept) - np.asarray(dropped)).max() > 1e-3


def test_dropout_mask_is_shared_across_queries_and_drawn_per_key():
  # T5X drops attention probabilities with one mask per (batch, head, key) for all queries.
  x_q, x_kv, _, _ = _inputs(seed=5, b=2, t=6, s=40)
  layer = GroupedQueryAttention(H, 2, D, dropout_rate=0.5)
  params = layer.init(jax.random.PRNGKey(0), x_q, x_kv)['params']
  seen = []

  def record(next_fun, args, kwargs, context):
    out = next_fun(*args, **kwargs)
    if isinstance(context.module, nn.Dropout):
      seen.append((np.asarray(args[0]), np.asarray(out)))
    return out

  with nn.intercept_methods(record):
    layer.apply({'params': params}, x_q, x_kv, deterministic=False,
                rngs={'dropout': jax.random.PRNGKey(1)})
  (probs, dropped), = seen
  assert probs.shape == (2, 2, H // 2, 6, 40)  # [b, k, g, t, s]
  kept = dropped != 0
  np.testing.assert_allclose(dropped[kept], probs[kept] * 2, rtol=1e-6)  # kept ones scaled 1/0.5
  assert (kept == kept[:, :, :, :1, :]).all()  # every query position sees the same mask
  per_key = kept[:, :, :, 0, :]
  assert 0.3 < per_key.mean() < 0.7  # about half the keys kept, drawn independently...
  assert (per_key != per_key[..., :1]).any(axis=-1).all()  # ...so each row mixes kept and dropped
  assert (per_key[0] != per_key[1]).any()  # and rows differ across the batch
