"""The CPU decode kernels (gqa_t5x/cpu_kernels) against float64 numpy, and the decode they speed
up against the same decode on XLA's einsums."""
import ctypes
import dataclasses
import functools
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gqa_t5x import cpu_kernels
from gqa_t5x.decoding import first_argmax, greedy_decode
from gqa_t5x.network import T5Config, Transformer
from tests import reference

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def numpy_attention(q, keys, values, bias):
  """softmax(q . keys + bias) . values per (batch, kv head), in float64; bias [b, s] (every
  head's) or [b, k, g, s]."""
  q, keys, values, bias = (np.asarray(a, np.float64) for a in (q, keys, values, bias))
  scores = np.einsum('bkgd,bkds->bkgs', q, keys) + (bias if bias.ndim == 4 else
                                                     bias[:, None, None, :])
  return np.einsum('bkgs,bkds->bkgd', reference.softmax(scores), values)


def test_the_kernel_builds_here():
  assert cpu_kernels.available(), 'CI has g++: the kernel must build, or nothing below is tested'


# The tilings the kernels choose by CPU, as (floats per vector, register-tile sums): AVX-512's,
# AVX2's and NEON's. Each is built here, whatever this CPU is, so that every tiling's tile and tail
# boundaries are checked on every machine; None is the library as built for this CPU.
TILINGS = [None, (16, 24), (8, 12), (4, 24)]


@functools.cache
def tiled_kernels(tiling):
  """(attention, matmul) calling the kernels built with `tiling` (None: for this CPU)."""
  if tiling is None:
    return cpu_kernels.attention, cpu_kernels.matmul
  lanes, sums = tiling
  with open(os.path.join(os.path.dirname(cpu_kernels.__file__), cpu_kernels.SOURCE), 'rb') as f:
    source = (f'#define GQA_T5X_VECTOR_FLOATS {lanes}\n#define GQA_T5X_TILE_SUMS {sums}\n'.encode()
              + f.read())
  handlers = ctypes.CDLL(cpu_kernels._build(source))  # pylint: disable=protected-access
  attention, matmul = f'test_attention_{lanes}x{sums}', f'test_matmul_{lanes}x{sums}'
  jax.ffi.register_ffi_target(attention, jax.ffi.pycapsule(handlers.GqaAttention),
                              platform='cpu')
  jax.ffi.register_ffi_target(matmul, jax.ffi.pycapsule(handlers.GqaMatmul), platform='cpu')
  return (lambda q, *rest: jax.ffi.ffi_call(attention, jax.ShapeDtypeStruct(q.shape, q.dtype))(
              q, *rest),
          lambda x, w: jax.ffi.ffi_call(matmul, jax.ShapeDtypeStruct(
              (x.shape[0], w.shape[1]), x.dtype))(x, w))


