"""gqa-t5x-benchmark: decode time per sample across kv-head counts G, against the roofline.

  gqa-t5x-benchmark --levels=attention,decode --dtypes=float32 --output_dir=/tmp/bench

Times the attention decode step and/or the whole greedy decode for G = H, H/2, ..., 1 (or
--kv_heads), plus HuggingFace T5 (PyTorch) as the MHA peer when it is installed. Prints a
Markdown table and the targets summary; with --output_dir also writes decode_benchmark.json,
decode_benchmark.md and decode_benchmark.png (rewritten after every row, so an interrupted run
keeps what it measured).
"""
import os
import platform
import time

from absl import app
from absl import flags
import jax
import jax.numpy as jnp

from gqa_t5x import cli
from gqa_t5x import files
from gqa_t5x import common_flags
from gqa_t5x.benchmark import attention_step, decode, peer, report, roofline, timing

LEVELS = ('attention', 'decode')
DTYPES = ('float32', 'bfloat16', 'float16')
FILE_STEM = 'decode_benchmark'

_LEVELS = flags.DEFINE_list('levels', list(LEVELS), f'Which of {LEVELS} to time.')
_NUM_HEADS = flags.DEFINE_integer('num_heads', 64, 'Query heads H (XXL: 64).', lower_bound=1)
_EMB_DIM = flags.DEFINE_integer('emb_dim', 4096, 'Model width (XXL: 4096).', lower_bound=1)
_MLP_DIM = flags.DEFINE_integer('mlp_dim', 10240, 'MLP width (XXL: 10240).', lower_bound=1)
_VOCAB = flags.DEFINE_integer('vocab_size', 32128, 'Vocabulary (T5: 32128).', lower_bound=3)
_DECODER_LAYERS = flags.DEFINE_integer('num_decoder_layers', 1, 'Decoder depth (XXL: 24).',
                                       lower_bound=1)
_ENCODER_LAYERS = flags.DEFINE_integer(
    'num_encoder_layers', 0, 'Encoder depth (XXL: 24). Its time is the same for every G and '
    'compute-bound; 0 keeps the embedding and final norm only.', lower_bound=0)
_INPUT_LENGTH = flags.DEFINE_integer('input_length', 2048, 'Encoder input tokens.',
                                     lower_bound=1)
_OUTPUT_LENGTH = flags.DEFINE_integer('output_length', 64, 'Decoded tokens (every G decodes '
                                      'exactly this many: EOS never stops it).', lower_bound=1)
_BATCH = flags.DEFINE_integer('batch', 16, 'Samples per decode.', lower_bound=1)
_DTYPES = flags.DEFINE_list('dtypes', ['float32'], f'Compute (and weight/cache) dtypes: {DTYPES}.')
_DEVICE = flags.DEFINE_string('device', '', 'JAX platform to run on (cpu, gpu, tpu); '
                              'default: JAX default backend.')
_XLA_ROWS = flags.DEFINE_boolean(
    'xla_rows', False, 'Also time each G\'s decode with T5Config.cpu_decode_kernels=False (XLA\'s '
    'ops where the CPU kernels would run), beside the rows with the kernels (implementation '
    'gqa_t5x_xla).')
_HUGE_PAGES = flags.DEFINE_boolean(
    'huge_pages', True, 'Move the weights onto transparent huge pages (gqa_t5x.huge_pages; '
    'Linux), as gqa-t5x-infer does on CPU, and the read-bandwidth buffer with them (the floor '
    'reads what the decode reads); --nohuge_pages times both on 4 KiB pages.')
_PEER = flags.DEFINE_boolean('peer', True, 'Also time HuggingFace T5 (MHA) greedy generate '
                             'when torch and transformers are installed.')
_PEER_DEVICE = flags.DEFINE_string('peer_device', '', 'torch device for the peer; default: '
                                   'cuda when --device is gpu and CUDA is available, else cpu.')
_WARMUP = flags.DEFINE_integer('warmup', 1, 'Untimed calls first (compilation).', lower_bound=1)
_REPS = flags.DEFINE_integer('reps', 5, 'Timed calls; the median is reported.', lower_bound=1)
_BANDWIDTH_MIB = flags.DEFINE_integer('bandwidth_mib', 1024, 'Buffer for the read-bandwidth '
                                      'measurement (MiB); larger than the last-level cache, or '
                                      'it measures the cache.', lower_bound=1)
