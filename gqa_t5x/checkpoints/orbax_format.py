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
import dataclasses
import os
from typing import Callable, Collection

import jax
import numpy as np
import orbax.checkpoint as ocp
import tensorstore as ts
from etils import epath

from gqa_t5x.checkpoints.base import (Checkpoint, CheckpointError, LazyTensor, flatten,
                                     slots_of, unflatten)

STATE_DIR = 'state'
try:
  _LIBC = ctypes.CDLL(None)
  _MALLOC_TRIM, _MALLOPT = _LIBC.malloc_trim, _LIBC.mallopt  # glibc
except (AttributeError, OSError, TypeError):
  _MALLOC_TRIM = _MALLOPT = None
_M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter number
_METADATA_FILE = '_METADATA'  # Orbax's PyTree metadata file.


def tree_dir(path: epath.Path) -> epath.Path | None:
  """The Orbax PyTree directory of a T5X checkpoint (`path/state`) or of a bare PyTree."""
  for candidate in (path / STATE_DIR, path):
    if (candidate / _METADATA_FILE).is_file():
      return candidate
  return None


def read(path: epath.Path) -> Checkpoint:
  """Returns the parameters, optimizer slots and step; every array is restored only on
  `LazyTensor.read`."""
  directory = tree_dir(path)
  metadata = ocp.PyTreeCheckpointHandler().metadata(directory).tree
  if 'target' not in metadata:
    raise CheckpointError(f"the Orbax checkpoint {directory} has no 'target' parameter tree "
                          f"(top-level keys: {sorted(metadata)}); expected T5X's layout")

  def lazy(name, meta):
    return LazyTensor(tuple(meta.shape), np.dtype(meta.dtype),
                      lambda: read_leaves(directory, [name], metadata)[name])

  params = {name: lazy(f'target/{name}', meta) for name, meta in flatten(metadata['target'])}
  state = metadata.get('state', {})
  param_states = state.get('param_states', {})
  if isinstance(param_states, list):  # the runner's optax chain state: its first element
    param_states = {'0': param_states[0]}
  slots = {name: lazy(f'state/param_states/{stored}', meta) for (name, (stored, meta)) in
           slots_of(params, {n: (n, meta) for n, meta in flatten(param_states or {})})}
  step = read_leaves(directory, ['state/step'], metadata)['state/step'] if 'step' in state else 0
  return Checkpoint(os.fspath(path), 'Orbax (T5X state/ PyTree)', params, np.asarray(step),
                    slots=slots)


def read_leaves(directory: epath.Path, names: Collection[str],
                metadata: dict | None = None) -> dict[str, np.ndarray]:
  """Restores only the named leaves ('target/...', 'state/step'), as numpy arrays on the host.

  Orbax's partial restore may leave out dict entries but needs every list (an optax chain state)
  at its stored length, so the request mirrors the stored tree with None where nothing is read.
  """
  wanted = set(names)
  if metadata is None:
    metadata = ocp.PyTreeCheckpointHandler().metadata(directory).tree

  def request(node, name):
    if isinstance(node, dict):
      kept = {k: request(v, f'{name}{k}/') for k, v in node.items()}
      return {k: v for k, v in kept.items() if v is not None} or None
    if isinstance(node, (list, tuple)):
      kept = [request(v, f'{name}{i}/') for i, v in enumerate(node)]
      return kept if any(v is not None for v in kept) else None
    return ocp.RestoreArgs(restore_type=np.ndarray) if name[:-1] in wanted else None

  restore_args = request(metadata, '')
  restored = ocp.PyTreeCheckpointHandler().restore(directory, args=ocp.args.PyTreeRestore(
      item=jax.tree.map(lambda _: 0, restore_args), restore_args=restore_args,
      partial_restore=True))
  leaves = {}
  for name in wanted:
    node = restored
    for key in name.split('/'):
      node = node[int(key)] if isinstance(node, list) else node[key]
    leaves[name] = np.asarray(node)
  return leaves


