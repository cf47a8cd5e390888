"""What every checkpoint format hands to the converter: tensors that are read only when needed.

Keeping tensors lazy is what lets an 11B-parameter checkpoint convert with about one tensor in
memory: shapes and dtypes are known (and validated) before any data is read.
"""
import dataclasses
import itertools
from typing import Callable, Iterator

import numpy as np

from gqa_t5x import errors


class CheckpointError(errors.ConfigError):
  """A user-facing problem with a checkpoint or a request; the message is one line."""


Region = tuple[slice, ...]


@dataclasses.dataclass(frozen=True)
class LazyTensor:
  """An array's shape and dtype, and a function that reads (or computes) its values.

  A tensor stored in chunks (T5X's legacy zarr arrays) also gives its chunk shape and a reader of
  one region, so that a writer can copy it chunk by chunk, holding one chunk instead of the whole
  array (the 126 MiB embedding of T5.1.1-Large is stored as two 63 MiB chunks).
  """
  shape: tuple[int, ...]
  dtype: np.dtype
  read: Callable[[], np.ndarray]
  chunk_shape: tuple[int, ...] | None = None
  read_region: Callable[[Region], np.ndarray] | None = None

  @property
  def size(self) -> int:
    return int(np.prod(self.shape, dtype=np.int64))

  @property
  def nbytes(self) -> int:
    return self.size * np.dtype(self.dtype).itemsize

  @property
  def chunk_nbytes(self) -> int:
    """The bytes of the largest region `regions` yields (the whole array if not chunked)."""
    if self.chunk_shape is None:
      return self.nbytes
    return int(np.prod(np.minimum(self.chunk_shape, self.shape), dtype=np.int64)) * (
        np.dtype(self.dtype).itemsize)

  def regions(self) -> Iterator[Region]:
    """The stored chunks' regions, in C order (one region, the whole array, if not chunked)."""
    chunk = self.chunk_shape or self.shape
    for corner in itertools.product(*(range(0, n, c) for n, c in zip(self.shape, chunk))):
      yield tuple(slice(start, min(start + c, n)) for start, c, n in zip(corner, chunk, self.shape))

  @classmethod
  def of(cls, array: np.ndarray) -> 'LazyTensor':
    array = np.asarray(array)
    return cls(array.shape, array.dtype, lambda: array)

  @classmethod
  def chunked(cls, shape, dtype, chunk_shape, read_region: Callable[[Region], np.ndarray]
              ) -> 'LazyTensor':
    """A tensor read one stored chunk at a time, whole (`read`) or region by region.

    Reading whole fills one preallocated array: a plain tensorstore read decodes every chunk at
    once and copies the result, about twice the array's size on top of it; here the extra is one
    chunk.
    """
    def read() -> np.ndarray:
      array = np.empty(shape, dtype)
      for region in tensor.regions():
        array[region] = read_region(region)
      return array
    tensor = cls(tuple(shape), np.dtype(dtype), read, tuple(chunk_shape), read_region)
    return tensor


# T5X's Adafactor slots of one parameter: second moments (factored or not) and momentum.
SLOT_NAMES = ('v_row', 'v_col', 'v', 'm')


@dataclasses.dataclass(frozen=True)
class Checkpoint:
  """A T5X checkpoint's parameters (flat 'encoder/layers_0/...' names, no 'target/') and step.

  slots: the optimizer slots stored for those parameters, flat '<parameter>/<slot>' names
  (T5X's state/param_states layout without its prefix). Formats that describe their model
  (HuggingFace's config.json) also give the network's T5Config fields (model_config) and the
  description they were read from (source_config).
  """
  path: str
  format: str
  params: dict[str, LazyTensor]
  step: np.ndarray
  model_config: dict | None = None
  source_config: dict | None = None
  slots: dict[str, LazyTensor] = dataclasses.field(default_factory=dict)


def slots_of(params: dict, param_states: dict):
  """Yields ('<parameter>/<slot>', leaf) for the slots of `params` in a flat param_states dict.

  Reads T5X's layout (<parameter>/<slot>) and gqa_t5x's runner's (optax's chain state:
  0/<parameter>/<slot>, beside step counts, which are skipped).
  """
  for name, leaf in param_states.items():
    param, _, slot = name.removeprefix('0/').rpartition('/')
    if param in params and slot in SLOT_NAMES:
      yield f'{param}/{slot}', leaf


def flatten(tree: dict, prefix: str = '', is_leaf=lambda value: False):
  """Yields ('encoder/layers_0/attention/key/kernel', leaf) for a nested dict of a checkpoint.

  None (T5X's placeholder for an absent leaf) is skipped; `is_leaf` keeps a dict whole (e.g. a
  tensorstore spec).
  """
  for key, value in tree.items():
    if isinstance(value, dict) and not is_leaf(value):
      yield from flatten(value, f'{prefix}{key}/', is_leaf)
    elif value is not None:
      yield f'{prefix}{key}', value


def unflatten(flat: dict) -> dict:
  """The nested dict of flat 'encoder/layers_0/...' names: flatten's inverse."""
  tree = {}
  for name, value in flat.items():
    *parents, leaf = name.split('/')
    node = tree
    for key in parents:
      node = node.setdefault(key, {})
    node[leaf] = value
  return tree