_MATMUL_N = flags.DEFINE_integer('matmul_n', 2048, 'Side of the square matmul that measures '
                                 'the compute roof (large enough to hide dispatch: 8192 on GPUs).',
                                 lower_bound=64)
_RATE_SETTLE = flags.DEFINE_float(
    'rate_settle_s', 1.0, 'Seconds to wait before each sample of the machine\'s rates: right '
    'after a decode the read bandwidth measures low for about a second.', lower_bound=0)
# Shared with other commands: --kv_heads (default H, H/2, ..., 1), --head_dim (default 64),
# --seed, --output_dir (JSON/Markdown/PNG; unset: print only).
_KV_HEADS, _HEAD_DIM = common_flags.kv_heads(), common_flags.head_dim()
_SEED, _OUTPUT_DIR = common_flags.seed(), common_flags.output_dir()


def _head_dim() -> int:
  return _HEAD_DIM.value or 64


def _kv_heads(num_heads: int, requested: list[str]) -> list[int]:
  """Validated G values, largest first; the default halves H down to 1."""
  if not requested:
    values, g = [], num_heads
    while g >= 1 and num_heads % g == 0:
      values.append(g)
      g = g // 2 if g % 2 == 0 else 0
    return values if values[-1] == 1 else values + [1]
  return sorted(set(common_flags.checked_kv_heads(num_heads, requested)), reverse=True)


def _choices(flag, allowed) -> list[str]:
  bad = [v for v in flag.value if v not in allowed]
  if bad or not flag.value:
    raise app.UsageError(f'--{flag.name}={",".join(flag.value)}: choose from {",".join(allowed)}')
  return list(dict.fromkeys(flag.value))


def _device():
  if not _DEVICE.value:
    return jax.devices()[0]
  try:
    return jax.devices(_DEVICE.value)[0]
  except RuntimeError:
    raise app.UsageError(f'--device={_DEVICE.value}: no such JAX backend here; available: '
                         f'{jax.default_backend()}') from None


def _peer_device(device) -> str:
  if _PEER_DEVICE.value:
    return _PEER_DEVICE.value
  if device.platform == 'gpu':
    import torch
    return 'cuda' if torch.cuda.is_available() else 'cpu'
  return 'cpu'


def measure_row(level: str, implementation: str, g: roofline.Geometry, dtype: str,
                t: timing.Timing, peak_bytes, rates: roofline.MachineRates,
                comparable: bool = True) -> dict:
  """Sets the timing t of one row against its floors from the rates sampled beside it: the
  sustained (median) rates' and the fastest's, and the sustained rates' sequential floor (its
  parts one after another: roofline.greedy_decode_sequential_floor). No floor where the row did
  not run on the device the rates are of (comparable=False)."""
  if level == 'attention':
    total_bytes = step_bytes = roofline.attention_step_bytes(g, g.output_length)
    flops = roofline.attention_step_flops(g, g.output_length)
    floor_at = lambda bandwidth, flops_per_s: roofline.floor_seconds(
        total_bytes, bandwidth, flops, flops_per_s)
    sequential_at = lambda bandwidth, flops_per_s: roofline.attention_step_sequential_floor(
        g, g.output_length, bandwidth, flops_per_s)
  else:
    total_bytes = roofline.greedy_decode_bytes(g)
    step_bytes = total_bytes / g.output_length
    flops = roofline.greedy_decode_flops(g)
    floor_at = lambda bandwidth, flops_per_s: roofline.greedy_decode_floor(
        g, bandwidth, flops_per_s)
    sequential_at = lambda bandwidth, flops_per_s: roofline.greedy_decode_sequential_floor(
        g, bandwidth, flops_per_s)
  (bandwidth, flops_per_s), fastest_rates = rates.sustained(), rates.fastest()
  floor = floor_at(bandwidth, flops_per_s) if comparable else None
  sequential = sequential_at(bandwidth, flops_per_s) if comparable else None
  fastest = floor_at(*fastest_rates) if comparable else None
  return {
      'level': level, 'implementation': implementation, 'dtype': dtype, 'kv_heads': g.kv_heads,
      'median_s': t.median_s, 'min_s': t.min_s, 'max_s': t.max_s, 'reps': t.reps,
      'times_s': list(t.times_s),
      'spread': t.spread, 'time_per_sample_s': t.median_s / g.batch,
      'bytes_per_step': step_bytes, 'flops_per_step': flops / (1 if level == 'attention'
                                                               else g.output_length),
      'read_bandwidth_bytes_per_s': bandwidth, 'matmul_flops_per_s': flops_per_s,
      'fastest_read_bandwidth_bytes_per_s': fastest_rates[0],
      'fastest_matmul_flops_per_s': fastest_rates[1], 'rate_samples': len(rates.bandwidths),
      'bound': (None if floor is None else
                'memory' if total_bytes / bandwidth >= flops / flops_per_s else 'compute'),
      'floor_per_sample_s': None if floor is None else floor / g.batch,
      'roofline_fraction': None if floor is None else floor / t.median_s,
      'fastest_floor_per_sample_s': None if fastest is None else fastest / g.batch,
      'roofline_fraction_at_fastest_rates': None if fastest is None else fastest / t.median_s,
      'sequential_floor_per_sample_s': None if sequential is None else sequential / g.batch,
      'sequential_fraction': None if sequential is None else sequential / t.median_s,
      'kv_cache_bytes_per_sample': roofline.kv_cache_bytes_per_sample(g),
      'peak_bytes': peak_bytes,
  }


