"""Train state, the sharded train step, and progress reporting (T5X's trainer.py, reduced)."""
import time
from typing import Any, Callable, Optional

import flax
from flax import linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from gqa_t5x import errors, losses, optimizers
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
               label_smoothing: float = 0.0, loss_normalizing_factor: Optional[float] = None,
               num_microbatches: Optional[int] = None, step_offset_fresh_slots: bool = True):
    """num_microbatches: T5X's gradient accumulation. Each step's batch is split into that many
    microbatches whose gradients are summed before the one optimizer update: the update of the
    whole batch, with the activation memory of one microbatch. None or 1: the whole batch at once.
    step_offset_fresh_slots: a state started at step N (from a checkpoint) gives the Adafactor
    slots it does not restore T5X's step_offset N, so they decay as from step 0 (True), not with
    step N's near-1 decay (False): at N = 1M a zero second moment takes in 1.6e-5 of each squared
    gradient per step, and the updates it scales stay clipped for tens of thousands of steps.
    """
    if num_microbatches is not None and num_microbatches < 1:
      raise errors.ConfigError(f'num_microbatches={num_microbatches} must be None or >= 1.')
    self.model, self.optimizer, self.partitioner = model, optimizer, partitioner
    self.num_microbatches = num_microbatches or 1
    self.step_offset_fresh_slots = step_offset_fresh_slots
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

  @property
  def slot_shapes(self) -> dict[str, dict[str, tuple[int, ...]]]:
    """{parameter name: {slot: shape}} of the Adafactor slots a checkpoint can restore (the
    (1,)-shaped placeholders of unused slots are left out)."""
    return {name: {slot: getattr(state, slot).shape for slot in optimizers.SLOTS
                   if getattr(state, slot).shape != (1,)}
            for name, state in optimizers.slot_states(self.abstract_state.opt_state).items()}

  def init_state(self, seed: int, params: Optional[PyTree] = None, step: int = 0,
                 slots: Optional[dict[str, dict]] = None) -> TrainState:
    """A state at `step` (random parameters from seed, unless given) placed by the shardings.

    slots: restored Adafactor slots by parameter name ({slot: array}, and the slots' own step
    'count' if the checkpoint kept one, else they count from `step`); every other parameter's
    slots start fresh.
    """
    # Loaded params go in as an argument: read from the closure, jit would bake every weight
    # into the compiled program as a constant.
    return self._under_rules(self._init, jax.random.key(seed), params,
                             jnp.asarray(step, jnp.int32), slots or {})

  def _init_state(self, rng, params, step, slots) -> TrainState:
    if params is None:
      params = self.model.init(rng, *_init_tokens(), enable_dropout=False)['params']
    else:  # its own buffers: jit would hand the caller's back, and train_step donates them
      params = jax.tree.map(jnp.copy, params)
    # optax schedules and Adafactor's decay read their own step counts: start them at the
    # checkpoint's step, as T5X's optimizer does (uptraining from step 1M runs at 1/sqrt(1M)).
    opt_state = optax.tree_utils.tree_set(self.optimizer.init(params), count=step)
    fresh_count = jnp.zeros_like(step) if self.step_offset_fresh_slots else step
    states = {}
    for name, state in optimizers.slot_states(opt_state).items():
      restored = dict(slots.get(name, {}))
      count = restored.pop('count', step if name in slots else fresh_count)
      states[name] = state._replace(count=jnp.asarray(count, state.count.dtype), **{
          slot: jnp.asarray(value, getattr(state, slot).dtype) for slot, value in restored.items()})
    return TrainState(step, params, optimizers.with_slot_states(opt_state, states))

  def train_step(self, state: TrainState, batch: dict,
                 dropout_seed: int = 0) -> tuple[TrainState, dict]:
    return self._under_rules(self._train_step, state, batch,
                             jnp.asarray(dropout_seed, jnp.uint32))

  def _step(self, state: TrainState, batch: dict, dropout_seed) -> tuple[TrainState, dict]:
    # Dropout keys depend only on (seed, step): a resumed run draws the same masks.
    rng = jax.random.fold_in(jax.random.key(dropout_seed), state.step)
    if self.num_microbatches == 1:
      grads, metrics = self._grads(state.params, batch, rng)
    else:
      grads, metrics = self._accumulated_grads(state.params, batch, rng)
    updates, opt_state = self.optimizer.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    return TrainState(state.step + 1, params, opt_state), metrics

  def _grads(self, params: PyTree, batch: dict, rng) -> tuple[PyTree, dict]:
    """Gradient of the summed (or constant-normalised) loss over `batch`, and its metrics."""
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

    return jax.grad(loss_fn, has_aux=True)(params)

  def _accumulated_grads(self, params: PyTree, batch: dict, rng) -> tuple[PyTree, dict]:
    """T5X's accumulate_grads_microbatched: the loss is a sum over tokens (divided by a constant,
    if any), so the microbatches' gradients add up to the whole batch's; accumulated in float32.

    Microbatch i takes rows i*m..(i+1)*m - 1 of every data shard's rows, not of the global batch,
    so each microbatch stays spread over all data shards and is sliced without communication.
    """
    n, shards = self.num_microbatches, self.partitioner.data_parallel_size
    rows = next(iter(batch.values())).shape[0]
    if rows % (n * shards):
      raise errors.ConfigError(f'BATCH_SIZE={rows} must be a multiple of num_microbatches={n} '
                               f'times the {shards} data-parallel shards.')

    def split(x):  # [rows, ...] -> [n, rows / n, ...], microbatch i from every shard's block
      x = x.reshape(shards, n, rows // (n * shards), *x.shape[1:]).swapaxes(0, 1)
      return x.reshape(n, rows // n, *x.shape[3:])

    def accumulate(total, inputs):
      index, microbatch = inputs
      microbatch = jax.lax.with_sharding_constraint(microbatch, self.partitioner.batch_sharding)
      grads, metrics = self._grads(params, microbatch, jax.random.fold_in(rng, index))
      return jax.tree.map(jnp.add, total, (grads, _summable(metrics))), None

    zeros = jax.tree.map(lambda p: jnp.zeros(p.shape, jnp.float32), params)
    metrics_shape = jax.eval_shape(lambda: _summable(self._grads(params, batch, rng)[1]))
    start = (zeros, jax.tree.map(lambda m: jnp.zeros(m.shape, m.dtype), metrics_shape))
    (grads, summed), _ = jax.lax.scan(accumulate, start,
                                      (jnp.arange(n), jax.tree.map(split, batch)))
    grads = jax.tree.map(lambda g, p: g.astype(p.dtype), grads, params)
    return grads, _per_token(summed)


# Metrics that are means over the batch's target tokens; the rest are sums.
_TOKEN_MEANS = ('cross_entropy', 'accuracy')


def _summable(metrics: dict) -> dict:
  """Per-token means times their token counts, so that microbatch metrics add up."""
  return {k: v * jnp.maximum(metrics['num_tokens'], 1.0) if k in _TOKEN_MEANS else v
          for k, v in metrics.items()}


def _per_token(summed: dict) -> dict:
  return {k: v / jnp.maximum(summed['num_tokens'], 1.0) if k in _TOKEN_MEANS else v
          for k, v in summed.items()}


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
