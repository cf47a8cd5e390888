"""Adafactor and learning-rate schedules as T5X configures them for T5.1.1.

T5X's T5.1.1 gins use Adafactor(decay_rate=0.8, step_offset=0), factored second moments for
kernels whose two largest dims are >= 128, update clipping at RMS 1.0, updates scaled by the
parameter's RMS (floor 1e-3), and no momentum. optax.adafactor's defaults are exactly these.
Schedules follow t5x.utils.create_learning_rate_scheduler: 'constant * rsqrt_decay' with
base 1.0 (pre/up-training) and 'constant' with base 1e-3 (fine-tuning).
"""
from typing import Optional

import jax.numpy as jnp
import optax


def rsqrt_schedule(base_learning_rate: float = 1.0, warmup_steps: int = 10_000) -> optax.Schedule:
  """base / sqrt(max(step, warmup_steps)): constant 1/sqrt(warmup) during warm-up, then decays."""
  def schedule(step):
    return base_learning_rate / jnp.sqrt(jnp.maximum(step, warmup_steps).astype(jnp.float32))
  return schedule


def constant_schedule(base_learning_rate: float = 1e-3) -> optax.Schedule:
  """Fine-tuning's constant rate (T5 fine-tunes at 1e-3)."""
  return optax.constant_schedule(base_learning_rate)


def adafactor(learning_rate: optax.Schedule, *, decay_rate: float = 0.8, step_offset: int = 0,
              min_dim_size_to_factor: int = 128, clipping_threshold: Optional[float] = 1.0,
              multiply_by_parameter_scale: bool = True, factored: bool = True,
              momentum: Optional[float] = None) -> optax.GradientTransformation:
  """T5.1.1's Adafactor; every argument is a gin knob with T5X's default."""
  return optax.adafactor(
      learning_rate=learning_rate, min_dim_size_to_factor=min_dim_size_to_factor,
      decay_rate=decay_rate, decay_offset=step_offset,
      multiply_by_parameter_scale=multiply_by_parameter_scale,
      clipping_threshold=clipping_threshold, momentum=momentum, factored=factored)
