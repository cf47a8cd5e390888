"""SeqIO input pipelines: packed training batches, one shard per process, resumable by step."""
import dataclasses
import importlib
from typing import Iterator, Mapping, Optional

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


def train_batches(cfg: DatasetConfig, shard: seqio.ShardInfo,
                  start_step: int = 0) -> Iterator[dict[str, np.ndarray]]:
  """Endless process-local batches [batch_size / num_shards, length], positioned at start_step.

  The pipeline is a deterministic function of (seed, shard), so a resumed run reaches the
  uninterrupted run's data position by skipping the start_step batches it already consumed.
  """
  if cfg.batch_size % shard.num_shards:
    raise errors.ConfigError(f'BATCH_SIZE={cfg.batch_size} must be a multiple of the {shard.num_shards} '
                     'data shards (processes feeding distinct rows).')
  get_task(cfg)
  ds = seqio.get_dataset(
      cfg.mixture_or_task_name, task_feature_lengths=dict(cfg.task_feature_lengths),
      feature_converter=seqio.EncDecFeatureConverter(pack=cfg.pack),
      dataset_split=cfg.split, use_cached=cfg.use_cached, shuffle=cfg.shuffle, num_epochs=None,
      shard_info=shard, seed=cfg.seed, batch_size=cfg.batch_size // shard.num_shards)
  return ds.skip(start_step).as_numpy_iterator()


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
