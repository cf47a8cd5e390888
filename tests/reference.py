"""An independent numpy reference for T5 attention: plain MHA, one head at a time, float64.

GQA is checked against it by giving the reference key/value kernels in which each GQA head is
repeated for the H/G query heads of its group.
"""
import numpy as np


def softmax(x):
  x = x - x.max(axis=-1, keepdims=True)
  e = np.exp(x)
  return e / e.sum(axis=-1, keepdims=True)


def repeat_kv_kernel(kernel, num_heads, num_kv_heads, head_dim):
  """[e, G*d] -> [e, H*d]: column block of head h is kv head h // (H/G)."""
  blocks = [kernel[:, (h // (num_heads // num_kv_heads)) * head_dim:][:, :head_dim]
            for h in range(num_heads)]
  return np.concatenate(blocks, axis=1)


def mha(x_q, x_kv, wq, wk, wv, wo, num_heads, head_dim, mask=None, bias=None):
  """x_q [b, t, e], x_kv [b, s, e], kernels [e, H*d] / [H*d, e], mask [b, 1, t, s], bias [1, H, t, s]."""
  x_q, x_kv = np.asarray(x_q, np.float64), np.asarray(x_kv, np.float64)
  out = 0.0
  for h in range(num_heads):
    cols = slice(h * head_dim, (h + 1) * head_dim)
    q, k, v = x_q @ wq[:, cols], x_kv @ wk[:, cols], x_kv @ wv[:, cols]
    scores = q @ k.transpose(0, 2, 1)  # [b, t, s]; T5 does not scale logits
    if bias is not None:
      scores = scores + bias[:, h]
    if mask is not None:
      scores = np.where(mask[:, 0] > 0, scores, -1e10)
    out = out + (softmax(scores) @ v) @ wo[cols, :]
  return out
