"""Adafactor and learning-rate schedules as T5X configures them for T5.1.1.

T5X's T5.1.1 gins use Adafactor(decay_rate=0.8, step_offset=0), factored second moments for
kernels whose two largest dims are >= 128, update clipping at RMS 1.0, updates scaled by the
parameter's RMS (floor 1e-3), and no momentum: optax.adafactor's defaults, built here from the
same optax transformations with one change. Each parameter's second moment keeps its own step
count, so a parameter whose statistics start fresh mid-run (a pooled key/value kernel after a
conversion, at step 1M) decays them as from step 0, as T5X's step_offset does for a whole model,
while the restored statistics of every other parameter continue at the run's step.
Schedules follow t5x.utils.create_learning_rate_scheduler: 'constant * rsqrt_decay' with
base 1.0 (pre/up-training) and 'constant' with base 1e-3 (fine-tuning).
"""
from typing import Any, Optional

import jax
import jax.numpy as jnp
import optax

PyTree = Any
SLOTS = ('v_row', 'v_col', 'v')  # T5X's names for Adafactor's second-moment slots (optax's too)


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
  """T5.1.1's Adafactor (optax.adafactor's chain); every argument is a gin knob with T5X's default.

  step_offset is T5X's: every parameter's decay runs as if at step (count - step_offset).
  """
  chain = [per_parameter(optax.scale_by_factored_rms(
      factored=factored, decay_rate=decay_rate, step_offset=step_offset,
      min_dim_size_to_factor=min_dim_size_to_factor))]
  if clipping_threshold is not None:
    chain.append(optax.clip_by_block_rms(clipping_threshold))
  chain.append(optax.scale_by_learning_rate(learning_rate, flip_sign=False))
  if multiply_by_parameter_scale:
    chain.append(optax.scale_by_param_block_rms())
  if momentum is not None:
    chain.append(optax.ema(momentum, debias=False))
  chain.append(optax.scale(-1))
  return optax.chain(*chain)


def per_parameter(inner: optax.GradientTransformation) -> optax.GradientTransformation:
  """Applies `inner` to every parameter on its own: one state, step count included, each."""
  def init(params):
    return jax.tree.map(inner.init, params)

  def update(updates, state, params=None):
    treedef = jax.tree.structure(updates)
    leaves = treedef.flatten_up_to(params) if params is not None else [None] * treedef.num_leaves
    results = [inner.update(u, s, p) for u, s, p in
               zip(treedef.flatten_up_to(updates), treedef.flatten_up_to(state), leaves)]
    return (treedef.unflatten([u for u, _ in results]),
            treedef.unflatten([s for _, s in results]))

  return optax.GradientTransformation(init, update)


def _is_slot_state(x) -> bool:
  return isinstance(x, optax.FactoredState)


def slot_states(opt_state: PyTree) -> dict[str, optax.FactoredState]:
  """Each parameter's second-moment state, by parameter name ('encoder/layers_0/.../kernel')."""
  flat = jax.tree_util.tree_flatten_with_path(opt_state, is_leaf=_is_slot_state)[0]
  return {_param_name(path): leaf for path, leaf in flat if _is_slot_state(leaf)}


def with_slot_states(opt_state: PyTree, states: dict[str, optax.FactoredState]) -> PyTree:
  """opt_state with the named parameters' second-moment states replaced."""
  return jax.tree_util.tree_map_with_path(
      lambda path, x: states.get(_param_name(path), x) if _is_slot_state(x) else x, opt_state,
      is_leaf=_is_slot_state)


def _param_name(path) -> str:
  # The path into the chain's state starts with the transformation's index; the rest is the
  # parameter's own path.
  return '/'.join(str(getattr(k, 'key', getattr(k, 'name', k))) for k in path[1:])
