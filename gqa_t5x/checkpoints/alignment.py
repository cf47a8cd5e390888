"""Rotates the heads of each group into line before they are mean-pooled (--method=aligned).

Mean pooling averages heads that were never trained to agree: two heads can compute the same
attention in rotated coordinates and still average to something that matches neither. T5 has no
rotary embedding and adds its relative position bias per query head, so for any orthogonal d x d
R, a kv head's key kernel Wk R with its query heads' kernels Wq R gives the same logits
x Wq R R^T Wk^T y^T; likewise a value kernel Wv S with S^T on the head's rows of the out kernel.
Per group, generalized Procrustes analysis picks the rotations that bring the heads closest to
their mean (weights only, no data). It starts from no rotation, i.e. mean pooling itself, and each
step rotates every head onto the current mean (polar factor of Wk_i^T M), which never increases
sum_i ||Wk_i R_i - M||^2: aligned pooling is never farther from the heads than mean pooling, and
heads that are exact rotations of one another pool exactly (cf. arXiv 2412.20677, which RoPE
restricts to 2 x 2 blocks).

Legend: e embed, k kv heads, g groups (kv heads after), r = k/g, d head dim, n heads of a kernel.
"""
import numpy as np

MAX_STEPS = 50
TOLERANCE = 1e-6  # stop once a step removes less than this fraction of sum_i ||Wk_i||^2
MEASURE = ('sqrt(sum_i ||W_i R_i - M||^2 / sum_i ||W_i||^2) over the kv heads i of every group, '
           'W_i the head\'s key or value kernel, M its group\'s pooled head; mean: R_i = I, as '
           '--method=mean pools; aligned: the fitted rotations')


def fit(kernel: np.ndarray, *, num_kv_heads: int, head_dim: int) -> tuple[np.ndarray, dict]:
  """Returns rotations [k, d, d] for the heads of a key or value kernel [e, k*d] pooled to g
  heads, and the distance (MEASURE) of the pooled heads from them: {'mean': .., 'aligned': ..}.

  Works on the Gram matrix of each group's heads ([r*d, r*d]; cost e*(r*d)^2 once), so that a
  step costs (r*d)^2*d instead of a pass over the kernel.
  """
  e, d, g = kernel.shape[0], head_dim, num_kv_heads
  r = kernel.shape[1] // d // g
  stacked = kernel.astype(np.float64).reshape(e, g, r * d).transpose(1, 0, 2)  # [g, e, r*d]
  gram = np.swapaxes(stacked, 1, 2) @ stacked  # [g, r*d, r*d]: blocks Wk_i^T Wk_j
  total = np.trace(gram, axis1=1, axis2=2).sum()
  rotations = np.tile(np.eye(d), (g, r, 1))  # [g, r*d, d]: R_i stacked per group

  def residual_and_step(rotations):
    # rows of group g's `pulled` are the blocks Wk_i^T (sum_j Wk_j R_j) = r Wk_i^T M.
    pulled = gram @ rotations
    pooled_norm = (rotations * pulled).sum() / r**2  # sum over groups of ||M||^2
    u, _, vt = np.linalg.svd(pulled.reshape(g, r, d, d))
    return max(total - r * pooled_norm, 0.0), (u @ vt).reshape(g, r * d, d)

  before, proposal = residual_and_step(rotations)
  residual, scale = before, total or 1.0  # an all-zero kernel: nothing to align
  for _ in range(MAX_STEPS):
    new_residual, next_proposal = residual_and_step(proposal)
    if new_residual > residual:  # only float rounding near the optimum does this: keep the best
      break
    converged = residual - new_residual < TOLERANCE * scale
    rotations, residual, proposal = proposal, new_residual, next_proposal
    if converged:
      break
  distances = {'mean': float(np.sqrt(before / scale)), 'aligned': float(np.sqrt(residual / scale))}
  return rotations.reshape(g * r, d, d).astype(np.float32), distances


def rotate(kernel: np.ndarray, rotations: np.ndarray, *, head_dim: int, rows: bool = False
           ) -> np.ndarray:
  """Applies kv head j's rotation R_j to each of the n heads h of a kernel, j = h // (n/k).

  Columns (query [e, n*d], key/value [e, k*d]): head block W_h becomes W_h R_j. rows=True (out
  [n*d, e]): head block W_h becomes R_j^T W_h. Computed in float64, cast back to the dtype.
  """
  n = (kernel.shape[0] if rows else kernel.shape[1]) // head_dim
  per_head = np.repeat(rotations.astype(np.float64), n // rotations.shape[0], axis=0)
  if rows:
    blocks = kernel.astype(np.float64).reshape(n, head_dim, -1)
    rotated = np.einsum('hdf,hde->hfe', per_head, blocks).reshape(kernel.shape)
  else:
    blocks = kernel.astype(np.float64).reshape(-1, n, head_dim)
    rotated = np.einsum('ehd,hdf->ehf', blocks, per_head).reshape(kernel.shape)
  return np.ascontiguousarray(rotated.astype(kernel.dtype))
