"""The decode benchmark's own arithmetic and the tool end to end on a tiny config (no timings)."""
import json
import os

from absl import app
from absl import flags
from absl.testing import flagsaver
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gqa_t5x import huge_pages
from gqa_t5x.benchmark import cli, decode, peer, report, roofline, timing
from gqa_t5x.decoding import init_cache
from gqa_t5x.network import Transformer

# Small enough to count by hand: 4 query heads, 2 kv heads of dim 2, width 8, 2 decoder layers.
SMALL = roofline.Geometry(batch=2, input_length=10, output_length=3, emb_dim=8, num_heads=4,
                          kv_heads=2, head_dim=2, mlp_dim=16, vocab_size=11, num_decoder_layers=2)


def test_attention_step_bytes_by_hand():
  # weights: self q,out 2*8*4*2=128 + self k,v 2*8*2*2=64 + cross q,out 128 = 320 elements;
  # cache per sample, 3 cached positions: k and v, 2 heads x dim 2 over 3 + 10 positions = 104.
  assert roofline.attention_step_bytes(SMALL, 3) == (320 + 2 * 104) * 4


def test_greedy_decode_bytes_by_hand():
  # per layer: 320 attention + 3*8*16 MLP = 704 weights; cache 2*2*2*(t+10) per sample;
  # step t: 2 layers * (704 + 2 samples * 8 * (t + 10)) + 8*11 logits.
  steps = [2 * (704 + 2 * 8 * (t + 10)) + 88 for t in (1, 2, 3)]
  assert steps == [1848, 1880, 1912]
  assert roofline.decoder_step_bytes(SMALL, 1) == 1848 * 4
  assert roofline.greedy_decode_bytes(SMALL) == sum(steps) * 4
  assert roofline.kv_cache_bytes_per_sample(SMALL) == 2 * 104 * 4


@pytest.mark.parametrize('kv_heads', [4, 1])
def test_counts_match_the_real_network(kv_heads):
  """Weights and cache counted by the roofline equal the Transformer's own parameters/cache."""
  g = SMALL.__class__(**{**SMALL.__dict__, 'kv_heads': kv_heads})
  model = Transformer(decode.model_config(g, num_encoder_layers=1, dtype=jnp.float32))
  tokens = jnp.full((g.batch, g.input_length), 2, jnp.int32)
  targets = jnp.ones((g.batch, g.output_length), jnp.int32)
  params = jax.eval_shape(lambda: model.init(jax.random.key(0), tokens, targets, targets))
  decoder = params['params']['decoder']
  names = lambda tree: [(jax.tree_util.keystr(p), leaf)
                        for p, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]]
  cross_kv = ("['encoder_decoder_attention']['key']", "['encoder_decoder_attention']['value']")
  per_step = sum(int(np.prod(leaf.shape)) for name, leaf in names(decoder)  # run once: excluded
                 if len(leaf.shape) == 2 and 'relpos_bias' not in name
                 and not any(kv in name for kv in cross_kv))
  assert per_step == (g.num_decoder_layers * roofline.decoder_layer_weight_elements(g)
                      + g.emb_dim * g.vocab_size)
  cache = jax.eval_shape(lambda p: init_cache(model, p, tokens, g.output_length), params['params'])
  cache_bytes = sum(leaf.size * leaf.dtype.itemsize for name, leaf in names(cache)
                    if 'cached_' in name)
  assert cache_bytes == g.batch * roofline.kv_cache_bytes_per_sample(g)


def test_flops_by_hand():
  # per sample: a multiply-add per weight (2 * 320) + q.k and p.v: 2 * 2 * 4 heads * 2 * (3 + 10)
  assert roofline.attention_step_flops(SMALL, 3) == 2 * (2 * 320 + 416)
  # per sample: 2 layers * (2 * 704 + 2 * 2 * 4 * 2 * (1 + 10)) + 2 * 8 * 11 logits
  assert roofline.decoder_step_flops(SMALL, 1) == 2 * (2 * (2 * 704 + 352) + 176)


