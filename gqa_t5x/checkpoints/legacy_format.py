"""Reads T5X's legacy checkpoints: the format of the public T5.1.1 checkpoints.

`checkpoint_N/checkpoint` is msgpack {'version': 3, 'optimizer': {'target': params,
'state': {'step', 'param_states'}}} written by flax.serialization. Partitioned leaves are
tensorstore specs (zarr, gzip) whose kvstore path is relative to the checkpoint directory
(e.g. target.decoder.layers_0.self_attention.key.kernel); small leaves are stored inline.
Every array is opened through tensorstore, so gs:// checkpoints read like local ones.
"""
import os
import posixpath

import msgpack
import numpy as np
import tensorstore as ts
from etils import epath
from flax import serialization

from gqa_t5x.checkpoints.base import Checkpoint, CheckpointError, LazyTensor, flatten, slots_of

MSGPACK_FILE = 'checkpoint'


def is_legacy(path: epath.Path) -> bool:
  return (path / MSGPACK_FILE).is_file()


def read(path: epath.Path) -> Checkpoint:
  """Returns the parameters and step; arrays stay on disk until `LazyTensor.read`."""
  msgpack_path = path / MSGPACK_FILE
  try:
    contents = serialization.msgpack_restore(msgpack_path.read_bytes())
  except (msgpack.UnpackException, ValueError, TypeError) as e:
    raise CheckpointError(f'{msgpack_path} is not a T5X msgpack checkpoint ({e})') from e
  optimizer = contents.get('optimizer', contents) if isinstance(contents, dict) else None
  if not isinstance(optimizer, dict) or 'target' not in optimizer:
    raise CheckpointError(f"{msgpack_path} has no 'optimizer/target' parameter tree; "
                          'expected a T5X checkpoint written by t5x.checkpoints.Checkpointer')
  context = ts.Context()
  params = _tensors(dict(flatten(optimizer['target'], is_leaf=_is_ts_spec)), path, context)
  state = optimizer.get('state', {})
  param_states = dict(flatten(state.get('param_states', {}), is_leaf=_is_ts_spec))
  slots = _tensors(dict(slots_of(params, param_states)), path, context)
  return Checkpoint(os.fspath(path), 'T5X legacy (msgpack + tensorstore)', params,
                    np.asarray(state.get('step', 0)), slots=slots)


def _tensors(leaves: dict, path: epath.Path, context: ts.Context) -> dict[str, LazyTensor]:
  """Inline arrays as they are; tensorstore specs opened (all at once: opening is concurrent)."""
  opened = {name: ts.open(_absolute_spec(leaf, os.fspath(path)), open=True, read=True,
                          context=context)
            for name, leaf in leaves.items() if _is_ts_spec(leaf)}
  tensors = {}
  for name, leaf in leaves.items():
    if name in opened:
      try:
        tensors[name] = _lazy(opened[name].result())
      except ValueError as e:
        raise CheckpointError(f'cannot open array {name} of {path}: {e}') from e
    else:
      tensors[name] = LazyTensor.of(leaf)
  return tensors


def _lazy(store: ts.TensorStore) -> LazyTensor:
  # T5X writes chunks of <= 64 MiB; each region read decodes exactly one of them.
  return LazyTensor.chunked(store.shape, store.dtype.numpy_dtype,
                            store.chunk_layout.read_chunk.shape,
                            lambda region: store[region].read().result())


def _is_ts_spec(leaf) -> bool:
  return isinstance(leaf, dict) and 'driver' in leaf and 'kvstore' in leaf


def _absolute_spec(spec: dict, directory: str) -> dict:
  """Points a stored spec at `directory`, whatever filesystem or bucket it was written on.

  Like T5X's restore: the relative array path (kvstore.path, or the top-level `path` of
  tensorstore < 0.1.14) is joined to the checkpoint directory; the recorded driver and bucket
  (T5X writes a dummy bucket) are ignored.
  """
  spec = dict(spec)
  kvstore = spec.pop('kvstore')
  relative = kvstore.get('path') if isinstance(kvstore, dict) else None
  relative = relative or spec.pop('path')
  spec.pop('path', None)
  spec.pop('metadata', None)  # Read whatever is stored; the .zarray file is authoritative.
  location = posixpath.join(directory, relative)
  if '://' not in location:
    location = 'file://' + os.path.abspath(location)
  spec['kvstore'] = location.rstrip('/') + '/'
  return spec
