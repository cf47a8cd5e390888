"""Greedy decoding of whole datasets in global batches, timed per sample (the paper's T_infer)."""
import dataclasses
import time
from typing import Any

from absl import logging
from flax import linen as nn
import jax
from jax.experimental import multihost_utils
import numpy as np

from gqa_t5x import decoding
from gqa_t5x import huge_pages
from gqa_t5x.partitioning import Partitioner
from gqa_t5x import errors

PyTree = Any


@dataclasses.dataclass
class DecodeTiming:
  """Wall time of the compiled decode, excluding compilation, over `num_samples` real rows."""
  seconds: float = 0.0
  num_samples: int = 0

  @property
  def ms_per_sample(self) -> float:
    return 1000.0 * self.seconds / max(self.num_samples, 1)


class Predictor:
  """Decodes [n, s] encoder inputs (the same on every process) batch by batch on the mesh."""

  def __init__(self, model: nn.Module, partitioner: Partitioner, batch_size: int,
               max_decode_length: int, eos_id: int = 1):
    if batch_size % partitioner.data_parallel_size:
      raise errors.ConfigError(f'Inference batch_size={batch_size} must be a multiple of the data-parallel '
                       f'size {partitioner.data_parallel_size}.')
    self.model, self.partitioner, self.batch_size = model, partitioner, batch_size
    self.max_decode_length, self.eos_id = max_decode_length, eos_id
    self._compiled = {}

  def _decoder(self, params: PyTree, inputs: jax.Array):
    """The decode step compiled for this input shape, once (so timing excludes compilation)."""
    key = inputs.shape
    if key not in self._compiled:
      with jax.set_mesh(self.partitioner.mesh), nn.logical_axis_rules(self.partitioner.rules):
        self._compiled[key] = decoding.greedy_decode.lower(
            self.model, params, inputs, max_decode_length=self.max_decode_length,
            eos_id=self.eos_id).compile()
    return self._compiled[key]

  def predict(self, params: PyTree, encoder_inputs: np.ndarray) -> tuple[np.ndarray, DecodeTiming]:
    """[n, s] -> ([n, max_decode_length] tokens, timing). The last batch is padded, not dropped."""
    num = len(encoder_inputs)
    outputs, timing = [], DecodeTiming()
    huge_pages.apply(params)  # the weights every decode step reads (CPU only)
    for start in range(0, num, self.batch_size):
      rows = encoder_inputs[start:start + self.batch_size]
      batch = np.zeros((self.batch_size,) + encoder_inputs.shape[1:], np.int32)
      batch[:len(rows)] = rows
      inputs = jax.make_array_from_callback(batch.shape, self.partitioner.batch_sharding,
                                            lambda index, batch=batch: batch[index])
      decode = self._decoder(params, inputs)
      begin = time.perf_counter()
      tokens = jax.block_until_ready(decode(params, inputs))
      timing.seconds += time.perf_counter() - begin
      timing.num_samples += len(rows)
      outputs.append(np.asarray(multihost_utils.process_allgather(tokens, tiled=True))[:len(rows)])
      logging.info('Decoded %d / %d examples (%.2f ms per sample)', min(start + self.batch_size, num),
                   num, timing.ms_per_sample)
    return np.concatenate(outputs) if outputs else np.zeros((0, self.max_decode_length), np.int32), timing
