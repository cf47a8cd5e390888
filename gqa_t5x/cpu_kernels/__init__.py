"""XLA:CPU kernels for a cached decode step, compiled for this CPU.

Why: a decode step at serving batch sizes is memory-bound: it reads the cross-attention cache
(2 G d s floats per sample) and every weight once. XLA:CPU's libraries (YNNPACK, Eigen) run the
cache's grouped products ([H/G, d] x [d, s] per batch and kv head) at a third of the read
bandwidth, and the weights' few-row products at a third to a half (docs/benchmarks.md), which
kept GQA's measured speed-up at half of what its bytes allow. decode_step.cc has three kernels,
each streaming its large operand once on all cores (XLA's intra-op thread pool):
- attention: scores, softmax and the value mix per (batch, kv head) in one pass;
- matmul: x [m, k] @ w [k, n] for a few rows m, the weight read in column strips;
- argmax: each row's first maximum, for greedy decoding over the vocabulary.

`gqa_t5x.attention.cached_attention`, `gqa_t5x.layers.step_dense` and
`gqa_t5x.decoding.first_argmax` call them through `on_cpu`, which keeps XLA's ops on other
platforms and wherever the kernels cannot be built. The library is compiled with the system C++
compiler on first use and kept in a cache keyed by source, jaxlib and CPU; without a compiler a
warning says why, once, and XLA's ops run.
"""
import ctypes
import functools
import hashlib
import importlib.resources
import os
import platform
import shutil
import subprocess
import tempfile

from absl import logging
import jax
import jax.numpy as jnp
import jaxlib

Array = jax.Array

SOURCE = 'decode_step.cc'
ATTENTION_TARGET = 'gqa_t5x_attention'
MATMUL_TARGET = 'gqa_t5x_matmul'
ARGMAX_TARGET = 'gqa_t5x_argmax'
_FLAGS = ('-O3', '-march=native', '-shared', '-fPIC', '-std=c++17')
_DISABLE_ENV = 'GQA_T5X_CPU_KERNELS'  # '0' turns the kernels off process-wide


def cache_dir() -> str:
  """Where built libraries are kept: $GQA_T5X_KERNEL_CACHE, else the user's cache directory (if
  it cannot be written, _build uses a per-user directory under the system's temporary one)."""
  return os.environ.get('GQA_T5X_KERNEL_CACHE') or os.path.join(
      os.environ.get('XDG_CACHE_HOME') or os.path.expanduser('~/.cache'), 'gqa_t5x', 'kernels')


def _cpu_identity() -> bytes:
  """-march=native code runs only on CPUs with the same features: key the build by them."""
  try:
    with open('/proc/cpuinfo', 'rb') as f:
      lines = [l for l in f.read().splitlines() if l.startswith((b'model name', b'flags'))]
    return b'\n'.join(sorted(set(lines)))
  except OSError:
    return platform.processor().encode()


def _build(source: bytes) -> str:
  """Compiles `source` into the cache (once per source, jaxlib and CPU) and returns its path."""
  compiler = os.environ.get('CXX', 'g++')
  if shutil.which(compiler) is None:
    raise RuntimeError(f'no C++ compiler {compiler!r} on PATH (set CXX to one)')
  key = hashlib.sha256(b'\0'.join(
      [source, jaxlib.__version__.encode(), ' '.join(_FLAGS).encode(), compiler.encode(),
       _cpu_identity()])).hexdigest()[:16]
  for directory in (cache_dir(), os.path.join(tempfile.gettempdir(), f'gqa_t5x-{os.getuid()}')):
    path = os.path.join(directory, f'decode_step-{key}.so')
    if os.path.exists(path):
      return path
    try:
      os.makedirs(directory, exist_ok=True)
      if os.access(directory, os.W_OK):
        break
    except OSError:
      pass  # a read-only home: build in the temporary directory instead
  logging.info('Compiling the gqa_t5x CPU decode kernel into %s (once per machine).', path)
  with tempfile.TemporaryDirectory(dir=directory) as tmp:
    src = os.path.join(tmp, SOURCE)
    with open(src, 'wb') as f:
      f.write(source)
    out = os.path.join(tmp, 'decode_step.so')
    result = subprocess.run([compiler, *_FLAGS, '-I', jax.ffi.include_dir(), src, '-o', out],
                            capture_output=True, text=True)
    if result.returncode:
      raise RuntimeError(f'{compiler} failed:\n{result.stderr[-2000:]}')
    os.replace(out, path)  # atomic: concurrent builders each publish a complete library
  return path


