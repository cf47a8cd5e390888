"""Writes checkpoints byte-for-byte in T5X's legacy layout, without importing T5X.

Follows t5x/checkpoints.py (Checkpointer.save): every partitioned leaf goes to a gzip zarr array
through tensorstore, named by its path with '/' -> '.', and the msgpack `checkpoint` file
(flax.serialization) holds {'version': 3, 'optimizer': {'target', 'state'}} with each such leaf
replaced by its relative tensorstore spec; unpartitioned leaves and step are stored inline.
Shared by the tests and tools/benchmark_convert.py (which streams a 3 GB checkpoint through it).
"""
import os
from typing import Iterable, Optional

import numpy as np
import tensorstore as ts
from flax import serialization

_CHUNK_BYTES = 64 * 1024 * 1024  # t5x.checkpoints._DESIRED_CHUNK_SIZE_BYTES


def chunk_shape(shape, itemsize, chunk_bytes=_CHUNK_BYTES) -> list[int]:
  """T5X's _choose_chunk_shape: greedily shrink the largest dim to a smaller divisor."""
  factors = [[d for d in range(1, n + 1) if n % d == 0] for n in shape]
  while np.prod([f[-1] for f in factors]) * itemsize > chunk_bytes:
    max(factors, key=lambda f: f[-1]).pop()
  return [f[-1] for f in factors]


def write_legacy_checkpoint(directory: str, params: Iterable[tuple[str, np.ndarray]],
                            step: int, inline: Iterable[str] = (),
                            slots: Optional[dict[str, dict[str, np.ndarray]]] = None,
                            chunk_bytes: int = _CHUNK_BYTES) -> None:
  """params: ('encoder/layers_0/attention/key/kernel', array) pairs, written one at a time.

  slots: Adafactor slots by parameter name ({'v_row': ..., ...}); without, zeros of T5X's
  shapes for a factored kernel (2-D) or an unfactored vector. chunk_bytes: T5X's chunk size
  limit (64 MiB); tests lower it to have small arrays stored in several chunks."""
  os.makedirs(directory)
  inline, given = set(inline), slots or {}
  target, param_states = {}, {}
  for name, array in params:
    *parents, leaf = name.split('/')
    node, states = target, param_states
    for key in parents:
      node, states = node.setdefault(key, {}), states.setdefault(key, {})
    # Adafactor's factored second moments, small enough to be inline in real checkpoints too.
    states[leaf] = (given[name] if name in given else
                    {'v_row': np.zeros(array.shape[0], np.float32),
                     'v_col': np.zeros(array.shape[1], np.float32)} if array.ndim == 2
                    else {'v': np.zeros(array.shape, np.float32)})
    if name in inline:
      node[leaf] = array
      continue
    relative = ('target/' + name).replace('/', '.')
    spec = {'driver': 'zarr', 'dtype': array.dtype.name,
            'kvstore': {'driver': 'file', 'path': relative},
            'metadata': {'compressor': {'id': 'gzip'}, 'shape': list(array.shape),
                         'chunks': chunk_shape(array.shape, array.dtype.itemsize, chunk_bytes)}}
    absolute = {**spec, 'kvstore': {'driver': 'file', 'path': os.path.join(directory, relative)}}
    ts.open(absolute, create=True, open=True).result().write(array).result()
    node[leaf] = ts.Spec(spec).to_json()
  state = {'step': np.asarray(step, np.int32), 'param_states': param_states}
  with open(os.path.join(directory, 'checkpoint'), 'wb') as f:
    f.write(serialization.msgpack_serialize({'version': 3,
                                             'optimizer': {'target': target, 'state': state}}))
