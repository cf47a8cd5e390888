"""Orbax checkpoints in T5X's layout: MODEL_DIR/checkpoint_<step>/state/ holding
{'target': params, 'state': {'step', 'param_states'}}.

Saving is periodic, asynchronous, atomic (Orbax commits a step only once fully written) and
keeps the newest N. Beside the tree, checkpoint_<step>/dataset/ holds each process's input
pipeline state (process_<i>-of-<n>/), so a resumed run continues its data where it stopped.
Every restore first compares the stored shapes with the configured model, because Orbax can
hand back the stored shape silently and the mismatch would surface much later (e.g. an MHA
checkpoint loaded into a GQA model).
"""
import dataclasses
import os
import re
from typing import Any, Optional

from etils import epath
import jax
import numpy as np
import orbax.checkpoint as ocp

from gqa_t5x import data, errors
from gqa_t5x.checkpoints import orbax_format

PyTree = Any
ITEM = orbax_format.STATE_DIR  # T5X's Orbax checkpoints keep the tree in checkpoint_<step>/state/
DATASET_ITEM = 'dataset'  # each process's input pipeline state: where resumed data continues
STEP_PREFIX = 'checkpoint'
CONVERT_HINT = ('convert it first with gqa-t5x-convert (which mean-pools key/value heads into '
                'the configured kv-head count), or configure the model it was saved from')


@dataclasses.dataclass(frozen=True)
class CheckpointConfig:
  """save_period: steps between checkpoints; keep: how many to keep (None: all); save_steps:
  further steps to save (e.g. each uptraining proportion alpha of one run)."""
  save_period: int = 1000
  keep: Optional[int] = None
  asynchronous: bool = True
  save_steps: tuple[int, ...] = ()


class DatasetHandler(ocp.CheckpointHandler):
  """Saves and restores each process's TrainBatches in a directory of its own.

  Every process writes (processes feed different shards), which is why this is not a JsonSave
  or a StandardSave (those write from the primary process only). Orbax creates the item
  directory on all processes before calling save, and commits the step only after all wrote.
  """

  def save(self, directory: epath.Path, args: 'DatasetArgs') -> None:
    path = _process_path(directory)
    path.parent.mkdir(parents=True, exist_ok=True)
    args.batches.save(os.fspath(path))

  def restore(self, directory: epath.Path, args: 'DatasetArgs') -> data.TrainBatches:
    path = _process_path(directory)
    if not path.parent.exists():
      stored = sorted(p.name for p in directory.iterdir())
      raise errors.ConfigError(
          f'{directory} has no input pipeline state for process {jax.process_index()} of '
          f'{jax.process_count()} (it holds {stored}): resume with the number of processes the '
          'run was started with.')
    args.batches.restore(os.fspath(path))
    return args.batches


@ocp.args.register_with_handler(DatasetHandler, for_save=True, for_restore=True)
@dataclasses.dataclass
class DatasetArgs(ocp.args.CheckpointArgs):
  batches: data.TrainBatches


def _process_path(directory: epath.Path) -> epath.Path:
  return directory / f'process_{jax.process_index()}-of-{jax.process_count()}' / 'iterator'


def manager(model_dir: str, cfg: CheckpointConfig) -> ocp.CheckpointManager:
  """Saves every save_period steps, at save_steps and on preemption; not at a run's first step
  (Orbax's default also saves there: a checkpoint a step after the one the run started from)."""
  policies = ocp.checkpoint_managers
  return ocp.CheckpointManager(
      epath.Path(model_dir),
      options=ocp.CheckpointManagerOptions(
          max_to_keep=cfg.keep, step_prefix=STEP_PREFIX,
          enable_async_checkpointing=cfg.asynchronous, create=True,
          save_decision_policy=policies.AnySavePolicy([
              policies.FixedIntervalPolicy(cfg.save_period),
              policies.SpecificStepsPolicy(cfg.save_steps),
              policies.PreemptionCheckpointingPolicy()])),
      item_names=(ITEM, DATASET_ITEM))


def save(mngr: ocp.CheckpointManager, step: int, tree: PyTree, batches: data.TrainBatches,
         force: bool = False) -> bool:
  """Starts saving `tree` and the input pipeline's state at `step` if the period says so (or
  force); returns whether it did. The pipeline state is written before this returns."""
  return mngr.save(step, force=force, args=ocp.args.Composite(**{
      ITEM: ocp.args.StandardSave(tree), DATASET_ITEM: DatasetArgs(batches)}))


def restore_latest(mngr: ocp.CheckpointManager, abstract_tree: PyTree) -> Optional[PyTree]:
  """The tree of the newest run checkpoint, in abstract_tree's shardings; or None."""
  step = mngr.latest_step()
  if step is None:
    return None
  directory = mngr.directory / f'{STEP_PREFIX}_{step}' / ITEM
  check_shapes(stored_shapes(directory), abstract_tree, directory)
  return mngr.restore(step, args=ocp.args.Composite(**{
      ITEM: ocp.args.StandardRestore(abstract_tree)}))[ITEM]


def restore_dataset(mngr: ocp.CheckpointManager, step: int, batches: data.TrainBatches) -> None:
  """Moves `batches` (fresh, at step 0) to where it was when checkpoint `step` was saved."""
  mngr.restore(step, args=ocp.args.Composite(**{DATASET_ITEM: DatasetArgs(batches)}))