def _rates(dtype: str) -> roofline.MachineRates:
  return roofline.MachineRates(_BANDWIDTH_MIB.value * report.MIB, _MATMUL_N.value,
                               jnp.dtype(dtype), _RATE_SETTLE.value, huge_pages=_HUGE_PAGES.value)


def _geometry(kv_heads: int, dtype: str) -> roofline.Geometry:
  return roofline.Geometry(
      batch=_BATCH.value, input_length=_INPUT_LENGTH.value, output_length=_OUTPUT_LENGTH.value,
      emb_dim=_EMB_DIM.value, num_heads=_NUM_HEADS.value, kv_heads=kv_heads,
      head_dim=_head_dim(), mlp_dim=_MLP_DIM.value, vocab_size=_VOCAB.value,
      num_decoder_layers=_DECODER_LAYERS.value,
      bytes_per_element=roofline.bytes_per_element(jnp.dtype(dtype)))


def _plan(levels, kv_heads, dtypes, with_peer, with_xla):
  """(level, implementation, dtype, G) in the order they are timed."""
  plan = []
  for dtype in dtypes:
    for level in levels:
      # With XLA rows, each G's two decodes are timed one after the other: on a shared machine the
      # load drifts, and the ratio of neighbours is the one to trust.
      implementations = ['gqa_t5x'] + (['gqa_t5x_xla'] if level == 'decode' and with_xla else [])
      plan += [(level, implementation, dtype, g) for g in kv_heads
               for implementation in implementations]
      if level == 'decode' and with_peer:
        plan.append(('decode', 'hf_t5', dtype, _NUM_HEADS.value))
  return plan


