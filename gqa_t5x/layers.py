"""The T5.1.1 building blocks around attention: kernels, embedding, RMS norm, gated MLP, relpos.

Parameter names and shapes follow T5X's t5x/examples/t5/layers.py so that T5X checkpoints load
unchanged; every parameter is created with its logical axis names (T5X's `params_axes`).
"""
from typing import Any, Callable, Sequence

import flax.linen as nn
from flax.linen import partitioning
import jax
import jax.numpy as jnp
import numpy as np

from gqa_t5x import axes
from gqa_t5x import cpu_kernels

Array = jax.Array
DType = Any
Initializer = Callable[..., Array]

default_kernel_init = nn.initializers.variance_scaling(1.0, 'fan_in', 'truncated_normal')
# step_dense's kernel was no slower than XLA's GEMM up to 128 rows (the logits, 2 CPU cores).
STEP_KERNEL_MAX_ROWS = 128


class Kernel(nn.Module):
  """A float32 2-D `kernel` parameter with logical axes, returned as an array.

  Attention and MLP layers reshape and contract kernels in their own einsums (one per idea),
  so this module only owns the parameter, under T5X's `<layer>/kernel` path.
  """
  shape: tuple[int, int]
  axis_names: tuple[str, str]
  init: Initializer = default_kernel_init

  @nn.compact
  def __call__(self) -> Array:
    return partitioning.param_with_axes(
        'kernel', self.init, self.shape, jnp.float32, axes=self.axis_names)


def step_dense(x: Array, w: Array) -> Array:
  """x [b, 1, i] . w [i, o] -> [b, 1, o] in a cached decode step (float32), for any 2-D kernel.

  Why: a decode step multiplies a few rows (the batch) by each weight, which it reads once; that
  is memory-bound, and XLA:CPU's GEMMs run it at a third to a half of the read bandwidth. On CPU
  this runs gqa_t5x.cpu_kernels.matmul, which streams the weight once (float32, up to
  STEP_KERNEL_MAX_ROWS rows); elsewhere a plain matmul.
  """
  rows = x.reshape(-1, x.shape[-1])
  if rows.shape[0] > STEP_KERNEL_MAX_ROWS or x.dtype != jnp.float32 or w.dtype != jnp.float32:
    return jnp.matmul(rows, w).reshape(*x.shape[:-1], w.shape[-1])
  out = cpu_kernels.on_cpu(cpu_kernels.matmul, jnp.matmul, rows, w)
  return out.reshape(*x.shape[:-1], w.shape[-1])


class Embed(nn.Module):
  """Token embedding shared by encoder and decoder ([vocab, embed], T5's N(0, 1) init)."""
  num_embeddings: int
  features: int
  dtype: DType = jnp.float32

  @nn.compact
  def __call__(self, tokens: Array) -> Array:
    embedding = partitioning.param_with_axes(
        'embedding', nn.initializers.normal(stddev=1.0),
        (self.num_embeddings, self.features), jnp.float32, axes=(axes.VOCAB, axes.EMBED))
    return jnp.take(embedding, tokens.astype(jnp.int32), axis=0).astype(self.dtype)


class RMSNorm(nn.Module):
  """T5's layer norm: scale only, no mean subtraction, no bias (statistics in float32)."""
  epsilon: float = 1e-6
  dtype: DType = jnp.float32

  @nn.compact
  def __call__(self, x: Array) -> Array:
    x = x.astype(jnp.float32)
    scale = partitioning.param_with_axes(
        'scale', nn.initializers.ones, (x.shape[-1],), jnp.float32, axes=(axes.EMBED,))
    y = x * jax.lax.rsqrt(jnp.mean(jnp.square(x), axis=-1, keepdims=True) + self.epsilon)
    return (y * scale).astype(self.dtype)


class MlpBlock(nn.Module):
  """T5.1.1's gated MLP: wo(act_0(wi_0 x) * act_1(wi_1 x)), e.g. ('gelu', 'linear')."""
  intermediate_dim: int
  activations: Sequence[str] = ('gelu', 'linear')
  dropout_rate: float = 0.0
  dtype: DType = jnp.float32
  decode_kernels: bool = False  # decode steps (decode=True, one position): step_dense

  @nn.compact
  def __call__(self, x: Array, deterministic: bool = True, decode: bool = False) -> Array:
    embed = x.shape[-1]
    step = self.decode_kernels and decode and x.shape[1] == 1  # step_dense checks the dtype
    dense = lambda x, w, spec: step_dense(x, w) if step else jnp.einsum(spec, x, w)
    hidden = 1.0
    for i, name in enumerate(self.activations):
      suffix = f'_{i}' if len(self.activations) > 1 else ''
      wi = Kernel((embed, self.intermediate_dim), (axes.EMBED, axes.MLP), name=f'wi{suffix}')()
      h = dense(x, wi.astype(self.dtype), 'bte,em->btm')
      hidden = hidden * (h if name == 'linear' else getattr(nn, name)(h))
    hidden = nn.Dropout(self.dropout_rate, broadcast_dims=(-2,))(hidden, deterministic)
    wo = Kernel((self.intermediate_dim, embed), (axes.MLP, axes.EMBED), name='wo')()
    return dense(hidden.astype(self.dtype), wo.astype(self.dtype), 'btm,me->bte')


def relative_position_bucket(relative_position: Array, bidirectional: bool, num_buckets: int,
                             max_distance: int) -> Array:
  """T5's bucketing: exact buckets for small distances, log-spaced up to max_distance."""
  n = -relative_position
  bucket = jnp.zeros_like(n)
  if bidirectional:
    num_buckets //= 2
    bucket = bucket + (n < 0).astype(n.dtype) * num_buckets
    n = jnp.abs(n)
  else:
    n = jnp.maximum(n, 0)
  max_exact = num_buckets // 2
  is_small = n < max_exact
  val_if_large = max_exact + (
      jnp.log(n.astype(jnp.float32) / max_exact + np.finfo(np.float32).eps) /
      np.log(max_distance / max_exact) * (num_buckets - max_exact)).astype(n.dtype)
  val_if_large = jnp.minimum(val_if_large, num_buckets - 1)
  return bucket + jnp.where(is_small, n, val_if_large)


class RelativePositionBias(nn.Module):
  """Per-head attention bias from bucketed relative positions (one table per stack)."""
  num_heads: int
  bidirectional: bool
  num_buckets: int = 32
  max_distance: int = 128
  dtype: DType = jnp.float32

  @nn.compact
  def __call__(self, query_positions: Array, key_positions: Array) -> Array:
    """[t] query and [s] key positions -> bias [1, heads, t, s]."""
    table = partitioning.param_with_axes(
        'rel_embedding', nn.initializers.variance_scaling(1.0, 'fan_avg', 'uniform'),
        (self.num_heads, self.num_buckets), jnp.float32, axes=(axes.HEADS, axes.RELPOS_BUCKETS))
    relative = key_positions[None, :] - query_positions[:, None]  # [t, s]
    buckets = relative_position_bucket(relative, self.bidirectional, self.num_buckets,
                                       self.max_distance)
    return jnp.take(table, buckets, axis=1)[None].astype(self.dtype)  # [1, h, t, s]