# Shapes that exercise every path of the kernel: g below, at and above its 4- and 8-row tiles,
# key lengths with and without a tail past whole 16-float vectors and 48-float tiles, head dims
# past whole 3-row value tiles (for 16-float vectors; with 8 or 4, other boundaries of the same).
@pytest.mark.parametrize('tiling', TILINGS)
@pytest.mark.parametrize('b, k, g, d, s', [
    (2, 4, 1, 64, 2048),  # MHA-like: one query head per kv head
    (3, 2, 8, 16, 96),    # GQA: whole tiles
    (1, 2, 13, 20, 100),  # 8-, 4- and 1-head tiles; two 48-key tiles and a 4-key tail
    (1, 2, 8, 20, 1100),  # 8 or more heads: the mix in chunks of 512, 512 and 64 keys, a tail
    (1, 1, 64, 8, 48),    # MQA: many query heads share one kv head
    # 32 or more query heads per kv head (head dim up to 64): the heads along the vectors.
    (2, 1, 64, 64, 2048),  # T5-XXL's MQA: 6- and 4-row tiles of 4 head vectors, a 2-key tail,
                           # key rows in two passes of 32
    (1, 2, 48, 20, 100),  # 3 head vectors, 8-row tiles; probabilities in chunks of 64 and 36
    (1, 1, 80, 9, 70),    # 4 head vectors then 1 (24-row tiles); 4- and 1-row tails
    (1, 1, 32, 16, 130),  # 2 head vectors, 12-row tiles
    (1, 1, 32, 48, 70),   # key rows summed in passes of 32 and 16
    (1, 1, 16, 64, 50),   # one head vector: the [g, s] layout again
    (1, 1, 64, 72, 40),   # head dim past 64: the [g, s] layout again
    (2, 3, 5, 12, 37),    # tails everywhere
    (1, 2, 3, 7, 5),      # fewer keys than one vector
])
@pytest.mark.parametrize('per_head', [False, True], ids=['padding-bias', 'per-head-bias'])
def test_kernel_matches_float64_softmax_attention(b, k, g, d, s, tiling, per_head):
  rng = np.random.default_rng(s)
  # Scores of unit scale, as T5's depth-scaled query init gives: unscaled, at head dim 64 they
  # reach +-30 and float32 scores alone are 5e-6 off (in either layout).
  q = (rng.normal(size=(b, k, g, d)) / np.sqrt(d)).astype(np.float32)
  keys = rng.normal(size=(b, k, d, s)).astype(np.float32)
  values = rng.normal(size=(b, k, d, s)).astype(np.float32)
  # Cross-attention's encoder padding (one row for every head), or self-attention's relative
  # position bias and causal mask (a row per head).
  shape = (b, k, g, s) if per_head else (b, s)
  bias = np.where(rng.random(shape) < 0.3, -1e10, rng.normal(size=shape) if per_head else 0.0)
  bias = bias.astype(np.float32)
  bias[..., 0] = 0  # every row attends somewhere
  got = jax.jit(tiled_kernels(tiling)[0])(q, keys, values, bias)
  np.testing.assert_allclose(got, numpy_attention(q, keys, values, bias), rtol=2e-5,
                             atol=2e-6)


# Rows below, at and past the 8- and 4-row tiles and 16-row passes; weight rows past whole 32-row
# blocks; columns in one strip or several (up to 1024 wide), in whole 3-vector tiles and past
# them, with a last strip that is wider and has a tail past whole vectors, or narrower than one
# vector (for 16-float vectors; with 8 or 4, other boundaries of the same).
@pytest.mark.parametrize('tiling', TILINGS)
@pytest.mark.parametrize('m, k, n', [
    (16, 512, 1024),  # a decode step's shape: whole row tiles, strips and blocks
    (1, 70, 1030),    # one row; blocks of 32, 32 and 6; strips, the last with a 6-column tail
    (17, 33, 300),    # a 16-row pass (two 8-row tiles) and a 1-row pass
    (13, 37, 2100),   # 8-, 4- and 1-row tiles; blocks of 32 and 5; 1024-column strips
    (40, 5, 16),      # three passes; one vector of columns
    (3, 1, 7),        # a single weight row, fewer columns than a vector
])
def test_matmul_matches_float64(m, k, n, tiling):
  rng = np.random.default_rng(m * n + k)
  x = rng.normal(size=(m, k)).astype(np.float32)
  w = rng.normal(size=(k, n)).astype(np.float32)
  got = jax.jit(tiled_kernels(tiling)[1])(x, w)
  want = np.asarray(x, np.float64) @ np.asarray(w, np.float64)
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5 * np.sqrt(k))


