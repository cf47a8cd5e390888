"""Grouped-query attention (GQA): H query heads share G key/value heads in contiguous groups.

One module covers MHA (G = H), GQA-G and MQA (G = 1). Query head h reads key/value head
h // (H / G). Keys and values are never repeated up to H heads: the H query heads are viewed as
[G, H/G] and contracted against the G key/value heads directly.

Shape legend (MaxText style): b batch, t query length, s key length, e embed, k kv heads (G),
g query heads per kv head (H/G), d head dim.

Cached keys and values are stored [b, k, d, s] (T5X's [batch, heads, head_dim, length], batch-major
as T5X's beam search expects). With s last, each decode step is one [g, d] x [d, s] product per
(batch, kv head) that streams the cache once; a [b, k, s, d] cache runs several times slower for
GQA on CPU (see shared performance notes and the decode benchmark).
"""
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from gqa_t5x import axes
from gqa_t5x import cpu_kernels
from gqa_t5x.layers import Kernel, step_dense

Array = jax.Array
DType = Any

# T5X's attention kernel init; the query kernel is further divided by sqrt(head_dim) (T5 does not
# scale logits at run time).
attention_kernel_init = nn.initializers.variance_scaling(1.0, 'fan_in', 'normal')
NEG_INF = -1e10
# A cross-attention cache fill of at most this many key (and value) columns, k * d, projects keys
# and values as one product, twice as wide, reading the encoder output once. Measured on a 2-core
# Xeon (batch 16, input 2048, d_model 512, in chunks of 2 samples with the embedding and norm):
# 25.9 ms at k * d = 64 against 31.1 apart (and 29.2 as one [b*s, e] x [e, k*d] product per kernel
# moved into the cache layout), 43.9 against 48.0 at 128; 1-2% slower at 256 and 512, and 5% at
# 4096 (1355 against 1289 ms).
_JOINED_CACHE_FILL = 128


def check_kv_heads(num_heads: int, num_kv_heads: int, what: str = 'num_kv_heads') -> None:
  """Raises ValueError unless G divides H, listing the G that would be accepted."""
  if num_heads < 1 or num_kv_heads < 1 or num_heads % num_kv_heads:
    valid = ', '.join(str(g) for g in range(1, num_heads + 1) if num_heads % g == 0)
    raise ValueError(f'{what}={num_kv_heads} must divide num_heads={num_heads}; '
                     f'valid values: {valid}')


def grouped_attention(query: Array, keys: Array, values: Array, bias: Array | None,
                      dtype: DType, float32_logits: bool = False,
                      dropout: nn.Module | None = None, deterministic: bool = True) -> Array:
  """Softmax(q k^T + bias) v for grouped heads.

  query [b, t, k, g, d]; keys, values [b, k, d, s]; bias broadcastable to [b, k, g, t, s].
  Returns [b, t, k, g, d].
  """
  if float32_logits:
    query, keys = query.astype(jnp.float32), keys.astype(jnp.float32)
  # The query goes to [b, k, g, t, d] first: with t beside d each (b, k) is a plain [g, d] x [d, s]
  # product that XLA:CPU hands to its fast matmul; contracting [b, t, k, g, d] directly gives a
  # generic dot 4-7x slower at G = 8..32 (decode benchmark).
  logits = jnp.einsum('bkgtd,bkds->bkgts', jnp.moveaxis(query, 1, 3), keys)
  if bias is not None:
    logits = logits + bias.astype(logits.dtype)
  probs = jax.nn.softmax(logits.astype(jnp.float32)).astype(dtype)
  if dropout is not None:
    probs = dropout(probs, deterministic=deterministic)
  return jnp.einsum('bkgts,bkds->btkgd', probs, values.astype(dtype))


def cached_attention(query: Array, keys: Array, values: Array, bias: Array | None) -> Array:
  """grouped_attention for one float32 query position over a key/value cache: query
  [b, 1, k, g, d], keys and values [b, k, d, s], bias [b or 1, k or 1, g or 1, 1, s] (as
  mask_to_bias makes it) or None.

  Why: a decode step's cross-attention reads the whole cross-attention cache, the step's largest
  read, and its self-attention is a few small products that XLA:CPU runs as several ops. On CPU
  this runs gqa_t5x.cpu_kernels.attention, which streams keys and values once at close to
  the read bandwidth (the bias one row for all heads, or one per head); elsewhere,
  grouped_attention's einsums.
  """
  b, k, g, s = query.shape[0], query.shape[2], query.shape[3], keys.shape[-1]
  bias = jnp.zeros((b, 1, 1, 1, s), jnp.float32) if bias is None else bias.astype(jnp.float32)
  if bias.shape[1:4] == (1, 1, 1):
    flat = lambda bias: jnp.broadcast_to(bias[:, 0, 0, 0], (b, s))
  else:
    flat = lambda bias: jnp.broadcast_to(bias[:, :, :, 0], (b, k, g, s))
  kernel = lambda q, keys, values, bias: cpu_kernels.attention(
      q[:, 0], keys, values, flat(bias))[:, None]
  einsums = lambda q, keys, values, bias: grouped_attention(q, keys, values, bias, jnp.float32)
  return cpu_kernels.on_cpu(kernel, einsums, query, keys, values, bias)