def resolve(path: str, what: str) -> epath.Path:
  """checkpoint_<step>/ (or its state/ item) -> the Orbax item directory; clear error if absent."""
  directory = orbax_format.tree_dir(epath.Path(path))
  if directory is not None:
    return directory
  raise errors.ConfigError(
      f'{what}={path!r} is not an Orbax checkpoint (no {ITEM}/_METADATA inside): pass a '
      f'checkpoint_<step> directory written by a training run or by gqa-t5x-convert.')


def list_checkpoints(path: str) -> list[str]:
  """A checkpoint_<step> directory -> [it]; a model dir -> its checkpoint_<step> dirs by step."""
  directory = epath.Path(path)
  if not directory.exists():
    raise errors.ConfigError(f'CHECKPOINT_PATH={path!r} does not exist: pass a checkpoint_<step> '
                            'directory or a MODEL_DIR that holds some.')
  if (directory / ITEM).exists() or (directory / '_METADATA').exists():
    return [str(directory)]
  steps = sorted(int(m.group(1)) for p in directory.iterdir()
                 if (m := re.fullmatch(rf'{STEP_PREFIX}_(\d+)', p.name)) and (p / ITEM).exists())
  if not steps:
    raise errors.ConfigError(
        f'CHECKPOINT_PATH={path!r} holds no {STEP_PREFIX}_<step>/ checkpoints.')
  return [str(directory / f'{STEP_PREFIX}_{s}') for s in steps]


def stored_shapes(directory: epath.Path) -> dict[str, tuple]:
  """'target/encoder/.../kernel' -> shape, for every array stored in an Orbax item."""
  tree = ocp.PyTreeCheckpointer().metadata(directory).item_metadata.tree
  flat = jax.tree_util.tree_flatten_with_path(tree, is_leaf=lambda x: hasattr(x, 'shape'))[0]
  return {_name(path): tuple(leaf.shape) for path, leaf in flat if hasattr(leaf, 'shape')}


def check_shapes(stored: dict[str, tuple], abstract_tree: PyTree, directory) -> None:
  """Raises naming the first parameter that is missing or shaped differently from the model."""
  for path, leaf in jax.tree_util.tree_flatten_with_path(abstract_tree)[0]:
    name = _name(path)
    if name not in stored:
      raise errors.ConfigError(f'Checkpoint {directory} has no parameter {name}: it was written '
                               f'for a different model; {CONVERT_HINT}.')
    if stored[name] != tuple(leaf.shape):
      raise errors.ConfigError(f'Checkpoint {directory} stores {name} with shape {stored[name]} '
                               f'but the configured model expects {tuple(leaf.shape)}: '
                               f'{CONVERT_HINT}.')


def load_params(path: str, abstract_params: PyTree, what: str) -> tuple[PyTree, Optional[int]]:
  """Parameters (and the stored step, if any) from a converter output or a run checkpoint.

  Only target/... (and state/step) are read; optimizer slots, if present, are left on disk.
  """
  directory = resolve(path, what)
  stored = stored_shapes(directory)
  check_shapes(stored, {'target': abstract_params}, directory)
  expected = {_name(p) for p, _ in
              jax.tree_util.tree_flatten_with_path({'target': abstract_params})[0]}
  extra = sorted(n for n in stored if n.startswith('target/') and n not in expected)
  if extra:
    raise errors.ConfigError(f'Checkpoint {directory} has parameter {extra[0]} that the '
                             f'configured model lacks: {CONVERT_HINT}.')
  item = {'target': abstract_params}
  restore_args = {'target': ocp.checkpoint_utils.construct_restore_args(abstract_params)}
  if 'state/step' in stored:
    item['state'] = {'step': 0}
    restore_args['state'] = {'step': ocp.RestoreArgs(restore_type=np.ndarray)}
  restored = ocp.PyTreeCheckpointer().restore(directory, args=ocp.args.PyTreeRestore(
      item=item, restore_args=restore_args, partial_restore=True))
  step = int(restored['state']['step']) if 'state' in restored else None
  return restored['target'], step


# Where a checkpoint keeps each parameter's Adafactor slots: the runner's own layout (optax's
# chain state, per-parameter second moments first, with their step count), then T5X's (and
# gqa-t5x-convert's), state/param_states/<parameter>/<slot>.
SLOT_PREFIXES = ('state/param_states/0/', 'state/param_states/')


def load_slots(path: str, slot_shapes: dict[str, dict[str, tuple]],
               what: str) -> dict[str, dict[str, np.ndarray]]:
  """The Adafactor slots stored for every parameter whose slots all have the expected shapes.

  slot_shapes: {parameter name: {slot: shape}} (Trainer.slot_shapes). A parameter whose slots are
  missing or shaped differently (a pooled key/value kernel) is left out: its slots start fresh.
  """
  directory = resolve(path, what)
  stored = stored_shapes(directory)
  names = {}
  for param, shapes in slot_shapes.items():
    for prefix in SLOT_PREFIXES:
      if shapes and all(stored.get(f'{prefix}{param}/{slot}') == shape
                        for slot, shape in shapes.items()):
        count = [f'{prefix}{param}/count'] if f'{prefix}{param}/count' in stored else []
        names[param] = {n.rsplit('/', 1)[1]: n for n in [f'{prefix}{param}/{slot}'
                                                         for slot in shapes] + count}
        break
  arrays = orbax_format.read_leaves(directory, [n for slots in names.values()
                                                for n in slots.values()])
  return {param: {slot: arrays[n] for slot, n in slots.items()} for param, slots in names.items()}


def _name(path) -> str:
  return '/'.join(str(getattr(k, 'key', getattr(k, 'name', getattr(k, 'idx', k)))) for k in path)
