"""Metric writers: TensorBoard (clu) plus one JSON object per line in MODEL_DIR, for scripts."""
import json
import os
import time
from typing import Any, Mapping

from clu import metric_writers
import jax
import numpy as np


class JsonLinesWriter(metric_writers.MetricWriter):
  """Appends {"step": s, "time": t, name: value, ...} per write_scalars call (process 0 only)."""

  def __init__(self, path: str):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    self._file = open(path, 'a')

  def write_scalars(self, step: int, scalars: Mapping[str, Any]):
    row = {'step': int(step), 'time': time.time()}
    row.update({k: float(np.asarray(v)) for k, v in scalars.items()})
    self._file.write(json.dumps(row) + '\n')
    self._file.flush()

  def write_summaries(self, step, values, metadata=None):
    pass

  def write_images(self, step, images):
    pass

  def write_videos(self, step, videos):
    pass

  def write_audios(self, step, audios, *, sample_rate):
    pass

  def write_texts(self, step, texts):
    pass

  def write_histograms(self, step, arrays, num_buckets=None):
    pass

  def write_hparams(self, hparams):
    pass

  def flush(self):
    self._file.flush()

  def close(self):
    self._file.close()


def create_writer(log_dir: str, jsonl_name: str) -> metric_writers.MetricWriter:
  """TensorBoard events + logging + log_dir/jsonl_name on process 0; logging only elsewhere."""
  if jax.process_index() > 0:
    return metric_writers.create_default_writer(just_logging=True)
  return metric_writers.MultiWriter([
      metric_writers.create_default_writer(log_dir, asynchronous=False),
      JsonLinesWriter(os.path.join(log_dir, jsonl_name)),
  ])