def test_prefill_by_hand():
  # once per decode, each of 2 layers: k and v kernels 2*8*(2*2) = 64 weights, a multiply-add each
  # for 2 samples x 10 encoder positions; reads the [2, 10, 8] encoder output, writes 2*2*4*10.
  assert roofline.prefill_flops(SMALL) == 2 * 2 * 64 * 2 * 10
  assert roofline.prefill_bytes(SMALL) == (2 * 10 * 8 + 2 * (64 + 2 * 2 * 4 * 10)) * 4
  # The prefill (compute-bound here) and the steps (memory-bound) are floored separately.
  bandwidth, flops_per_s = 1e3, 1e4
  steps = max(sum([1848, 1880, 1912]) * 4 / bandwidth,
              sum(roofline.decoder_step_flops(SMALL, t) for t in (1, 2, 3)) / flops_per_s)
  assert steps == pytest.approx(22.56)
  assert roofline.greedy_decode_floor(SMALL, bandwidth, flops_per_s) == pytest.approx(
      max(2432 / bandwidth, 5120 / flops_per_s) + steps)


def test_sequential_floor_by_hand():
  # Each part at its own roofline, one after another (bandwidth 1e3 B/s, 1e4 flop/s):
  # weights: 2 layers * 704 + 88 = 1496 elements, 5984 bytes (5.984 s) against a multiply-add
  # each per sample, 5984 flops (0.5984 s): 5.984 s. Attention over n positions, per layer: the
  # cache 2 samples * 2 (k, v) * 2 heads * dim 2 * n * 4 bytes = 64n bytes (0.064n s) against
  # 2 * 2 * 2 * 4 heads * 2 * n = 64n flops (0.0064n s): 0.064n s, for n = t and n = 10.
  bandwidth, flops_per_s = 1e3, 1e4
  steps = sum(5.984 + 2 * (0.064 * t + 0.064 * 10) for t in (1, 2, 3))
  prefill = max(2432 / bandwidth, 5120 / flops_per_s)
  assert roofline.greedy_decode_sequential_floor(SMALL, bandwidth, flops_per_s) == pytest.approx(
      prefill + steps)
  # Memory-bound everywhere: the parts' bytes add up to the whole step's, so the floors agree.
  assert roofline.greedy_decode_sequential_floor(SMALL, bandwidth, flops_per_s) == pytest.approx(
      roofline.greedy_decode_floor(SMALL, bandwidth, flops_per_s))
  # Attention step: 320 weights (1.28 s against 0.128), the self cache at 3 positions and the
  # cross cache at 10 (0.192 + 0.64 s).
  assert roofline.attention_step_sequential_floor(SMALL, 3, bandwidth, flops_per_s) == (
      pytest.approx(1.28 + 0.192 + 0.64))
  # MQA (G = 1) at 1.5e3 flop/s: the weights stay memory-bound and the attention turns
  # compute-bound. Weights 2 layers * (288 + 384) + 88 = 1432 elements: 5.728 s of bytes (3.819 of
  # flops). Attention over n positions: 32n bytes (0.032n s), 64n flops (0.04267n s). Prefill:
  # 1536 bytes (1.536 s), 2560 flops (1.7067 s).
  mqa = SMALL.__class__(**{**SMALL.__dict__, 'kv_heads': 1})
  flops_per_s = 1.5e3
  prefill = 2560 / flops_per_s
  sequential = prefill + sum(5.728 + 2 * (64 * t + 64 * 10) / flops_per_s for t in (1, 2, 3))
  assert roofline.greedy_decode_sequential_floor(mqa, bandwidth, flops_per_s) == pytest.approx(
      sequential)
  # Overlapped, the steps' bytes (17.184 + 2.304 s) exceed their flops (14.528 s): a lower floor.
  assert roofline.greedy_decode_floor(mqa, bandwidth, flops_per_s) == pytest.approx(
      prefill + 17.184 + 2.304)
  assert sequential > prefill + 17.184 + 2.304


def test_floor_is_the_slower_of_memory_and_compute():
  assert roofline.floor_seconds(3_000, 1_000.0) == 3.0
  assert roofline.floor_seconds(3_000, 1_000.0, flops=10_000, flops_per_s=1_000.0) == 10.0


def test_machine_rates_sample_median_and_fastest():
  rates = roofline.MachineRates(nbytes=1 << 20, matmul_n=64, settle_s=0)
  assert rates.bandwidths == [] and rates.flop_rates == []  # the warm-up calls are not kept
  rates.sample(3)
  rates.sample()
  assert len(rates.bandwidths) == len(rates.flop_rates) == 4
  assert rates.sustained() == (np.median(rates.bandwidths), np.median(rates.flop_rates))
  assert rates.fastest() == (max(rates.bandwidths), max(rates.flop_rates))
  assert 0 < rates.sustained()[0] <= rates.fastest()[0]
  rates.clear()
  assert rates.bandwidths == [] and rates.flop_rates == []


