"""Greedy decoding with the key/value cache (the paper decodes greedily), jit-compiled."""
import functools

import jax
import jax.numpy as jnp

from gqa_t5x import cpu_kernels
from gqa_t5x.network import Transformer

Array = jax.Array


def init_cache(model: Transformer, params, encoder_input_tokens: Array, max_decode_length: int):
  """An all-zero decode cache for this batch: shapes come from an abstract (free) forward pass."""
  batch = encoder_input_tokens.shape[0]
  decoder_tokens = jnp.zeros((batch, max_decode_length), jnp.int32)
  shapes = jax.eval_shape(
      lambda: model.apply({'params': params}, encoder_input_tokens, decoder_tokens,
                          decoder_tokens, decode=True, enable_dropout=False,
                          mutable=['cache'])[1]['cache'])
  return jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)


# Samples are encoded (and their cross-attention caches filled) a chunk at a time, each chunk's
# encoder output at most this many bytes. Why: XLA:CPU allocates a call's temporaries afresh and the
# kernel zero-fills every 4 KiB page at its first touch (about 0.75 us a page here); a whole batch's
# [b, s, e] encoder output and embedding (64 MiB each at batch 16, input 2048, d_model 512) spent
# more time faulting in than being computed. Measured on a 2-core Xeon (batch 16, input 2048,
# d_model 512; one process, calls alternated): the prefill in chunks of 2 samples (8 MiB) took
# 29.0 ms at G = 1 against 31.1 and 39.4 in chunks of 1 and 4; 47.5 at G = 2 against 103 and 58.5;
# 171 at G = 8 against 222, 183 and 179 (the whole batch); at G = 64 1359 against 1314 (whole).
# Later, in a slower phase of the machine: chunks of 1 against the whole batch 110 against 82 ms
# at G = 2, 43.2 against 59.7 at G = 1.
PREFILL_CHUNK_BYTES = 8 << 20


def prefill_chunk(batch: int, length: int, emb_dim: int, itemsize: int) -> int:
  """The largest divisor of `batch` whose encoder output fits PREFILL_CHUNK_BYTES; the whole
  batch where that is a single sample (a prime batch, or samples of 8 MiB and more): one sample at
  a time was 1.2-1.3x slower than the whole batch where the cache is wider than 64 columns (G = 2
  and 8 above), though faster at G = 1 (43.2 against 59.7 ms)."""
  chunk = batch
  while chunk > 1 and (batch % chunk or chunk * length * emb_dim * itemsize > PREFILL_CHUNK_BYTES):
    chunk -= 1
  return chunk if chunk > 1 else batch


def prefill(model: Transformer, params, encoder_input_tokens: Array, max_decode_length: int):
  """The decode cache with every cross-attention cache filled from the encoder, a chunk of
  samples at a time on one CPU device (prefill_chunk); the whole batch at once elsewhere, and
  under a mesh of several devices, whose batch shards the chunks would cut across."""
  def fill(tokens):
    encoded = model.apply({'params': params}, tokens, enable_dropout=False,
                          method=Transformer.encode)
    cache = init_cache(model, params, tokens, max_decode_length)
    return model.apply({'params': params, 'cache': cache}, encoded, mutable=['cache'],
                       method=Transformer.fill_cross_attention_cache)[1]['cache']

  batch, length = encoder_input_tokens.shape
  chunk = batch
  if jax.default_backend() == 'cpu' and jax.sharding.get_abstract_mesh().size <= 1:
    chunk = prefill_chunk(batch, length, model.config.emb_dim,
                          jnp.dtype(model.config.dtype).itemsize)
  if chunk == batch:
    return fill(encoder_input_tokens)
  chunks = jax.lax.map(fill, encoder_input_tokens.reshape(batch // chunk, chunk, length))
  # Per-sample leaves [n, chunk, ...] back to [batch, ...]; the cache indices ([n], equal in every
  # chunk) once.
  return jax.tree.map(lambda x: x[0] if x.ndim == 1 else x.reshape(batch, *x.shape[2:]), chunks)


def first_argmax(logits: Array, cpu_kernel: bool = False) -> Array:
  """jnp.argmax over the last axis of [b, n] logits (the first maximum, or the first NaN where
  there is one), by gqa_t5x.cpu_kernels.argmax where `cpu_kernel` and the CPU allow, else as a
  max and a min.

  Why: XLA:CPU runs argmax's paired (value, index) reduction slowly; over T5's 32128-token
  vocabulary for 16 rows it took 1.1 ms, the max and the min 0.6 ms, a few percent of a decode
  step, and the kernel a sixth of that (docs/benchmarks.md).
  """
  if cpu_kernel and logits.dtype == jnp.float32:
    return cpu_kernels.on_cpu(cpu_kernels.argmax, _max_then_min_index, logits)
  return _max_then_min_index(logits)


def _max_then_min_index(logits: Array) -> Array:
  top = jnp.max(logits, axis=-1, keepdims=True)
  hit = (logits == top) | jnp.isnan(logits)
  index = jnp.arange(logits.shape[-1], dtype=jnp.int32)
  return jnp.min(jnp.where(hit, index, logits.shape[-1]), axis=-1)


@functools.partial(jax.jit, static_argnames=('model', 'max_decode_length', 'eos_id'))
def greedy_decode(model: Transformer, params, encoder_input_tokens: Array, max_decode_length: int,
                  eos_id: int = 1) -> Array:
  """[b, s] inputs -> [b, max_decode_length] greedy outputs; 0 (padding) after each row's EOS.

  Encodes once and fills the cross-attention caches (prefill), then runs one cached decoder step
  per output position until every row has produced `eos_id` or the length is reached. Decoding
  starts from token 0, as T5 does.
  """
  batch = encoder_input_tokens.shape[0]
  cache = prefill(model, params, encoder_input_tokens, max_decode_length)

  def step(state):
    i, cache, token, outputs, done = state
    logits, variables = model.apply(
        {'params': params, 'cache': cache}, None, encoder_input_tokens, token, token,
        enable_dropout=False, decode=True, max_decode_length=max_decode_length,
        mutable=['cache'], method=Transformer.decode)
    next_token = jnp.where(done, 0, first_argmax(logits[:, -1], model.config.cpu_decode_kernels))
    outputs = outputs.at[:, i].set(next_token)
    done = done | (next_token == eos_id)
    return i + 1, variables['cache'], next_token[:, None], outputs, done

  def not_finished(state):
    i, _, _, _, done = state
    return (i < max_decode_length) & ~jnp.all(done)

  state = (jnp.array(0), cache, jnp.zeros((batch, 1), jnp.int32),
           jnp.zeros((batch, max_decode_length), jnp.int32), jnp.zeros((batch,), bool))
  return jax.lax.while_loop(not_finished, step, state)[3]