def mask_to_bias(mask: Array | None, bias: Array | None, num_kv_heads: int) -> Array | None:
  """Combines a T5X mask [b, 1, t, s] (1 = attend) and bias [b|1, h, t, s] into [b, k, g, t, s]."""
  combined = None
  if mask is not None:
    combined = jnp.where(mask > 0, 0.0, NEG_INF)[:, :, None]  # [b, 1, 1, t, s]
  if bias is not None:
    b, h, t, s = bias.shape
    grouped = bias.reshape(b, num_kv_heads, h // num_kv_heads, t, s)
    combined = grouped if combined is None else combined + grouped
  return combined


class GroupedQueryAttention(nn.Module):
  """Multi-head attention with `num_kv_heads` key/value heads and T5X's parameter layout.

  Parameters (T5X paths): query/kernel [e, H*d], key/kernel and value/kernel [e, G*d],
  out/kernel [H*d, e]; column = head * d + dim.

  With decode=True the module keeps a 'cache' collection:
  - self-attention: cached_key/cached_value [b, G, d, max_len] filled one position per call;
  - cross-attention: cached_key/cached_value [b, G, d, enc_len] projected from the encoder output
    at the first decode step only (cache_index 0 -> 1), then reused; later steps may pass
    inputs_kv=None to read the cache without the first-step test. inputs_q=None fills the cache
    from inputs_kv and returns None (greedy decoding's prefill, before any step).
  The first decode=True call (cache creation, e.g. `mutable=['cache']` on full-length inputs)
  only creates the cache and runs the ordinary computation.
  """
  num_heads: int
  num_kv_heads: int
  head_dim: int = 64
  cross_attention: bool = False
  dtype: DType = jnp.float32
  dropout_rate: float = 0.0
  float32_logits: bool = False
  # Cached decode steps (one float32 position): projections by step_dense, attention by
  # cached_attention.
  decode_kernels: bool = True

  def __post_init__(self):
    check_kv_heads(self.num_heads, self.num_kv_heads)
    super().__post_init__()

  @property
  def queries_per_kv_head(self) -> int:
    return self.num_heads // self.num_kv_heads

  @nn.compact
  def __call__(self, inputs_q: Array, inputs_kv: Array | None, mask: Array | None = None,
               bias: Array | None = None, *, deterministic: bool = True,
               decode: bool = False) -> Array:
    """inputs_q [b, t, e], inputs_kv [b, s, e], mask [b, 1, t, s], bias [b|1, H, t, s] -> [b, t, e].

    Cached cross-attention also accepts inputs_kv=None once an earlier step has filled its cache,
    and inputs_q=None to fill it only.
    """
    fill_only = inputs_q is None
    embed = (inputs_kv if fill_only else inputs_q).shape[-1]
    h, k, g, d = self.num_heads, self.num_kv_heads, self.queries_per_kv_head, self.head_dim
    cache_ready = decode and self.has_variable('cache', 'cached_key')
    if fill_only and not (cache_ready and self.cross_attention and inputs_kv is not None):
      raise ValueError('inputs_q=None (fill the cache only) is only accepted by cross-attention '
                       'with decode=True, an existing cache and the encoder output as inputs_kv.')
    step = (self.decode_kernels and cache_ready and not fill_only and inputs_q.shape[1] == 1
            and self.dtype == jnp.float32)
    if inputs_kv is None and not (cache_ready and self.cross_attention):
      raise ValueError('inputs_kv=None is only accepted by cached cross-attention (decode=True '
                       'after the cache was created and filled); pass the encoder output.')
    if inputs_kv is not None and inputs_kv.shape[-1] != embed:
      raise ValueError(f'inputs_q and inputs_kv must share the embed dimension; got '
                       f'{inputs_q.shape} and {inputs_kv.shape}')
    depth_scaled_init = lambda *a: attention_kernel_init(*a) / jnp.sqrt(d).astype(jnp.float32)
    wq = Kernel((embed, h * d), (axes.EMBED, axes.JOINED_KV), depth_scaled_init, name='query')()
    wk = Kernel((embed, k * d), (axes.EMBED, axes.JOINED_KV_HEADS), attention_kernel_init,
                name='key')()
    wv = Kernel((embed, k * d), (axes.EMBED, axes.JOINED_KV_HEADS), attention_kernel_init,
                name='value')()
    wo = Kernel((h * d, embed), (axes.JOINED_KV, axes.EMBED), attention_kernel_init, name='out')()
    wq, wk, wv, wo = (w.astype(self.dtype) for w in (wq, wk, wv, wo))

    def project_kv(x, into_cache_layout=False):  # [b, s, e] -> keys, values [b, k, d, s]
      x = x.astype(self.dtype)
      if into_cache_layout:
        # The cross-attention cache fill (once per decode, s = input length) straight into
        # [b, k, d, s], the kernels broadcast over the batch: each sample is then one
        # [k*d, e] x [e, s] product writing its cache rows in place. Moving a projected
        # [b, s, k, d] (or letting XLA fold the batch into the product's columns) transposes the
        # whole cache, twice its size in temporaries: at G = 64 the greedy decode benchmark ran
        # 17-21% faster this way and its peak memory fell from 2757 to 1412 MiB.
        fill = lambda w: jnp.einsum('bse,bejkd->jbkds', x,
                                    jnp.broadcast_to(w, (x.shape[0], *w.shape)))
        if k * d <= _JOINED_CACHE_FILL:
          keys, values = fill(jnp.stack([wk, wv], axis=1).reshape(embed, 2, k, d))
        else:
          (keys,), (values,) = (fill(w.reshape(embed, 1, k, d)) for w in (wk, wv))
      else:
        if step:  # the self-attention's new position
          project = lambda w: jnp.moveaxis(step_dense(x, w).reshape(*x.shape[:2], k, d), 1, 3)
        else:
          # Projected as [b, s, k, d] (the kernel's own column order), then moved to the cache
          # layout: asking the einsum for [b, k, d, s] directly made XLA:CPU transpose the whole
          # kernel at every decode step (8x slower at G = 64); for s = 1 the move is free.
          project = lambda w: jnp.moveaxis(
              jnp.einsum('bse,ekd->bskd', x, w.reshape(embed, k, d)), 1, 3)
        keys, values = project(wk), project(wv)
      constraint = (axes.BATCH, axes.KV_HEADS, axes.KV, axes.LENGTH)
      return (nn.with_logical_constraint(keys, constraint),
              nn.with_logical_constraint(values, constraint))

    if not fill_only:
      if step:
        query = step_dense(inputs_q.astype(self.dtype), wq).reshape(*inputs_q.shape[:2], k, g, d)
      else:
        query = jnp.einsum('bte,ekgd->btkgd', inputs_q.astype(self.dtype),
                           wq.reshape(embed, k, g, d))
      query = nn.with_logical_constraint(
          query, (axes.BATCH, axes.LENGTH, axes.KV_HEADS, axes.HEADS, axes.KV))

    if decode:
      kv_shape = lambda: (inputs_kv.shape[0], k, d, inputs_kv.shape[1])  # [b, k, d, s]
      cached_key = self.variable('cache', 'cached_key', lambda: jnp.zeros(kv_shape(), self.dtype))
      cached_value = self.variable('cache', 'cached_value',
                                   lambda: jnp.zeros(kv_shape(), self.dtype))
      cache_index = self.variable('cache', 'cache_index', lambda: jnp.array(0, jnp.int32))

    if fill_only:
      cached_key.value, cached_value.value = project_kv(inputs_kv, into_cache_layout=True)
      cache_index.value = jnp.array(1, jnp.int32)
      return None
    if not cache_ready:
      keys, values = project_kv(inputs_kv)
    elif self.cross_attention and inputs_kv is None:
      keys, values = cached_key.value, cached_value.value  # read as stored: no copy
    elif self.cross_attention:
      # T5X creates the cache from dummy inputs and passes the encoder output at every step:
      # project it at the first step only. (The cond costs a copy of the cache per step on CPU;
      # gqa_t5x.decoding fills the cache before the first step and then passes inputs_kv=None.)
      keys, values = jax.lax.cond(
          cache_index.value == 0, lambda: project_kv(inputs_kv, into_cache_layout=True),
          lambda: (cached_key.value, cached_value.value))
      cached_key.value, cached_value.value = keys, values
      cache_index.value = jnp.array(1, jnp.int32)
    else:
      if inputs_q.shape[1] != 1:
        raise ValueError(f'Cached self-attention decodes one position per call; got inputs of '
                         f'length {inputs_q.shape[1]}.')
      new_key, new_value = project_kv(inputs_kv)  # [b, k, d, 1]
      position = cache_index.value
      at = (0, 0, 0, position)
      keys = jax.lax.dynamic_update_slice(cached_key.value, new_key.astype(self.dtype), at)
      values = jax.lax.dynamic_update_slice(cached_value.value, new_value.astype(self.dtype), at)
      cached_key.value, cached_value.value = keys, values
      cache_index.value = position + 1
      max_length = keys.shape[-1]
      causal = (jnp.arange(max_length) <= position)[None, None, None, :]  # [1, 1, 1, s]
      mask = causal if mask is None else mask * causal

    bias = mask_to_bias(mask, bias, k)
    if step and (deterministic or not self.dropout_rate):
      out = cached_attention(query, keys, values, bias)
    else:
      # T5X's attention dropout: one mask per (batch, head, key), shared by every query position
      # (the t axis of the [b, k, g, t, s] probabilities).
      dropout = (nn.Dropout(self.dropout_rate, broadcast_dims=(-2,)) if self.dropout_rate > 0
                 else None)
      out = grouped_attention(query, keys, values, bias, self.dtype, self.float32_logits,
                              dropout, deterministic)
    # Heads joined first ([b, t, H*d], a free reshape): contracting (k, g, d) against a reshaped
    # kernel made XLA copy the whole out kernel at every call.
    out = out.reshape(*out.shape[:2], h * d)
    return step_dense(out, wo) if step else jnp.einsum('btf,fe->bte', out, wo)