def test_machine_rates_read_from_huge_pages_when_asked(thp_enabled):
  """The floor's read buffer goes onto huge pages with the weights (--huge_pages, the default):
  the bytes reported are its whole 2 MiB pages, as gqa_t5x.huge_pages moves them."""
  nbytes = 16 << 20
  assert roofline.MachineRates(nbytes=nbytes, matmul_n=64, settle_s=0).huge_page_bytes == 0
  rates = roofline.MachineRates(nbytes=nbytes, matmul_n=64, settle_s=0, huge_pages=True)
  start, end = huge_pages.whole_pages(rates._buffer.unsafe_buffer_pointer(), nbytes)
  assert end - start >= nbytes - huge_pages.HUGE_PAGE
  if thp_enabled:
    assert rates.huge_page_bytes == end - start  # this project's machines: THP `madvise`
  rates.sample()
  assert rates.bandwidths[0] > 0


def test_time_call_excludes_warmup_and_rejects_zero_warmup():
  calls = []
  t = timing.time_call(lambda: calls.append(1), warmup=2, reps=3,
                       between=lambda: calls.append(0))
  # between() runs before each timed call only, never before a warm-up call.
  assert calls == [1, 1, 0, 1, 0, 1, 0, 1] and t.reps == 3 and t.min_s <= t.median_s <= t.max_s
  with pytest.raises(ValueError, match='warmup and reps must be >= 1'):
    timing.time_call(lambda: None, warmup=0)


