"""The models, compiled steps and starting parameters that a reproduction's stages share.

A reproduction trains and scores dozens of (row, seed) runs, but only a few distinct programs:
one train step per (kv-head count, pre/fine-tuning), one teacher-forced scorer and one greedy
decoder per kv-head count. Building each once and reusing it across every row and seed with
that G, and each (task, seed)'s training batches, is what brings the CPU preset within its
budget (a fresh interpreter, compilation and input pipeline per stage cost more than the
training itself).
"""
import dataclasses
import functools
import json
from typing import Any

import jax
import numpy as np
import seqio

from gqa_t5x import checkpointing, data, gin_utils, optimizers
from gqa_t5x.checkpoints import plan as conversion
from gqa_t5x.checkpoints.base import LazyTensor, flatten, unflatten
from gqa_t5x.evaluation import Evaluation
from gqa_t5x.network import T5Config, Transformer
from gqa_t5x.partitioning import Partitioner
from gqa_t5x.reproduce.presets import Lengths, Preset
from gqa_t5x.train_eval import TrainEvaluation
from gqa_t5x.trainer import Trainer

PyTree = Any
TASK_MODULE = 'gqa_t5x.tasks'
FINETUNE_DROPOUT = 0.1  # T5X's finetune.gin (the paper fine-tunes with dropout 0.1)
PRETRAIN, FINETUNE = 'pretrain', 'finetune'  # pre-training and uptraining share one recipe


def train_data(task: str, lengths: Lengths, batch: int, seed: int) -> data.DatasetConfig:
  """Packed, shuffled training batches; the seed fixes their order."""
  return data.DatasetConfig(task, dict(lengths), 'train', batch, shuffle=True, seed=seed,
                            pack=True, module=TASK_MODULE)


class Replayed:
  """A training pipeline's batches, made once and replayed from the first one to every run that
  reads them. The pipeline is deterministic, so each run sees what its own pipeline would give,
  without paying again for building it and filling its shuffle buffer (seconds per run)."""

  def __init__(self, cfg: data.DatasetConfig, shard: seqio.ShardInfo):
    self._cfg, self.shard = cfg, shard
    self._pipeline, self._made = None, []

  def batch(self, index: int) -> dict:
    while index >= len(self._made):
      if self._pipeline is None:
        self._pipeline = data.train_batches(self._cfg, self.shard)
      self._made.append(next(self._pipeline))
    return self._made[index]

  def cursor(self) -> 'Cursor':
    return Cursor(self)


class Cursor:
  """One run's place in a Replayed sequence (data.Batches): saved with the run's checkpoints as
  the batch index it continues from."""

  def __init__(self, replayed: Replayed):
    self._replayed, self.shard, self.position = replayed, replayed.shard, 0

  def __iter__(self) -> 'Cursor':
    return self

  def __next__(self) -> dict:
    self.position += 1
    return self._replayed.batch(self.position - 1)

  def save(self, path: str) -> None:
    with open(path, 'w') as f:
      json.dump({'position': self.position}, f)

  def restore(self, path: str) -> None:
    with open(path) as f:
      self.position = json.load(f)['position']