@functools.cache
def available() -> bool:
  """Builds, loads and registers the kernel once per process; False (with a warning) if not."""
  if os.environ.get(_DISABLE_ENV, '1') == '0':
    return False
  try:
    source = importlib.resources.files(__package__).joinpath(SOURCE).read_bytes()
    library = ctypes.CDLL(_build(source))
  except (OSError, RuntimeError) as e:
    logging.warning('gqa_t5x CPU decode kernel unavailable, using XLA ops instead: %s', e)
    return False
  jax.ffi.register_ffi_target(ATTENTION_TARGET,
                              jax.ffi.pycapsule(library.GqaAttention), platform='cpu')
  # Its operands all lead with the batch: a batch-sharded step runs it per shard.
  jax.ffi.register_ffi_target_as_batch_partitionable(ATTENTION_TARGET)
  # No batch dimension is shared by x and the weight: on a sharded mesh XLA gathers x and runs
  # the product once per device (decode steps are small; a CPU mesh is slower than one device).
  jax.ffi.register_ffi_target(MATMUL_TARGET, jax.ffi.pycapsule(library.GqaMatmul), platform='cpu')
  jax.ffi.register_ffi_target(ARGMAX_TARGET, jax.ffi.pycapsule(library.GqaArgmax), platform='cpu')
  jax.ffi.register_ffi_target_as_batch_partitionable(ARGMAX_TARGET)  # rows are independent
  return True


def on_cpu(kernel, otherwise, *args):
  """kernel(*args) where the computation is lowered for CPU and the kernel is built, else
  otherwise(*args) (the XLA ops it replaces). Nothing is built where JAX's default backend is not
  the CPU."""
  if jax.default_backend() != 'cpu' or not available():
    return otherwise(*args)
  return jax.lax.platform_dependent(*args, cpu=kernel, default=otherwise)


def _require() -> None:
  if not available():
    raise RuntimeError('the gqa_t5x CPU decode kernels could not be built (see the warning above); '
                       'call them through on_cpu to fall back to XLA\'s ops')


def attention(query: Array, keys: Array, values: Array, bias: Array) -> Array:
  """The kernel (CPU only, float32, through on_cpu): one query position of grouped attention over
  a cache, softmax(query . keys + bias) . values.

  query [b, k, g, d]; keys, values [b, k, d, s] (the cache layout); bias [b, s] (one row for
  every head) or [b, k, g, s]. Returns [b, k, g, d].
  """
  _require()
  return jax.ffi.ffi_call(ATTENTION_TARGET, jax.ShapeDtypeStruct(query.shape, query.dtype),
                          vmap_method='sequential')(query, keys, values, bias)


def matmul(x: Array, w: Array) -> Array:
  """The kernel (CPU only, float32, through on_cpu): x [m, k] @ w [k, n] for the few rows m of a
  decode step."""
  _require()
  return jax.ffi.ffi_call(MATMUL_TARGET, jax.ShapeDtypeStruct((x.shape[0], w.shape[1]), x.dtype),
                          vmap_method='sequential')(x, w)


def argmax(x: Array) -> Array:
  """The kernel (CPU only, float32, through on_cpu): int32 index of each row's first maximum of
  x [m, n], or of its first NaN where it has one (numpy's argmax)."""
  _require()
  return jax.ffi.ffi_call(ARGMAX_TARGET, jax.ShapeDtypeStruct(x.shape[:1], jnp.int32),
                          vmap_method='sequential')(x)