def _row(level, g, seconds, implementation='gqa_t5x', floor=None):
  return {'level': level, 'implementation': implementation, 'dtype': 'float32', 'kv_heads': g,
          'time_per_sample_s': seconds, 'floor_per_sample_s': floor, 'spread': 0.1,
          'bytes_per_step': (1 << 20) * (1 + g // 8),
          'roofline_fraction': None if floor is None else floor / seconds,
          'fastest_floor_per_sample_s': None if floor is None else floor / 2,
          'roofline_fraction_at_fastest_rates': None if floor is None else floor / 2 / seconds,
          'sequential_fraction': None if floor is None else 1.2 * floor / seconds,
          'kv_cache_bytes_per_sample': 2 << 20, 'peak_bytes': None,
          'read_bandwidth_bytes_per_s': 3e10, 'matmul_flops_per_s': 5e10, 'bound': 'memory'}


def test_summary_ratios_and_rises():
  rows = [_row('decode', 16, 8.0, floor=4.0), _row('decode', 8, 2.0, floor=1.0),
          _row('decode', 4, 2.5, floor=1.0), _row('decode', 1, 1.0, floor=0.5),
          _row('decode', 16, 16.0, implementation='hf_t5')]
  summary = report.summarize(rows, num_heads=16)
  ours = summary['decode/gqa_t5x/float32']
  assert ours['worst_times_floor'] == 2.5 and ours['worst_times_fastest_floor'] == 5.0
  assert ours['worst_rise_as_g_falls'] == 1.25 and ours['never_rises'] is False
  assert ours['speedup_gqa8_over_mha'] == 4.0 and ours['speedup_mqa_over_mha'] == 8.0
  assert ours['floor_speedup_gqa8_over_mha'] == 3 / 2 and ours['floor_speedup_mqa_over_mha'] == 3
  assert summary['peer/float32'] == {'peer_over_our_mha': 2.0, 'peer_over_our_gqa8': 8.0}
  table = report.format_table(rows)
  assert ('| decode | gqa_t5x | float32 | 8 | 2e+03 | 10% | 2.0 | 30.0 | 50 | 1e+03 | memory | 50% '
          '| 25% | 60% | 2.0 | - |') in table


def test_xla_rows_time_each_g_again_without_the_cpu_kernel(tiny_flags):
  tiny_flags.levels, tiny_flags.xla_rows, tiny_flags.peer = ['decode'], True, False
  document = cli.benchmark()
  assert [(r['implementation'], r['kv_heads']) for r in document['rows']] == [
      ('gqa_t5x', 4), ('gqa_t5x_xla', 4), ('gqa_t5x', 1), ('gqa_t5x_xla', 1)]
  rows = {(r['implementation'], r['kv_heads']): r for r in document['rows']}
  assert document['summary']['xla/float32'] == {
      f'xla_over_kernel_G{g}': pytest.approx(rows['gqa_t5x_xla', g]['time_per_sample_s']
                                             / rows['gqa_t5x', g]['time_per_sample_s'])
      for g in (4, 1)}
  assert all(r['roofline_fraction'] is not None for r in document['rows'])


def test_default_and_invalid_kv_heads():
  assert cli._kv_heads(64, []) == [64, 32, 16, 8, 4, 2, 1]
  assert cli._kv_heads(12, []) == [12, 6, 3, 1]
  assert cli._kv_heads(8, ['1', '8', '2']) == [8, 2, 1]
  with pytest.raises(app.UsageError, match='valid values: 1, 2, 4, 8'):
    cli._kv_heads(8, ['3'])


@pytest.fixture
def tiny_flags():
  if not flags.FLAGS.is_parsed():
    flags.FLAGS.mark_as_parsed()
  with flagsaver.flagsaver(num_heads=4, head_dim=8, emb_dim=16, mlp_dim=32, vocab_size=50,
                           batch=2, input_length=6, output_length=3, num_decoder_layers=1,
                           kv_heads=['4', '1'], reps=1, bandwidth_mib=1,
                           rate_settle_s=0):
    yield flags.FLAGS


def test_bad_dtype_is_a_usage_error(tiny_flags):
  tiny_flags.dtypes = ['float64']
  with pytest.raises(app.UsageError, match='--dtypes=float64: choose from float32,bfloat16'):
    cli.benchmark()


def test_tool_runs_on_a_tiny_config(tiny_flags, tmp_path):
  out = tmp_path / 'out'
  document = cli.benchmark(cli._writer(str(out)))
  version = peer.version()
  expected = [('attention', 'gqa_t5x', 4), ('attention', 'gqa_t5x', 1),
              ('decode', 'gqa_t5x', 4), ('decode', 'gqa_t5x', 1)]
  if version != peer.NOT_INSTALLED:  # the peer is an optional extra; both cases are checked
    expected.append(('decode', 'hf_t5', 4))
  assert [(r['level'], r['implementation'], r['kv_heads']) for r in document['rows']] == expected
  assert document['peer'] == version
  for row in document['rows']:
    bandwidth = row['read_bandwidth_bytes_per_s']
    g = cli._geometry(row['kv_heads'], 'float32')
    attention = row['level'] == 'attention'
    flops_per_s = row['matmul_flops_per_s']
    if attention:
      floor = max(roofline.attention_step_bytes(g, 3) / bandwidth,
                  roofline.attention_step_flops(g, 3) / flops_per_s)
    else:
      floor = (max(roofline.prefill_bytes(g) / bandwidth, roofline.prefill_flops(g) / flops_per_s)
               + max(roofline.greedy_decode_bytes(g) / bandwidth,
                     roofline.greedy_decode_flops(g) / flops_per_s))
    assert row['floor_per_sample_s'] == pytest.approx(floor / 2)
    sequential = (roofline.attention_step_sequential_floor(g, 3, bandwidth, flops_per_s)
                  if attention else
                  roofline.greedy_decode_sequential_floor(g, bandwidth, flops_per_s))
    assert row['sequential_fraction'] == pytest.approx(sequential / row['median_s'])
    assert row['sequential_floor_per_sample_s'] >= row['floor_per_sample_s'] * (1 - 1e-9)
    # 2 samples before the row, one before each of its timed calls, 2 after; the floor from
    # their medians, a stricter one from the fastest.
    assert row['rate_samples'] == 2 + 1 + 2
    assert row['fastest_read_bandwidth_bytes_per_s'] >= bandwidth
    assert row['fastest_floor_per_sample_s'] <= row['floor_per_sample_s']
    assert row['time_per_sample_s'] == pytest.approx(row['median_s'] / 2)
  assert sorted(os.listdir(out)) == ['decode_benchmark.json', 'decode_benchmark.md',
                                     'decode_benchmark.png']
  assert json.loads((out / 'decode_benchmark.json').read_text())['rows'] == document['rows']
  assert (out / 'decode_benchmark.png').read_bytes()[:4] == b'\x89PNG'