class Models:
  """Builds each model, Trainer and scorer on first use and hands the same one out after."""

  def __init__(self, preset: Preset, pretrained_checkpoint: str):
    self.preset = preset
    self.pretrained_checkpoint = pretrained_checkpoint
    self._cache: dict[tuple, Any] = {}

  def _once(self, key: tuple, build):
    if key not in self._cache:
      self._cache[key] = build()
    return self._cache[key]

  @functools.cached_property
  def base_config(self) -> T5Config:
    return gin_utils.model_config([self.preset.model_gin], self.preset.extra_bindings)

  def config(self, kv_heads: int, dropout_rate: float = 0.0) -> T5Config:
    """The model gin's T5.1.1 with G kv heads in decoder self- and cross-attention."""
    return dataclasses.replace(self.base_config, num_decoder_self_kv_heads=kv_heads,
                               num_decoder_cross_kv_heads=kv_heads, dropout_rate=dropout_rate)

  def partitioner(self, kv_heads: int) -> Partitioner:
    return self._once(('partitioner', kv_heads), lambda: Partitioner(
        self.preset.num_partitions, kv_head_counts=self.config(kv_heads).kv_head_counts))

  def trainer(self, kv_heads: int, recipe: str):
    """(Trainer, learning-rate schedule) of T5X's pretrain.gin (also uptraining: the paper
    continues pre-training) or finetune.gin (constant rate, dropout 0.1)."""
    def build():
      p = self.preset
      if recipe == FINETUNE:
        dropout, schedule = FINETUNE_DROPOUT, optimizers.constant_schedule(
            p.finetune_learning_rate)
      else:
        dropout, schedule = 0.0, optimizers.rsqrt_schedule(1.0, p.warmup_steps)
      model = Transformer(self.config(kv_heads, dropout))
      return Trainer(model, optimizers.adafactor(schedule), self.partitioner(kv_heads)), schedule
    return self._once(('trainer', kv_heads, recipe), build)

  def batches(self, task: str, lengths: Lengths, batch: int, seed: int) -> Cursor:
    """A run's own cursor into the training batches of (task, seed), which every row and
    variant trained on them shares."""
    shard = data.process_shard(self.partitioner(self.preset.num_heads).mesh)
    return self._once(('batches', task, lengths, batch, seed), lambda: Replayed(
        train_data(task, lengths, batch, seed), shard)).cursor()

  def heldout(self, kv_heads: int) -> TrainEvaluation:
    """Teacher-forced loss and accuracy on the held-out task's validation split."""
    p = self.preset
    cfg = data.DatasetConfig(p.heldout_task, dict(p.pretrain_lengths), 'validation',
                             p.eval_batch, shuffle=False, seed=p.pretrain_seed, pack=True,
                             module=TASK_MODULE)
    return self._once(('heldout', kv_heads), lambda: TrainEvaluation(
        self.trainer(kv_heads, PRETRAIN)[0], cfg))

  def evaluation(self, kv_heads: int, task: str, lengths: Lengths) -> Evaluation:
    """Greedy decoding on the task's validation split, scored with its metrics."""
    cfg = data.DatasetConfig(task, dict(lengths), 'validation', self.preset.eval_batch,
                             shuffle=False, pack=False, module=TASK_MODULE)
    return self._once(('evaluation', kv_heads, task), lambda: Evaluation(
        Transformer(self.config(kv_heads)), cfg, self.partitioner(kv_heads)))

  def load(self, path: str, kv_heads: int) -> tuple[PyTree, int]:
    """(parameters placed on the mesh, step) of a checkpoint of the G model."""
    trainer = self.trainer(kv_heads, PRETRAIN)[0]
    params, step = checkpointing.load_params(path, trainer.abstract_state.params, path)
    return params, step or 0

  def pretrained(self) -> tuple[PyTree, int]:
    return self._once(('pretrained',), lambda: self.load(self.pretrained_checkpoint,
                                                         self.preset.num_heads))

  def converted(self, kv_heads: int, method: str, seed: int) -> tuple[PyTree, int, dict]:
    """The pre-trained MHA parameters converted by gqa-t5x-convert's own plan, in memory:
    (parameters, step, the conversion record's facts); MHA (G = H) as pre-trained."""
    params, step = self.pretrained()
    if kv_heads == self.preset.num_heads:
      return params, step, {'method': 'none (MHA)'}
    flat = {name: LazyTensor.of(np.asarray(leaf)) for name, leaf in flatten(params)}
    converted, facts = conversion.plan(
        flat, {'decoder_self': kv_heads, 'decoder_cross': kv_heads},
        head_dim=self.base_config.head_dim, method=method, seed=seed,
        num_heads=self.preset.num_heads)
    shardings = self.trainer(kv_heads, PRETRAIN)[0].state_shardings.params
    tree = jax.device_put(unflatten({n: t.read() for n, t in converted.items()}), shardings)
    return tree, step, facts
