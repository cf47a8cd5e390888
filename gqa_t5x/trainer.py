"""Train state, the sharded train step, and progress reporting (T5X's trainer.py, reduced)."""
import time
from typing import Any, Callable, Optional

import flax
from flax import linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from gqa_t5x import losses
from gqa_t5x.partitioning import Partitioner

PyTree = Any


@flax.struct.dataclass
class TrainState:
  step: jax.Array
  params: PyTree
  opt_state: PyTree

  def to_checkpoint(self) -> dict:
    """T5X's checkpoint tree: target = parameters, state = step + optimizer slots."""
    return {'target': self.params, 'state': {'step': self.step, 'param_states': self.opt_state}}

  @classmethod
  def from_checkpoint(cls, tree: dict) -> 'TrainState':
    return cls(step=tree['state']['step'], params=tree['target'],
               opt_state=tree['state']['param_states'])


def _init_tokens() -> tuple[jax.Array, jax.Array, jax.Array]:
  """Placeholder encoder/decoder tokens [1, 1] to create parameters (their shapes ignore length)."""
  return (jnp.ones((1, 1), jnp.int32),) * 3


def abstract_params(model: nn.Module, partitioner: Partitioner) -> tuple[PyTree, PyTree]:
  """The model's parameter shapes (nothing allocated) and their shardings on the mesh."""
  variables = jax.eval_shape(lambda: model.init(
      jax.random.key(0), *_init_tokens(),
      enable_dropout=False))
  shardings = partitioner.params_shardings(variables['params_axes'])
  abstract = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                          variables['params'], shardings)
  return abstract, shardings


class Trainer:
  """Owns the shardings of a run and the jitted init and train-step functions.

  Seeds, steps and parameters are arguments of the compiled functions, not constants baked into
  them, so one Trainer serves every run of the same model and optimizer (the reproduction trains
  dozens of rows and seeds on a few compiled programs).
  """

  def __init__(self, model: nn.Module, optimizer: optax.GradientTransformation,
               partitioner: Partitioner, *, z_loss: float = 1e-4,
               label_smoothing: float = 0.0, loss_normalizing_factor: Optional[float] = None):
    self.model, self.optimizer, self.partitioner = model, optimizer, partitioner
    self._loss_kwargs = dict(z_loss=z_loss, label_smoothing=label_smoothing,
                             loss_normalizing_factor=loss_normalizing_factor)
    self.abstract_params, params_shardings = abstract_params(model, partitioner)
    abstract_opt_state = jax.eval_shape(optimizer.init, self.abstract_params)
    self.state_shardings = TrainState(
        step=partitioner.replicated, params=params_shardings,
        opt_state=partitioner.opt_state_shardings(abstract_opt_state, self.abstract_params,
                                                  params_shardings))
    self.abstract_state = jax.tree.map(
        lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
        TrainState(jax.ShapeDtypeStruct((), jnp.int32), self.abstract_params, abstract_opt_state),
        self.state_shardings)
    self._train_step = jax.jit(self._step, in_shardings=(self.state_shardings,
                                                         partitioner.batch_sharding,
                                                         partitioner.replicated),
                               out_shardings=(self.state_shardings, partitioner.replicated),
                               donate_argnums=(0,))
    self._init = jax.jit(self._init_state, out_shardings=self.state_shardings)

  def _under_rules(self, fn: Callable, *args):
    with jax.set_mesh(self.partitioner.mesh), nn.logical_axis_rules(self.partitioner.rules):
      return fn(*args)

  def init_state(self, seed: int, params: Optional[PyTree] = None, step: int = 0) -> TrainState:
    """A fresh state (random parameters from seed, unless given) placed by the shardings."""
    # Loaded params go in as an argument: read from the closure, jit would bake every weight
    # into the compiled program as a constant.
    return self._under_rules(self._init, jax.random.key(seed), params,
                             jnp.asarray(step, jnp.int32))

  def _init_state(self, rng, params, step) -> TrainState:
    if params is None:
      params = self.model.init(rng, *_init_tokens(), enable_dropout=False)['params']
    else:  # its own buffers: jit would hand the caller's back, and train_step donates them
      params = jax.tree.map(jnp.copy, params)
    # optax schedules and Adafactor's decay read their own step counts: start them at the
    # checkpoint's step, as T5X's optimizer does (uptraining from step 1M runs at 1/sqrt(1M)).
    opt_state = optax.tree_utils.tree_set(self.optimizer.init(params), count=step)
    return TrainState(step, params, opt_state)

  def train_step(self, state: TrainState, batch: dict,
                 dropout_seed: int = 0) -> tuple[TrainState, dict]:
    return self._under_rules(self._train_step, state, batch,
                             jnp.asarray(dropout_seed, jnp.uint32))

  def _step(self, state: TrainState, batch: dict, dropout_seed) -> tuple[TrainState, dict]:
    # Dropout keys depend only on (seed, step): a resumed run draws the same masks.
    rng = jax.random.fold_in(jax.random.key(dropout_seed), state.step)

    def loss_fn(params):
      logits = self.model.apply(
          {'params': params}, batch['encoder_input_tokens'], batch['decoder_input_tokens'],
          batch['decoder_target_tokens'],
          encoder_segment_ids=batch.get('encoder_segment_ids'),
          decoder_segment_ids=batch.get('decoder_segment_ids'),
          encoder_positions=batch.get('encoder_positions'),
          decoder_positions=batch.get('decoder_positions'),
          enable_dropout=True, rngs={'dropout': rng})
      metrics = losses.compute_weighted_loss(logits, batch['decoder_target_tokens'],
                                             batch.get('decoder_loss_weights'),
                                             **self._loss_kwargs)
      return metrics['loss'], metrics

    grads, metrics = jax.grad(loss_fn, has_aux=True)(state.params)
    updates, opt_state = self.optimizer.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    return TrainState(state.step + 1, params, opt_state), metrics


class Progress:
  """Step, loss, steps/s, target tokens/s and ETA over each reporting window."""

  def __init__(self, start_step: int, total_steps: int):
    self.total_steps = total_steps
    self._step, self._time, self._tokens = start_step, time.time(), 0.0

  @property
  def last_step(self) -> int:
    return self._step

  def add_tokens(self, num_tokens: float):
    self._tokens += num_tokens

  def report(self, step: int) -> dict[str, float]:
    now = time.time()
    seconds = max(now - self._time, 1e-9)
    steps_per_sec = (step - self._step) / seconds
    report = {'timing/steps_per_second': steps_per_sec,
              'timing/target_tokens_per_second': self._tokens / seconds,
              'timing/eta_seconds': (self.total_steps - step) / max(steps_per_sec, 1e-9)}
    self._step, self._time, self._tokens = step, now, 0.0
    return report


def format_eta(seconds: float) -> str:
  seconds = int(seconds)
  return f'{seconds // 3600}h{seconds % 3600 // 60:02d}m{seconds % 60:02d}s'


def to_host(metrics: dict) -> dict[str, float]:
  return {k: float(np.asarray(v)) for k, v in metrics.items()}