def benchmark(write_outputs=None) -> dict:
  """Runs every (dtype, level, G) of the flags; returns the JSON document.

  write_outputs(document), when given, is called after every row.
  """
  levels = _choices(_LEVELS, LEVELS)
  dtypes = _choices(_DTYPES, DTYPES)
  kv_heads = _kv_heads(_NUM_HEADS.value, _KV_HEADS.value)
  device = _device()
  peer_version = peer.version() if _PEER.value and 'decode' in levels else 'not requested'
  with_peer = peer_version.startswith('transformers')
  peer_device = _peer_device(device) if with_peer else None
  same_device = {'cpu': 'cpu', 'gpu': 'cuda'}.get(device.platform) == (peer_device or '')[:4]

  with jax.default_device(device):
    rates = _rates(dtypes[0])
    rates.sample(3)
    bandwidth = rates.sustained()[0]
    on_huge_pages = (f' ({rates.huge_page_bytes / report.MIB:.0f} of {_BANDWIDTH_MIB.value} MiB '
                     'on huge pages)' if _HUGE_PAGES.value and device.platform == 'cpu' else '')
    print(f'{device.platform} ({device.device_kind}): read bandwidth '
          f'{bandwidth / 1e9:.1f} GB/s{on_huge_pages}; load average {os.getloadavg()[0]:.1f}; '
          f'peer: {peer_version}', flush=True)
    document = {
        'settings': {**{name: flags.FLAGS[name].value for name in (
            'levels', 'kv_heads', 'num_heads', 'emb_dim', 'mlp_dim', 'vocab_size',
            'num_decoder_layers', 'num_encoder_layers', 'input_length', 'output_length',
            'batch', 'dtypes', 'warmup', 'reps', 'bandwidth_mib', 'matmul_n', 'rate_settle_s',
            'seed', 'xla_rows', 'huge_pages')},
                     'head_dim': _head_dim()},
        'machine': {'platform': device.platform, 'device_kind': device.device_kind,
                    'jax': jax.__version__, 'python': platform.python_version(),
                    'cpu_count': os.cpu_count(), 'load_average_start': os.getloadavg()},
        'read_bandwidth_bytes_per_s': bandwidth,
        'read_buffer_huge_page_bytes': rates.huge_page_bytes, 'peer': peer_version,
        'peer_device': peer_device, 'rows': [], 'summary': {},
    }
    plan = _plan(levels, kv_heads, dtypes, with_peer, _XLA_ROWS.value)
    start = time.perf_counter()
    for i, (level, implementation, dtype, g) in enumerate(plan):
      geometry = _geometry(g, dtype)
      if implementation == 'hf_t5':
        run, peak = peer.build(geometry, _ENCODER_LAYERS.value, dtype, peer_device, _SEED.value)
      elif level == 'attention':
        run, peak = attention_step.build(geometry, jnp.dtype(dtype), _SEED.value,
                                         weights_on_huge_pages=_HUGE_PAGES.value)
      else:
        run, peak = decode.build(geometry, _ENCODER_LAYERS.value, jnp.dtype(dtype), _SEED.value,
                                 cpu_kernels=implementation == 'gqa_t5x',
                                 weights_on_huge_pages=_HUGE_PAGES.value)
      # The rates are sampled all through the row (see roofline.MachineRates): rates measured
      # only before it once put a row at 111% of its floor, a slow moment beside a fast one.
      if rates.dtype != jnp.dtype(dtype):
        del rates  # its 1 GiB read buffer, before the next sampler's
        rates = _rates(dtype)
      rates.clear()
      rates.sample(2)
      t = timing.time_call(run, _WARMUP.value, _REPS.value, between=rates.sample)
      rates.sample(2)
      row = measure_row(level, implementation, geometry, dtype, t, peak, rates,
                        comparable=implementation != 'hf_t5' or same_device)
      row['load_average'] = os.getloadavg()[0]
      del run
      document['rows'].append(row)
      document['summary'] = report.summarize(document['rows'], _NUM_HEADS.value)
      document['machine']['load_average_end'] = os.getloadavg()
      elapsed = time.perf_counter() - start
      fraction = ('' if row['roofline_fraction'] is None
                  else f", {row['roofline_fraction']:.0%} of floor "
                       f"({row['roofline_fraction_at_fastest_rates']:.0%} at the fastest rates, "
                       f"{row['sequential_fraction']:.0%} of the sequential floor)")
      print(f'[{i + 1}/{len(plan)}] {level} {implementation} {dtype} G={g}: '
            f"{row['time_per_sample_s'] * 1e3:.3g} ms/sample (spread {row['spread']:.0%})"
            f'{fraction}; {elapsed:.0f} s elapsed, '
            f'ETA {elapsed / (i + 1) * (len(plan) - i - 1):.0f} s',
            flush=True)
      if write_outputs:
        write_outputs(document)
  return document


def _title(document) -> str:
  s, m = document['settings'], document['machine']
  return (f"H={s['num_heads']}x{s['head_dim']}, emb {s['emb_dim']}, decoder layers "
          f"{s['num_decoder_layers']}, input {s['input_length']}, output {s['output_length']}, "
          f"batch {s['batch']} on {m['platform']} ({m['device_kind']}), "
          f"{document['read_bandwidth_bytes_per_s'] / 1e9:.1f} GB/s")


def markdown(document) -> str:
  return (f"{_title(document)}\n\n{report.format_table(document['rows'])}\n\n"
          f"{report.format_summary(document['summary'])}\n")


def _writer(output_dir: str):
  os.makedirs(output_dir, exist_ok=True)

  def write(document):
    path = lambda ext: os.path.join(output_dir, f'{FILE_STEM}.{ext}')
    files.write_json(path('json'), document)
    files.write_text(path('md'), markdown(document))
    report.write_png(path('png'), document['rows'], _title(document))

  return write


def _main(argv):
  cli.no_positional_arguments(argv)
  document = benchmark(_writer(_OUTPUT_DIR.value) if _OUTPUT_DIR.value else None)
  print('\n' + markdown(document))


def main(argv=None):
  cli.run('gqa-t5x-benchmark', _main, __doc__, argv)


if __name__ == '__main__':
  main()
