"""Scores a model on a task's metrics with seqio.Evaluator, decoding greedily (as the paper)."""
import os
from typing import Any, Optional

from absl import logging
from flax import linen as nn
import jax
import numpy as np
import seqio

from gqa_t5x import data
from gqa_t5x.partitioning import Partitioner
from gqa_t5x.predicting import Predictor
from gqa_t5x import errors

PyTree = Any


class Evaluation:
  """One seqio.Evaluator and one Predictor, reused for every checkpoint evaluated."""

  def __init__(self, model: nn.Module, cfg: data.DatasetConfig, partitioner: Partitioner,
               log_dir: Optional[str] = None):
    data.get_task(cfg)
    if log_dir:
      os.makedirs(log_dir, exist_ok=True)  # seqio's loggers write into it but do not create it
    self.lengths = dict(cfg.task_feature_lengths)
    self.evaluator = seqio.Evaluator(
        mixture_or_task_name=cfg.mixture_or_task_name,
        feature_converter=seqio.EncDecFeatureConverter(pack=False),
        eval_split=cfg.split, use_cached=cfg.use_cached, seed=cfg.seed,
        sequence_length=self.lengths,
        logger_cls=(seqio.JSONLogger, seqio.TensorBoardLogger) if log_dir else (),
        log_dir=log_dir)
    if not self.evaluator.eval_tasks:
      raise errors.ConfigError(f'{cfg.mixture_or_task_name!r} has no task with metric_fns on split '
                       f'{cfg.split!r}: nothing to evaluate (pick a task that defines metrics).')
    self.predictor = Predictor(model, partitioner, cfg.batch_size,
                               max_decode_length=self.lengths['targets'])
    self.last_ms_per_sample = float('nan')

  def _predict_fn(self, params: PyTree):
    def predict(dataset) -> list[tuple[int, list[int]]]:
      indices, inputs = [], []
      for index, features in dataset.as_numpy_iterator():
        indices.append(int(index))
        inputs.append(features['encoder_input_tokens'])
      tokens, timing = self.predictor.predict(
          params, data.pad_rows(inputs, self.lengths['inputs']))
      self.last_ms_per_sample = timing.ms_per_sample
      return [(i, row.tolist()) for i, row in zip(indices, tokens)]
    return predict

  def run(self, params: PyTree, step: int) -> dict[str, float]:
    """{'<task>/<metric>': value, ..., 'timing/decode_ms_per_sample': T_infer} on process 0."""
    future, _ = self.evaluator.evaluate(compute_metrics=jax.process_index() == 0, step=step,
                                        predict_fn=self._predict_fn(params))
    scores = {}
    for task, metrics in (future.result() or {}).items():
      for name, value in metrics.items():
        value = getattr(value, 'value', value)
        if np.ndim(value) == 0:
          scores[f'{task}/{name}'] = float(value)
    scores['timing/decode_ms_per_sample'] = self.last_ms_per_sample
    logging.info('Eval at step %d: %s', step, scores)
    return scores
