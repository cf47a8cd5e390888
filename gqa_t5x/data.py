"""SeqIO input pipelines: packed training batches, one shard per process, resumable in O(1)."""
import dataclasses
import importlib
from typing import Iterator, Mapping, Optional, Protocol

import jax
import numpy as np
import seqio
import tensorflow as tf

from gqa_t5x import axes
from gqa_t5x import errors

# TensorFlow only runs the input pipelines: keep it off the GPUs, which are JAX's (as T5X does).
try:
  tf.config.set_visible_devices([], 'GPU')
except RuntimeError:  # TensorFlow already initialised its devices in this process
  pass


@dataclasses.dataclass(frozen=True)
class DatasetConfig:
  """What T5X's utils.DatasetConfig holds; batch_size is global (all processes together)."""
  mixture_or_task_name: str
  task_feature_lengths: Mapping[str, int]
  split: str
  batch_size: int
  shuffle: bool = True
  seed: Optional[int] = 42
  use_cached: bool = False
  pack: bool = True
  module: Optional[str] = None  # imported first, to register the task (MIXTURE_OR_TASK_MODULE)


def get_task(cfg: DatasetConfig) -> seqio.Task | seqio.Mixture:
  """The registered task or mixture, importing cfg.module first; a clear error if unknown."""
  if cfg.module:
    importlib.import_module(cfg.module)
  try:
    return seqio.get_mixture_or_task(cfg.mixture_or_task_name)
  except ValueError:
    known = sorted(seqio.TaskRegistry.names()) + sorted(seqio.MixtureRegistry.names())
    raise errors.ConfigError(
        f'Unknown MIXTURE_OR_TASK_NAME {cfg.mixture_or_task_name!r}: set '
        f'MIXTURE_OR_TASK_MODULE to the module that registers it (now {cfg.module!r}); '
        f'registered: {known}') from None


def has_metrics(cfg: DatasetConfig) -> bool:
  """Whether the task (or a task of the mixture) defines metric functions to decode for."""
  task = get_task(cfg)
  return any(t.metric_fns for t in getattr(task, 'tasks', [task]))


def process_shard(mesh: jax.sharding.Mesh) -> seqio.ShardInfo:
  """Which slice of every global batch this process feeds.

  The processes whose devices hold the same rows of the 'data' axis share one shard (they are
  model-parallel peers and must feed identical rows).
  """
  data_dim = mesh.axis_names.index(axes.DATA_AXIS)
  rows = sorted({index[data_dim] for index, device in np.ndenumerate(mesh.devices)
                 if device.process_index == jax.process_index()})
  num_shards = mesh.shape[axes.DATA_AXIS] // len(rows)
  return seqio.ShardInfo(index=rows[0] // len(rows), num_shards=num_shards)


class Batches(Protocol):
  """What a training run reads its data from, and saves with each checkpoint to resume it."""
  shard: seqio.ShardInfo
  position: int  # batches this shard produced since step 0

  def __next__(self) -> dict[str, np.ndarray]: ...
  def save(self, path: str) -> None: ...
  def restore(self, path: str) -> None: ...


class TrainBatches:
  """Endless process-local batches whose position is saved and restored, never replayed.

  The position is tf.data's own iterator state (shuffle buffer, packing, prefetched batches), as
  T5X checkpoints its dataset iterator: restoring it costs the same at step 10 as at step 1M,
  where skipping to the position would re-read every batch consumed before. `position` counts
  the batches this shard has produced since step 0, across restores.
  """

  def __init__(self, dataset: tf.data.Dataset, shard: seqio.ShardInfo):
    self.shard = shard
    self._iterator = iter(dataset)
    self._position = tf.Variable(0, dtype=tf.int64, trainable=False)
    self._stored_shard = tf.Variable([shard.index, shard.num_shards], dtype=tf.int64,
                                     trainable=False)
    self._checkpoint = tf.train.Checkpoint(iterator=self._iterator, position=self._position,
                                           shard=self._stored_shard)

  @property
  def position(self) -> int:
    return int(self._position.numpy())

  def __iter__(self) -> 'TrainBatches':
    return self

  def __next__(self) -> dict[str, np.ndarray]:
    batch = next(self._iterator)
    self._position.assign_add(1)
    return {name: value.numpy() for name, value in batch.items()}

  def save(self, path: str) -> None:
    """Writes the iterator state (and position, shard) under the file prefix `path`."""
    self._checkpoint.write(path)

  def restore(self, path: str) -> None:
    """Continues from the state `save` wrote; refuses a state saved for another shard."""
    self._checkpoint.read(path).assert_consumed()
    stored = seqio.ShardInfo(*(int(x) for x in self._stored_shard.numpy()))
    if stored != self.shard:
      raise errors.ConfigError(
          f'The input pipeline state at {path} belongs to data shard {stored.index} of '
          f'{stored.num_shards}, but this process feeds shard {self.shard.index} of '
          f'{self.shard.num_shards}: resume with the mesh (NUM_PARTITIONS) and number of '
          'processes the run was started with.')


def train_dataset(cfg: DatasetConfig, shard: seqio.ShardInfo) -> tf.data.Dataset:
  """Endless process-local batches [batch_size / num_shards, length], a deterministic function
  of (seed, shard)."""
  if cfg.batch_size % shard.num_shards:
    raise errors.ConfigError(f'BATCH_SIZE={cfg.batch_size} must be a multiple of the '
                             f'{shard.num_shards} data shards (processes feeding distinct rows).')
  get_task(cfg)
  return seqio.get_dataset(
      cfg.mixture_or_task_name, task_feature_lengths=dict(cfg.task_feature_lengths),
      feature_converter=seqio.EncDecFeatureConverter(pack=cfg.pack),
      dataset_split=cfg.split, use_cached=cfg.use_cached, shuffle=cfg.shuffle, num_epochs=None,
      shard_info=shard, seed=cfg.seed, batch_size=cfg.batch_size // shard.num_shards)


def train_batches(cfg: DatasetConfig, shard: seqio.ShardInfo) -> TrainBatches:
  """train_dataset from step 0; a resumed run restores its saved position into the result."""
  return TrainBatches(train_dataset(cfg, shard), shard)


def model_inputs(task: seqio.Task | seqio.Mixture, cfg: DatasetConfig) -> list[dict]:
  """Every example of cfg.split, in order, as task features (inputs, targets, *_pretokenized)."""
  ds = task.get_dataset(dict(cfg.task_feature_lengths), split=cfg.split, shuffle=False,
                        num_epochs=1, use_cached=cfg.use_cached, seed=cfg.seed)
  return list(ds.as_numpy_iterator())


def pad_rows(rows: list[np.ndarray], length: int) -> np.ndarray:
  """Right-pad (with 0, T5's padding id) and stack token rows -> [n, length] int32."""
  out = np.zeros((len(rows), length), np.int32)
  for i, row in enumerate(rows):
    out[i, :len(row)] = row[:length]
  return out
