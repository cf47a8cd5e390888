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
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

from gqa_t5x import huge_pages as huge_pages_lib
from gqa_t5x.benchmark import timing


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


def step_weight_elements(g: Geometry) -> int:
  """Every weight a decoder step multiplies by: all layers, then the [emb, vocab] logits."""
  return g.num_decoder_layers * decoder_layer_weight_elements(g) + g.emb_dim * g.vocab_size


def cache_elements_per_sample(g: Geometry, positions: int) -> int:
  """Keys and values of G heads over `positions` cached positions, for one layer."""
  return 2 * g.kv_heads * g.head_dim * positions


def attention_flops_per_sample(g: Geometry, positions: int) -> int:
  """q.k and p.v over `positions` cached positions for every query head, for one layer."""
  return 2 * 2 * g.num_heads * g.head_dim * positions


def kv_elements_per_sample(g: Geometry, self_length: int) -> int:
  """Keys and values of G heads, for one layer: self-attention over `self_length` positions plus
  cross-attention over the encoder length."""
  return cache_elements_per_sample(g, self_length + g.input_length)


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
  elements = (step_weight_elements(g)
              + g.num_decoder_layers * g.batch * kv_elements_per_sample(g, self_length))
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
  scores_and_mix = attention_flops_per_sample(g, self_length + g.input_length)
  return g.batch * (2 * attention_weight_elements(g) + scores_and_mix)


def decoder_step_flops(g: Geometry, self_length: int) -> int:
  """A whole decoder step: every layer's weights and attention, then the logits."""
  scores_and_mix = attention_flops_per_sample(g, self_length + g.input_length)
  return g.batch * (2 * step_weight_elements(g) + g.num_decoder_layers * scores_and_mix)


def greedy_decode_flops(g: Geometry) -> int:
  """All decoder steps (the encoder and the one-off cross key/value projection not counted)."""
  return sum(decoder_step_flops(g, i + 1) for i in range(g.output_length))


def _prefill_floor(g: Geometry, bandwidth: float, flops_per_s: float) -> float:
  return floor_seconds(prefill_bytes(g), bandwidth, prefill_flops(g), flops_per_s)


def greedy_decode_floor(g: Geometry, bandwidth: float, flops_per_s: float) -> float:
  """The prefill's floor plus the decoder steps': each phase is the slower of its bytes and flops
  (the prefill is compute-bound and the steps memory-bound, so neither hides the other)."""
  return (_prefill_floor(g, bandwidth, flops_per_s)
          + floor_seconds(greedy_decode_bytes(g), bandwidth, greedy_decode_flops(g), flops_per_s))


def _attention_floor(g: Geometry, positions: int, bandwidth: float, flops_per_s: float) -> float:
  """One layer's attention over `positions` cached keys and values, on its own: reading G heads'
  cache for the batch, and q.k and p.v for all H query heads."""
  cache_bytes = g.batch * cache_elements_per_sample(g, positions) * g.bytes_per_element
  return floor_seconds(cache_bytes, bandwidth, g.batch * attention_flops_per_sample(g, positions),
                       flops_per_s)


def _weights_floor(weight_elements: int, g: Geometry, bandwidth: float,
                   flops_per_s: float) -> float:
  """Products of the batch by weights read once: a multiply-add per weight per sample."""
  return floor_seconds(weight_elements * g.bytes_per_element, bandwidth,
                       2 * g.batch * weight_elements, flops_per_s)


def attention_step_sequential_floor(g: Geometry, self_length: int, bandwidth: float,
                                    flops_per_s: float) -> float:
  """attention_step's floor with its parts one after another (greedy_decode_sequential_floor)."""
  return (_weights_floor(attention_weight_elements(g), g, bandwidth, flops_per_s)
          + _attention_floor(g, self_length, bandwidth, flops_per_s)
          + _attention_floor(g, g.input_length, bandwidth, flops_per_s))


