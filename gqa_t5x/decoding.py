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

  Encodes once, then runs one cached decoder step per output position until every row has
  produced `eos_id` or the length is reached. Decoding starts from token 0, as T5 does.
  """
  batch = encoder_input_tokens.shape[0]
  encoded = model.apply({'params': params}, encoder_input_tokens, enable_dropout=False,
                        method=Transformer.encode)
  cache = init_cache(model, params, encoder_input_tokens, max_decode_length)

  def step(state, encoded):
    i, cache, token, outputs, done = state
    logits, variables = model.apply(
        {'params': params, 'cache': cache}, encoded, encoder_input_tokens, token, token,
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
  # The first step projects the encoder output into the cross-attention caches; the loop's steps
  # read them as stored (encoded=None).
  state = step(state, encoded)
  return jax.lax.while_loop(not_finished, lambda s: step(s, None), state)[3]