class _StreamingHandler(ocp.type_handlers.NumpyHandler):
  """Saves LazyTensor leaves as a pipeline: read, write, drop, call `on_written`.

  Reads (decompression, pooling) of later leaves run in threads while earlier ones are written,
  so both cores stay busy. The bytes held at once (read and not yet written) add up to at most
  the largest leaf or stored chunk: many small kernels overlap, and a tensor stored in several
  chunks (the embedding of a T5X legacy checkpoint) is copied one chunk at a time into an array
  chunked alike, so that peak memory is set by a chunk rather than by the largest tensor.
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
    budget = _ByteBudget(max((value.chunk_nbytes for value in values), default=0))
    writes = []
    # Leaves are admitted in order; each holds its bytes from its read until its write is done.
    saves = [asyncio.ensure_future(self._save(value, info, arg, budget, writes))
             for value, info, arg in zip(values, infos, args)]
    try:
      await asyncio.gather(*saves)
    except BaseException:
      # One leaf failed: cancel the leaves not yet writing, and let the writes under way finish,
      # so that nothing is still writing into the directory when the caller removes it.
      for save in saves:
        save.cancel()
      await asyncio.gather(*saves, return_exceptions=True)
      await asyncio.gather(*writes, return_exceptions=True)
      raise

  async def _save(self, value, info, arg, budget, writes):
    async with budget.hold(value.chunk_nbytes):
      if value.chunk_nbytes < value.nbytes:
        # Chunked as stored (Orbax picks the same divisors of the shape as T5X did), then read
        # and written region by region in _open_and_write.
        array = _Streamed(value, info.name)
        arg = dataclasses.replace(arg, chunk_byte_size=value.chunk_nbytes)
      else:
        array = _checked(await asyncio.to_thread(value.read), value.shape, value.dtype, info.name)
      writes.append(asyncio.ensure_future(self._background_serialize(
          [array], [info.replace(ts_context=self._context)], [arg])))
      await asyncio.shield(writes[-1])  # a cancel stops the wait here, not the write
      self._on_written(info.name, value.nbytes)
      del array
    _return_freed_memory()

  async def _open_and_write(self, value, tspec, ts_context):
    if not isinstance(value, _Streamed):
      return await super()._open_and_write(value, tspec, ts_context)
    store = await ts.open(ts.Spec(tspec), create=True, open=True, context=ts_context)
    for region in value.tensor.regions():
      shape = tuple(r.stop - r.start for r in region)
      chunk = _checked(await asyncio.to_thread(value.tensor.read_region, region), shape,
                       value.dtype, f'{value.name} {region}')
      await store[region].write(chunk, can_reference_source_data_indefinitely=True)
      del chunk


@dataclasses.dataclass(frozen=True)
class _Streamed:
  """A chunked tensor handed to Orbax in place of its array: Orbax reads only shape and dtype."""
  tensor: LazyTensor
  name: str

  @property
  def shape(self):
    return self.tensor.shape

  @property
  def dtype(self):
    return self.tensor.dtype


def _checked(array: np.ndarray, shape, dtype, name: str) -> np.ndarray:
  if array.shape != tuple(shape) or array.dtype != dtype:
    raise CheckpointError(f'{name}: read {array.dtype}{list(array.shape)}, '
                          f'expected {np.dtype(dtype)}{list(shape)}')
  return array


def map_large_buffers(threshold: int = 1 << 20) -> None:
  """Has glibc serve every allocation of `threshold` bytes or more by mmap, for the whole process.

  Why: glibc's own threshold rises to 32 MiB after the first large buffer is freed, and from then
  on tensor-sized buffers come from the heap arenas, which keep their peak; a mapped buffer goes
  back to the OS when it is freed. On a T5.1.1-Large conversion this cut peak RSS from 552 to
  474 MiB (docs/benchmarks.md). The converter's command sets it; a library caller
  decides for its own process. A no-op without glibc.
  """
  if _MALLOPT is not None:
    _MALLOPT(_M_MMAP_THRESHOLD, threshold)


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
          slots: dict[str, LazyTensor] | None = None,
          on_written: Callable[[str, int], None] = lambda name, nbytes: None) -> None:
  """Creates `directory` with state/ in T5X's layout: target/<params>, state/step and, if any,
  the optimizer slots as state/param_states/<parameter>/<slot>.

  Uncompressed: trained weights barely compress (zstd saves a few percent on float32) while
  compressing makes the conversion about four times slower."""
  tree = {'target': unflatten(params), 'state': {'step': LazyTensor.of(step)}}
  if slots:
    tree['state']['param_states'] = unflatten(slots)
  registry = ocp.type_handlers.create_type_handler_registry(
      (jax.Array, ocp.type_handlers.ArrayHandler()),  # unused; Orbax warns if a registry lacks it
      (LazyTensor, _StreamingHandler(on_written)))
  # A Composite with one item is what T5X's CheckpointManager writes for a step.
  checkpointer = ocp.Checkpointer(ocp.CompositeCheckpointHandler(
      **{STATE_DIR: ocp.PyTreeCheckpointHandler(type_handler_registry=registry,
                                                use_compression=False)}))
  checkpointer.save(directory, args=ocp.args.Composite(
      **{STATE_DIR: ocp.args.PyTreeSave(tree)}))