# Rows of whole vectors, with a tail past them, and shorter than one vector; the kernel and the
# max-then-min fallback alike.
@pytest.mark.parametrize('cpu_kernel', [True, False])
@pytest.mark.parametrize('n', [64, 50, 7])
def test_first_argmax_is_numpy_argmax_with_ties_infinities_and_nans(cpu_kernel, n):
  rng = np.random.default_rng(n)
  logits = rng.normal(size=(7, n)).astype(np.float32)
  logits[0, [3, n - 2]] = 10.0  # a tie: the first wins
  logits[1, [n - 1, 2]] = np.nan  # the first NaN, as numpy's argmax
  logits[2, n // 2] = np.inf
  logits[3] = -np.inf  # all equal: index 0
  logits[4, n - 1] = 10.0  # the last position
  logits[5, n - 1] = np.nan  # a NaN in the last position only
  argmax = jax.jit(lambda x: first_argmax(x, cpu_kernel))
  assert (cpu_kernels.ARGMAX_TARGET in argmax.lower(logits).compile().as_text()) == cpu_kernel
  np.testing.assert_array_equal(argmax(logits), np.argmax(logits, axis=-1))


@pytest.mark.parametrize('g', [2, 32])  # probabilities laid out [g, s], and [s, g]
def test_masked_keys_weigh_nothing_and_a_fully_masked_row_averages_all(g):
  rng = np.random.default_rng(0)
  b, k, d, s = 2, 1, 4, 40
  q = rng.normal(size=(b, k, g, d)).astype(np.float32)
  keys = rng.normal(size=(b, k, d, s)).astype(np.float32)
  values = rng.normal(size=(b, k, d, s)).astype(np.float32)
  bias = np.zeros((b, s), np.float32)
  bias[0, 20:] = -1e10  # row 0: only the first 20 keys; row 1 all masked (XLA: uniform weights)
  bias[1, :] = -1e10
  got = np.asarray(jax.jit(cpu_kernels.attention)(q, keys, values, bias))
  np.testing.assert_allclose(got[0], numpy_attention(
      q[:1], keys[:1, ..., :20], values[:1, ..., :20], bias[:1, :20])[0], rtol=2e-5, atol=2e-6)
  np.testing.assert_allclose(got[1], np.broadcast_to(values[1].mean(-1)[:, None, :], (k, g, d)),
                             rtol=2e-5, atol=2e-6)


def _decode_setup(kernels: bool, kv_heads: int):
  cfg = T5Config(vocab_size=67, emb_dim=32, num_heads=8, num_encoder_layers=1,
                 num_decoder_layers=2, head_dim=8, mlp_dim=48, dropout_rate=0.0,
                 num_decoder_self_kv_heads=kv_heads, num_decoder_cross_kv_heads=kv_heads,
                 cpu_decode_kernels=kernels)
  tokens = jnp.asarray(np.random.default_rng(1).integers(2, 67, (3, 21)), jnp.int32)
  tokens = tokens.at[1, 15:].set(0)  # padding: the cross-attention bias masks it
  model = Transformer(cfg)
  params = model.init(jax.random.key(0), tokens, tokens[:, :6], tokens[:, :6])['params']
  return model, params, tokens


@pytest.mark.parametrize('kv_heads', [8, 1])
def test_greedy_decode_with_the_kernels_equals_decode_on_einsums(kv_heads):
  model, params, tokens = _decode_setup(True, kv_heads)
  reference_model = Transformer(dataclasses.replace(model.config, cpu_decode_kernels=False))
  compiled = greedy_decode.lower(model, params, tokens, max_decode_length=9).compile()
  reference_compiled = greedy_decode.lower(reference_model, params, tokens,
                                           max_decode_length=9).compile()
  # The kernel paths are taken: the self- and the cross-attention of each decoder layer; per
  # layer the query, key, value and out projections of the self-attention, the query and out
  # projections of the cross-attention, the MLP's three kernels, and the logits and their argmax
  # once: counted in the loop's steps.
  text = compiled.as_text()
  assert text.count(f'custom_call_target="{cpu_kernels.ARGMAX_TARGET}"') >= 1
  assert text.count(f'custom_call_target="{cpu_kernels.ATTENTION_TARGET}"') >= 2 * 2
  assert text.count(f'custom_call_target="{cpu_kernels.MATMUL_TARGET}"') >= 2 * 9 + 1
  assert 'custom_call_target="gqa_t5x' not in reference_compiled.as_text()
  np.testing.assert_array_equal(compiled(params, tokens), reference_compiled(params, tokens))


def test_bfloat16_decode_keeps_the_einsums_but_for_the_float32_logits():
  model, params, tokens = _decode_setup(True, 2)
  bf16 = Transformer(dataclasses.replace(model.config, dtype=jnp.bfloat16))
  text = greedy_decode.lower(bf16, params, tokens, max_decode_length=5).compile().as_text()
  assert cpu_kernels.ATTENTION_TARGET not in text
  calls = [line for line in text.splitlines() if cpu_kernels.MATMUL_TARGET in line]
  assert calls and all('f32[32,67]' in line for line in calls)  # only the [emb, vocab] logits


def test_bfloat16_parameters_decode_as_with_the_einsums():
  # T5X's infer restores parameters as bfloat16 (RestoreCheckpointConfig.dtype) for a float32
  # model: every kernel is cast to float32 before a decode kernel reads it.
  model, params, tokens = _decode_setup(True, 2)
  params = jax.tree.map(lambda p: p.astype(jnp.bfloat16), params)
  reference_model = Transformer(dataclasses.replace(model.config, cpu_decode_kernels=False))
  np.testing.assert_array_equal(greedy_decode(model, params, tokens, max_decode_length=7),
                                greedy_decode(reference_model, params, tokens, max_decode_length=7))


def test_decode_step_logits_with_the_kernel_equal_the_einsums():
  model, params, tokens = _decode_setup(True, 2)
  reference_model = Transformer(dataclasses.replace(model.config, cpu_decode_kernels=False))

  def three_steps(params, tokens, m):
    """Logits of three cached steps (the first fills the cross-attention cache)."""
    _, state = m.apply({'params': params}, tokens, jnp.zeros((3, 9), jnp.int32),
                       jnp.zeros((3, 9), jnp.int32), decode=True, enable_dropout=False,
                       mutable=['cache'])
    encoded = m.apply({'params': params}, tokens, enable_dropout=False, method=Transformer.encode)
    cache, out = jax.tree.map(jnp.zeros_like, state['cache']), []
    for i in range(3):
      step_inputs = tokens[:, i:i + 1]
      logits, variables = m.apply({'params': params, 'cache': cache}, encoded, tokens,
                                  step_inputs, step_inputs, enable_dropout=False, decode=True,
                                  max_decode_length=9, mutable=['cache'],
                                  method=Transformer.decode)
      cache = variables['cache']
      out.append(logits)
    return jnp.stack(out)

  three_steps = jax.jit(three_steps, static_argnums=2)
  np.testing.assert_allclose(three_steps(params, tokens, model),
                             three_steps(params, tokens, reference_model), rtol=1e-5, atol=1e-5)


def test_batch_sharded_decode_runs_the_kernel_per_shard():
  from jax.sharding import Mesh, NamedSharding, PartitionSpec
  assert jax.device_count() >= 2, 'tests/conftest.py sets 8 host devices'
  model, params, tokens = _decode_setup(True, 2)
  tokens = jnp.concatenate([tokens, tokens[::-1]])[:4]  # a batch the mesh divides
  mesh = Mesh(np.array(jax.devices()[:2]), ('data',))
  sharded = jax.device_put(tokens, NamedSharding(mesh, PartitionSpec('data')))
  want = greedy_decode(model, params, tokens, max_decode_length=7)
  np.testing.assert_array_equal(greedy_decode(model, params, sharded, max_decode_length=7), want)


def test_without_a_compiler_decode_warns_once_and_uses_the_einsums(tmp_path):
  script = (
      'import jax, jax.numpy as jnp\n'
      'from gqa_t5x import cpu_kernels\n'
      'from gqa_t5x.attention import cached_attention\n'
      'x = jnp.ones((1, 1, 1, 2, 4)); kv = jnp.ones((1, 1, 4, 16))\n'
      'out = jax.jit(cached_attention)(x, kv, kv, None)\n'
      'print(cpu_kernels.available(), float(out.sum()))\n')
  env = dict(os.environ, CXX=str(tmp_path / 'no-such-compiler'),
             GQA_T5X_KERNEL_CACHE=str(tmp_path / 'cache'), PYTHONPATH=ROOT)
  result = subprocess.run([sys.executable, '-c', script], env=env, capture_output=True, text=True,
                          check=True)
  assert result.stdout.split() == ['False', '8.0']  # softmax weights sum to 1: 2 heads x 4 dims
  assert result.stderr.count('CPU decode kernel unavailable') == 1
  assert 'no-such-compiler' in result.stderr
  assert not (tmp_path / 'cache').exists()  # nothing half-built is left behind


def test_an_unusable_cache_directory_builds_in_the_temporary_directory(tmp_path):
  not_a_directory = tmp_path / 'a-file'
  not_a_directory.write_text('')  # a cache path under a file cannot be created, even by root
  env = dict(os.environ, GQA_T5X_KERNEL_CACHE=str(not_a_directory / 'kernels'),
             TMPDIR=str(tmp_path), PYTHONPATH=ROOT)
  result = subprocess.run(
      [sys.executable, '-c', 'from gqa_t5x import cpu_kernels; print(cpu_kernels.available())'],
      env=env, capture_output=True, text=True, check=True)
  assert result.stdout.strip() == 'True', result.stderr[-3000:]
  assert len(os.listdir(tmp_path / f'gqa_t5x-{os.getuid()}')) == 1
