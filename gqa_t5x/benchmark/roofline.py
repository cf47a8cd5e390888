"""The bytes (and flops) of one decode step, the machine's bandwidth, and the floor they imply.

Why: at serving batch sizes a decoder step does a few flops per byte it reads, so its time is
bounded below by (weights + key/value cache bytes) / read bandwidth. GQA's whole speed-up is the
cache bytes it removes (G instead of H heads), so every measured time is reported against this
floor; a time far above it means the implementation, not the hardware, is the limit.

Counts are what a step *must* read: every weight matrix it multiplies by, the self-attention cache
up to the current position and the whole cross-attention cache. Activations, norms and biases are
a rounding error at these sizes and are left out. A greedy decode also projects the encoder output
into the cross-attention keys/values once (the prefill): at MHA width and input 2048 that is
hundreds of GFLOP, compute-bound on a CPU, so its floor is added to the steps' (the encoder's own
layers are not counted).
"""
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from gqa_t5x.benchmark.timing import time_call


@dataclasses.dataclass(frozen=True)
class Geometry:
  """The sizes that determine decode-step bytes (one model config at one kv-head count G)."""
  batch: int
  input_length: int  # encoder length: cross-attention keys/values per sample
  output_length: int  # decoder steps; the self-attention cache length
  emb_dim: int
  num_heads: int
  kv_heads: int
  head_dim: int
  mlp_dim: int
  vocab_size: int
  num_decoder_layers: int
  num_mlp_inputs: int = 2  # T5.1.1's gated MLP: wi_0 and wi_1
  bytes_per_element: int = 4  # weights and cache are stored in the compute dtype


def attention_weight_elements(g: Geometry) -> int:
  """Self-attention q, k, v, out plus cross-attention q, out (cross k, v run once, not per step)."""
  query_or_out = g.emb_dim * g.num_heads * g.head_dim
  key_or_value = g.emb_dim * g.kv_heads * g.head_dim
  return 2 * query_or_out + 2 * key_or_value + 2 * query_or_out


def decoder_layer_weight_elements(g: Geometry) -> int:
  """One decoder layer: both attentions plus the gated MLP."""
  return attention_weight_elements(g) + (g.num_mlp_inputs + 1) * g.emb_dim * g.mlp_dim


def kv_elements_per_sample(g: Geometry, self_length: int) -> int:
  """Keys and values of G heads, for one layer: self-attention over `self_length` positions plus
  cross-attention over the encoder length."""
  return 2 * g.kv_heads * g.head_dim * (self_length + g.input_length)


def kv_cache_bytes_per_sample(g: Geometry) -> int:
  """The full decode cache of one sample (all decoder layers, self cache at output length)."""
  return (g.num_decoder_layers * kv_elements_per_sample(g, g.output_length)
          * g.bytes_per_element)


def attention_step_bytes(g: Geometry, self_length: int) -> int:
  """One decoder layer's self- plus cross-attention step with `self_length` cached positions."""
  elements = attention_weight_elements(g) + g.batch * kv_elements_per_sample(g, self_length)
  return elements * g.bytes_per_element


def decoder_step_bytes(g: Geometry, self_length: int) -> int:
  """A whole decoder step (all layers, then the [emb, vocab] logits matrix)."""
  per_layer = decoder_layer_weight_elements(g) + g.batch * kv_elements_per_sample(g, self_length)
  elements = g.num_decoder_layers * per_layer + g.emb_dim * g.vocab_size
  return elements * g.bytes_per_element


def greedy_decode_bytes(g: Geometry) -> int:
  """All decoder steps of a greedy decode: step i attends over i + 1 cached positions."""
  return sum(decoder_step_bytes(g, i + 1) for i in range(g.output_length))


def prefill_bytes(g: Geometry) -> int:
  """The one-off cross-attention key/value projection: encoder output, kernels and cache written."""
  per_layer = 2 * g.emb_dim * g.kv_heads * g.head_dim + 2 * g.batch * g.kv_heads * g.head_dim * (
      g.input_length)
  elements = g.batch * g.input_length * g.emb_dim + g.num_decoder_layers * per_layer
  return elements * g.bytes_per_element


def prefill_flops(g: Geometry) -> int:
  """A multiply-add per key/value kernel weight per encoder position, every decoder layer."""
  return g.num_decoder_layers * 2 * 2 * g.batch * g.input_length * g.emb_dim * g.kv_heads * (
      g.head_dim)


def attention_step_flops(g: Geometry, self_length: int) -> int:
  """One layer's attention step: a multiply-add per weight per sample, plus q.k and p.v over the
  cached positions for every query head."""
  scores_and_mix = 2 * 2 * g.num_heads * g.head_dim * (self_length + g.input_length)
  return g.batch * (2 * attention_weight_elements(g) + scores_and_mix)


def decoder_step_flops(g: Geometry, self_length: int) -> int:
  """A whole decoder step: every layer's weights and attention, then the logits."""
  scores_and_mix = 2 * 2 * g.num_heads * g.head_dim * (self_length + g.input_length)
  per_layer = 2 * decoder_layer_weight_elements(g) + scores_and_mix
  return g.batch * (g.num_decoder_layers * per_layer + 2 * g.emb_dim * g.vocab_size)


def greedy_decode_flops(g: Geometry) -> int:
  """All decoder steps (the encoder and the one-off cross key/value projection not counted)."""
  return sum(decoder_step_flops(g, i + 1) for i in range(g.output_length))


def greedy_decode_floor(g: Geometry, bandwidth: float, flops_per_s: float) -> float:
  """The prefill's floor plus the decoder steps': each phase is the slower of its bytes and flops
  (the prefill is compute-bound and the steps memory-bound, so neither hides the other)."""
  return (floor_seconds(prefill_bytes(g), bandwidth, prefill_flops(g), flops_per_s)
          + floor_seconds(greedy_decode_bytes(g), bandwidth, greedy_decode_flops(g), flops_per_s))


def measure_matmul_flops(n: int = 2048, dtype=jnp.float32, reps: int = 5) -> float:
  """The default device's matmul throughput in flop/s: a jitted [n, n] x [n, n] product.

  Why: at batch 16 a decode step does ~batch flops per weight it reads; a CPU with few cores
  cannot do that as fast as it reads memory, and then the compute roof, not bandwidth, is the
  floor. The fastest call counts: a roof is what the machine can do, and a slower call is another
  job's load on a shared machine, not the machine's limit.
  """
  a = jnp.ones((n, n), dtype)
  product = jax.jit(jnp.matmul)
  timing = time_call(lambda: product(a, a).block_until_ready(), warmup=2, reps=reps)
  return 2 * n ** 3 / timing.min_s


def measure_read_bandwidth(nbytes: int = 1 << 30, reps: int = 10) -> float:
  """The default device's read bandwidth in bytes/s: a jitted sum over an `nbytes` float32 buffer.

  A sum reads every byte once and writes nothing, so it is the best a decode step could do; its
  fastest call counts, as for measure_matmul_flops.
  """
  buffer = jnp.ones((nbytes // 4,), jnp.float32)
  total = jax.jit(jnp.sum)
  timing = time_call(lambda: total(buffer).block_until_ready(), warmup=2, reps=reps)
  return buffer.size * 4 / timing.min_s


def floor_seconds(nbytes: int, bandwidth: float, flops: int = 0,
                  flops_per_s: float = float('inf')) -> float:
  """The roofline: the longer of reading `nbytes` at `bandwidth` and computing `flops`."""
  return max(nbytes / bandwidth, flops / flops_per_s)


def bytes_per_element(dtype) -> int:
  return np.dtype(dtype).itemsize