def greedy_decode_sequential_floor(g: Geometry, bandwidth: float, flops_per_s: float) -> float:
  """The floor of a decode whose step runs its parts one after another, each at its own roofline:
  the products by the weights (memory-bound at serving batch sizes), then each layer's self- and
  cross-attention (compute-bound where many query heads share each kv head).

  Why: greedy_decode_floor lets all of a step's flops hide under its bytes, as if the attention
  could compute while the weights it waits on are still being read. Where the two are about
  equal, no implementation that runs the step in order reaches it: for MQA at d_model 512 and
  input 2048 (batch 16, float32, 28 GB/s and 330 GFLOP/s) it is 81% of this floor, at G = 2 93%,
  and from G = 4 on the same. A time's fraction of this floor says how well the kernels run; its
  fraction of greedy_decode_floor, how close the decode is to the machine.
  """
  weights = _weights_floor(step_weight_elements(g), g, bandwidth, flops_per_s)
  cross = _attention_floor(g, g.input_length, bandwidth, flops_per_s)
  steps = sum(weights + g.num_decoder_layers * (_attention_floor(g, t + 1, bandwidth, flops_per_s)
                                                + cross)
              for t in range(g.output_length))
  return _prefill_floor(g, bandwidth, flops_per_s) + steps


class MachineRates:
  """The default device's read bandwidth (bytes/s) and matmul rate (flop/s), sampled.

  Why sampled, and all through a measurement: on a shared machine both drift with the
  neighbours' load within seconds (on a 2-core EPYC one 1 GiB read took 17.5-40 GB/s from one
  call to the next). A decode reading for seconds sees their average; a few calls before it see
  one moment, and the fastest call a burst that no sustained read keeps up. So the benchmark
  samples before each timed call and after the last: the median is the machine's rate while the
  row ran, and the fastest is kept as the strictest floor.

  Each sample waits `settle_s` first: right after a decode the same machine read at 19.5-22.7
  GB/s, 1-2 s later at 25-34 (idle 30-34; back-to-back reads, medians of 23-25). Settled samples
  are the higher, so the floor errs on the strict side.

  The read is a jitted sum over `nbytes` of float32: it reads every byte once and writes nothing,
  the best a decode step could do (larger than the last-level cache, or it measures the cache).
  With `huge_pages` its buffer is moved onto them as the decode's weights are (gqa_t5x.huge_pages):
  on a 2-core Xeon the same sum read 29.3 GB/s on 4 KiB pages and 31.7 on 2 MiB pages (medians of
  10, one process), so a floor read on 4 KiB pages was some 8% too lenient for weights on huge ones.
  The compute roof is a jitted [n, n] x [n, n] product: at batch 16 a decode step does ~batch
  flops per weight it reads, and a CPU with few cores cannot do that as fast as it reads.
  """

  def __init__(self, nbytes: int = 1 << 30, matmul_n: int = 2048, dtype=jnp.float32,
               settle_s: float = 1.0, huge_pages: bool = False):
    self.dtype, self.settle_s = jnp.dtype(dtype), settle_s
    self._buffer = jnp.ones((nbytes // 4,), jnp.float32)
    self.huge_page_bytes = huge_pages_lib.apply(self._buffer) if huge_pages else 0
    self._matrix = jnp.ones((matmul_n, matmul_n), self.dtype)
    total, product = jax.jit(jnp.sum), jax.jit(jnp.matmul)
    self._read = lambda: total(self._buffer).block_until_ready()
    self._multiply = lambda: product(self._matrix, self._matrix).block_until_ready()
    self._read_bytes, self._flops = self._buffer.size * 4, 2 * matmul_n ** 3
    for _ in range(2):  # compilation, then a warm call
      self._read()
      self._multiply()
    self.bandwidths, self.flop_rates = [], []

  def sample(self, calls: int = 1) -> None:
    """Measures both rates `calls` times, each after settle_s, and keeps every measurement."""
    for _ in range(calls):
      time.sleep(self.settle_s)
      self.bandwidths.append(self._read_bytes / timing.seconds(self._read))
      self.flop_rates.append(self._flops / timing.seconds(self._multiply))

  def clear(self) -> None:
    self.bandwidths, self.flop_rates = [], []

  def sustained(self) -> tuple[float, float]:
    """(bandwidth, flop rate): the median of the samples since clear()."""
    return statistics.median(self.bandwidths), statistics.median(self.flop_rates)

  def fastest(self) -> tuple[float, float]:
    """(bandwidth, flop rate): the fastest sample of each since clear()."""
    return max(self.bandwidths), max(self.flop_rates)


def floor_seconds(nbytes: int, bandwidth: float, flops: int = 0,
                  flops_per_s: float = float('inf')) -> float:
  """The roofline: the longer of reading `nbytes` at `bandwidth` and computing `flops`."""
  return max(nbytes / bandwidth, flops / flops_per_s)


def bytes_per_element(dtype) -> int:
  return np.dtype(dtype).itemsize
