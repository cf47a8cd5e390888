"""Token-level cross entropy as T5X computes it: z-loss, label smoothing, loss weights.

The z-loss term (z_loss * log(Z)^2) keeps the softmax normaliser near 1, which T5 relies on for
bfloat16 stability; label smoothing subtracts the entropy of the smoothed targets so that a
perfect model scores zero.
"""
from typing import Optional, Tuple

import jax
import jax.numpy as jnp


def cross_entropy_with_z_loss(logits: jax.Array, targets: jax.Array, *, z_loss: float = 1e-4,
                              label_smoothing: float = 0.0) -> Tuple[jax.Array, jax.Array]:
  """Per-token loss and z-loss; logits [b, t, v], targets [b, t] int -> ([b, t], [b, t])."""
  vocab_size = logits.shape[-1]
  confidence = 1.0 - label_smoothing
  low_confidence = label_smoothing / (vocab_size - 1)
  # Entropy of the smoothed target distribution: the lowest loss reachable.
  normalizing_constant = -(confidence * jnp.log(confidence)
                           + (vocab_size - 1) * low_confidence * jnp.log(low_confidence + 1e-20))
  soft_targets = jax.nn.one_hot(targets, vocab_size) * (confidence - low_confidence) + low_confidence
  logits = logits.astype(jnp.float32)
  log_z = jax.nn.logsumexp(logits, axis=-1)  # [b, t]
  log_softmax = logits - log_z[..., None]
  total_z_loss = z_loss * jnp.square(log_z)
  loss = -jnp.sum(soft_targets * log_softmax, axis=-1) + total_z_loss - normalizing_constant
  return loss, total_z_loss


def compute_weighted_loss(logits: jax.Array, targets: jax.Array, weights: Optional[jax.Array], *,
                          z_loss: float = 1e-4, label_smoothing: float = 0.0,
                          loss_normalizing_factor: Optional[float] = None) -> dict:
  """Summed (or normalised) loss over the target tokens that weights select.

  weights is the batch's decoder_loss_weights (0 on padding); with loss_normalizing_factor None
  the loss is the sum over tokens, as T5X's default, else the sum divided by the factor.
  Returns scalars: loss, z_loss, cross_entropy (per token), accuracy, num_tokens.
  """
  token_loss, token_z_loss = cross_entropy_with_z_loss(
      logits, targets, z_loss=z_loss, label_smoothing=label_smoothing)
  weights = jnp.ones_like(token_loss) if weights is None else weights.astype(jnp.float32)
  num_tokens = jnp.sum(weights)
  loss = jnp.sum(token_loss * weights)
  z = jnp.sum(token_z_loss * weights)
  if loss_normalizing_factor is not None:
    loss, z = loss / loss_normalizing_factor, z / loss_normalizing_factor
  correct = (jnp.argmax(logits, axis=-1) == targets).astype(jnp.float32)
  denominator = jnp.maximum(num_tokens, 1.0)
  return {
      'loss': loss,
      'z_loss': z,
      'cross_entropy': jnp.sum((token_loss - token_z_loss) * weights) / denominator,
      'accuracy': jnp.sum(correct * weights) / denominator,
      'num_tokens': num_tokens,
  }
