"""The device mesh and where each array lives on it (T5X's PjitPartitioner, reduced to its core).

Devices form a ('data', 'model') mesh: `num_partitions` devices per model replica along 'model',
the rest along 'data'. Parameters are placed by the logical axis names the network records in
its 'params_axes' collection, mapped through gqa_t5x.axes.logical_axis_rules; batches are split
over 'data'.
"""
from typing import Any, Sequence

import flax
from flax import linen as nn
from flax.linen import partitioning as flax_partitioning
import jax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
import numpy as np

from gqa_t5x import axes
from gqa_t5x import errors

PyTree = Any


class Partitioner:
  """Builds the mesh and the shardings of parameters, optimizer state and batches."""

  def __init__(self, num_partitions: int = 1, kv_head_counts: Sequence[int] = ()):
    """num_partitions: model-parallel degree; kv_head_counts: the G of every attention kind."""
    devices = jax.devices()
    if num_partitions < 1 or len(devices) % num_partitions:
      accepted = [n for n in range(1, len(devices) + 1) if len(devices) % n == 0]
      raise errors.ConfigError(f'num_partitions={num_partitions} must divide the {len(devices)} '
                               f'devices (accepted: {accepted}).')
    self.mesh = Mesh(np.asarray(devices).reshape(-1, num_partitions),
                     (axes.DATA_AXIS, axes.MODEL_AXIS))
    self.rules = tuple(axes.logical_axis_rules(num_partitions, kv_head_counts))

  @property
  def data_parallel_size(self) -> int:
    return self.mesh.shape[axes.DATA_AXIS]

  @property
  def replicated(self) -> NamedSharding:
    return NamedSharding(self.mesh, P())

  @property
  def batch_sharding(self) -> NamedSharding:
    """Leading (batch) axis over 'data', the rest replicated."""
    return NamedSharding(self.mesh, P(axes.DATA_AXIS))

  def params_shardings(self, params_axes: PyTree) -> PyTree:
    """Shardings for the 'params' tree, from the model's 'params_axes' collection."""
    logical_specs = flax.core.unfreeze(flax_partitioning.get_axis_names(params_axes))
    return nn.logical_to_mesh_sharding(logical_specs, self.mesh, self.rules)

  def opt_state_shardings(self, abstract_opt_state: PyTree, abstract_params: PyTree,
                          params_shardings: PyTree) -> PyTree:
    """Optimizer-state shardings: a slot shaped like its parameter is placed like it.

    Adafactor's factored statistics (v_row, v_col), step counts and placeholders are small (one
    vector per kernel), so they are replicated rather than given derived specs. A parameter's
    state may be one array or several (a per-parameter state such as Adafactor's).
    """
    params_def = jax.tree.structure(abstract_params)

    def place_slots(subtree):
      placed = [jax.tree.map(lambda x: s if x.shape == p.shape else self.replicated, state)
                for state, p, s in zip(params_def.flatten_up_to(subtree),
                                       jax.tree.leaves(abstract_params),
                                       jax.tree.leaves(params_shardings))]
      return params_def.unflatten(placed)

    def is_params_shaped(subtree):
      try:
        params_def.flatten_up_to(subtree)
        return True
      except (ValueError, TypeError):
        return False

    return jax.tree.map(lambda x: place_slots(x) if is_params_shaped(x) else self.replicated,
                        abstract_opt_state, is_leaf=is_params_shaped)

  def shard_batch(self, local_batch: dict) -> dict:
    """Process-local rows [b_local, ...] -> global arrays [b, ...] split over 'data'."""
    return {k: jax.make_array_from_process_local_data(self.batch_sharding, v)
            for k, v in local_batch.items()}
