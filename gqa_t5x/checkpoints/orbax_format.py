"""Reads and writes T5X's Orbax checkpoints, a few tensors at a time.

T5X (and this project's runner) keep a checkpoint as `checkpoint_N/state/`, an Orbax PyTree
(OCDBT) of {'target': params, 'state': {'step', 'param_states'}}. Orbax saves a tree in one
call; to keep peak memory at about the largest tensor, the leaves handed to it are `LazyTensor`s
and a small TypeHandler reads, writes and drops them, reading the next ones while writing the
last. That handler records each leaf as 'np.ndarray', so the result restores with stock Orbax and
T5X, no custom code.
"""
import asyncio
import contextlib
import ctypes
import os
from typing import Callable

import jax
import numpy as np
import orbax.checkpoint as ocp
import tensorstore as ts
from etils import epath

from gqa_t5x.checkpoints.base import Checkpoint, CheckpointError, LazyTensor, flatten

STATE_DIR = 'state'
try:
  _MALLOC_TRIM = ctypes.CDLL(None).malloc_trim  # glibc
except (AttributeError, OSError, TypeError):
  _MALLOC_TRIM = None
_METADATA_FILE = '_METADATA'  # Orbax's PyTree metadata file.


def tree_dir(path: epath.Path) -> epath.Path | None:
  """The Orbax PyTree directory of a T5X checkpoint (`path/state`) or of a bare PyTree."""
  for candidate in (path / STATE_DIR, path):
    if (candidate / _METADATA_FILE).is_file():
      return candidate
  return None


def read(path: epath.Path) -> Checkpoint:
  """Returns the parameters and step; every array is restored only on `LazyTensor.read`."""
  directory = tree_dir(path)
  metadata = ocp.PyTreeCheckpointHandler().metadata(directory).tree
  if 'target' not in metadata:
    raise CheckpointError(f"the Orbax checkpoint {directory} has no 'target' parameter tree "
                          f"(top-level keys: {sorted(metadata)}); expected T5X's layout")
  params = {name: LazyTensor(tuple(meta.shape), np.dtype(meta.dtype),
                             _leaf_reader(directory, ('target',) + tuple(name.split('/'))))
            for name, meta in flatten(metadata['target'])}
  step_meta = metadata.get('state', {}).get('step')
  step = _leaf_reader(directory, ('state', 'step'))() if step_meta is not None else 0
  return Checkpoint(os.fspath(path), 'Orbax (T5X state/ PyTree)', params, np.asarray(step))


def _leaf_reader(directory: epath.Path, keys: tuple[str, ...]) -> Callable[[], np.ndarray]:
  """Restores one leaf (Orbax partial restore), as a numpy array on the host."""
  def nest(leaf):
    for key in reversed(keys):
      leaf = {key: leaf}
    return leaf

  def read_leaf() -> np.ndarray:
    restored = ocp.PyTreeCheckpointHandler().restore(directory, args=ocp.args.PyTreeRestore(
        item=nest(0), restore_args=nest(ocp.RestoreArgs(restore_type=np.ndarray)),
        partial_restore=True))
    for key in keys:
      restored = restored[key]
    return np.asarray(restored)
  return read_leaf


