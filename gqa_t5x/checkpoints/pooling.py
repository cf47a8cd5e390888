"""Combines the key/value heads of a projection kernel into fewer, grouped heads.

A T5X key or value kernel is stored 2-D as [e, k*d] (column = head*d + dim). Going from k to g
kv heads merges each run of k/g contiguous heads into one, so that query head h, which read kv
head h // (H/k), now reads h // (H/g): the standard contiguous grouping (GQA paper, HF repeat_kv,
jax.nn.dot_product_attention). The paper's ablation compares three ways to merge a group; a
fourth, aligned, mean-pools heads first rotated into line (alignment.py), which also rotates the
query and out kernels, so plan.py applies it per layer rather than per kernel.

Legend: e embed, k kv heads before, g kv heads after, r = k/g heads per group, d head dim.
"""
import zlib

import numpy as np

PER_KERNEL = ('mean', 'first', 'random')
METHODS = PER_KERNEL + ('aligned',)


def pool_kv_kernel(kernel: np.ndarray, *, num_kv_heads: int, head_dim: int, method: str,
                   seed: int = 0, name: str = '') -> np.ndarray:
  """Returns the [e, g*d] kernel for `num_kv_heads` (g) heads from an [e, k*d] kernel.

  mean: the group's heads averaged (in float32, then cast back: bf16 stays bf16).
  first: the group's first head.
  random: a fresh T5X initialisation (variance_scaling(1, fan_in, normal): std 1/sqrt(e)),
    seeded by (`seed`, `name`) so that every tensor gets its own reproducible draw.
  """
  e, kd = kernel.shape
  k, g = kd // head_dim, num_kv_heads
  if k * head_dim != kd or k % g:
    raise ValueError(f'cannot pool a [{e}, {kd}] kernel (head_dim {head_dim}) to {g} heads')
  grouped = kernel.reshape(e, g, k // g, head_dim)  # [e, g, r, d]
  if method == 'mean':
    pooled = grouped.astype(np.float32).mean(axis=2)
  elif method == 'first':
    pooled = grouped[:, :, 0, :]
  elif method == 'random':
    rng = np.random.default_rng([seed, zlib.crc32(name.encode())])
    pooled = rng.standard_normal((e, g, head_dim), dtype=np.float32) / np.sqrt(e)
  else:
    raise ValueError(f'unknown pooling method {method!r}; expected one of {PER_KERNEL}')
  return np.ascontiguousarray(pooled.reshape(e, g * head_dim).astype(kernel.dtype))