class _StreamingHandler(ocp.type_handlers.NumpyHandler):
  """Saves LazyTensor leaves as a pipeline: read, write, drop, call `on_written`.

  Reads (decompression, pooling) of later leaves run in threads while earlier ones are written,
  so both cores stay busy. The leaves held at once (read and not yet written) add up to at most
  the largest leaf: many small kernels overlap, the embedding goes alone, and peak memory stays
  about that of a one-at-a-time save (reading a leaf briefly takes up to twice its size).
  """

  def __init__(self, on_written: Callable[[str, int], None]):
    super().__init__(deepcopy_host_arrays=False)
    self._on_written = on_written
    # Orbax's default context gives OCDBT a 100 MB cache that fills up over a long save; the
    # same context with no cache, shared by every leaf as Orbax shares its own, keeps RSS flat.
    self._context = ts.Context({'file_io_concurrency': {'limit': 128},
                                'cache_pool#ocdbt': {'total_bytes_limit': 0}})

  async def serialize(self, values, infos, args=None):
    args = args or [ocp.SaveArgs()] * len(values)
    return [ocp.future.CommitFutureAwaitingContractedSignals(
        self._stream(values, infos, args), name='gqa_t5x_streaming_save')]

  async def _stream(self, values, infos, args):
    budget = _ByteBudget(max((value.nbytes for value in values), default=0))
    # Leaves are admitted in order; each holds its bytes from its read until its write is done.
    saves = [asyncio.ensure_future(self._save(value, info, arg, budget))
             for value, info, arg in zip(values, infos, args)]
    try:
      await asyncio.gather(*saves)
    except BaseException:  # one leaf failed: stop the others before the error propagates
      for save in saves:
        save.cancel()
      await asyncio.gather(*saves, return_exceptions=True)
      raise

  async def _save(self, value, info, arg, budget):
    async with budget.hold(value.nbytes):
      array = await asyncio.to_thread(value.read)
      if array.shape != value.shape or array.dtype != value.dtype:
        raise CheckpointError(f'{info.name}: read {array.dtype}{list(array.shape)}, '
                              f'expected {value.dtype}{list(value.shape)}')
      await self._background_serialize([array], [info.replace(ts_context=self._context)], [arg])
      self._on_written(info.name, array.nbytes)
      del array
    _return_freed_memory()


def _return_freed_memory() -> None:
  """Hands freed heap pages back to the OS (glibc's malloc_trim; a no-op elsewhere).

  Leaves are read in worker threads, each allocating from its own malloc arena; without this the
  freed buffers stay resident in every arena and peak RSS grows to several times the largest leaf.
  """
  if _MALLOC_TRIM is not None:
    _MALLOC_TRIM(0)


class _ByteBudget:
  """Admits holders in arrival order while their bytes fit `limit` (one is always admitted)."""

  def __init__(self, limit: int):
    self._limit, self._held = limit, 0
    self._turn = asyncio.Lock()  # the next holder in line waits here for room; others queue
    self._freed = asyncio.Condition()

  @contextlib.asynccontextmanager
  async def hold(self, nbytes: int):
    async with self._turn:
      async with self._freed:
        await self._freed.wait_for(lambda: not self._held or self._held + nbytes <= self._limit)
        self._held += nbytes
    try:
      yield
    finally:
      async with self._freed:
        self._held -= nbytes
        self._freed.notify_all()


def write(directory: epath.Path, params: dict[str, LazyTensor], step: np.ndarray,
          on_written: Callable[[str, int], None] = lambda name, nbytes: None) -> None:
  """Creates `directory` with state/ in T5X's layout: target/<params> and state/step (no optimizer).

  Uncompressed: trained weights barely compress (zstd saves a few percent on float32) while
  compressing makes the conversion about four times slower."""
  tree = {'target': {}, 'state': {'step': LazyTensor.of(step)}}
  for name, tensor in params.items():
    node = tree['target']
    *parents, leaf = name.split('/')
    for key in parents:
      node = node.setdefault(key, {})
    node[leaf] = tensor
  registry = ocp.type_handlers.create_type_handler_registry(
      (jax.Array, ocp.type_handlers.ArrayHandler()),  # unused; Orbax warns if a registry lacks it
      (LazyTensor, _StreamingHandler(on_written)))
  # A Composite with one item is what T5X's CheckpointManager writes for a step.
  checkpointer = ocp.Checkpointer(ocp.CompositeCheckpointHandler(
      **{STATE_DIR: ocp.PyTreeCheckpointHandler(type_handler_registry=registry,
                                                use_compression=False)}))
  checkpointer.save(directory, args=ocp.args.Composite(
      **{STATE_DIR: ocp.args.PyTreeSave(tree)}))
