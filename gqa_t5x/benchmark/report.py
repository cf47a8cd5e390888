"""Results as a Markdown table (stdout), JSON (machines) and a PNG of G against time per sample.

A row is a plain dict (see cli.measure_row); the summary turns rows into the issue's targets:
how far each time is above its floor, whether time ever rises as G falls, and the side-by-side
speed-ups (MHA / GQA-8, peer / ours, XLA's einsums / the CPU kernel) from one run.
"""
from gqa_t5x import files

MIB = 1 << 20
NOISE_ALLOWANCE = 1.10  # a smaller G may time up to 10% slower before it counts as "rises"


def _ms(seconds):
  return '-' if seconds is None else f'{seconds * 1e3:.3g}'


def _mib(nbytes):
  return '-' if nbytes is None else f'{nbytes / MIB:,.1f}'


def format_table(rows) -> str:
  """One Markdown row per measurement; times in ms, sizes in MiB."""
  header = ('| level | impl | dtype | G | ms/sample (median) | spread | read MiB/step | GB/s | '
            'GFLOP/s | floor ms/sample | bound | of floor | of floor at fastest rates | '
            'of sequential floor | KV MiB/sample | peak MiB |')
  lines = [header, '|' + '---|' * (header.count('|') - 1)]
  percent = lambda fraction: '-' if fraction is None else f'{fraction:.0%}'
  for r in rows:
    fraction = (f"{percent(r['roofline_fraction'])} | "
                f"{percent(r['roofline_fraction_at_fastest_rates'])} | "
                f"{percent(r['sequential_fraction'])}")
    lines.append(
        f"| {r['level']} | {r['implementation']} | {r['dtype']} | {r['kv_heads']} | "
        f"{_ms(r['time_per_sample_s'])} | {r['spread']:.0%} | {_mib(r['bytes_per_step'])} | "
        f"{r['read_bandwidth_bytes_per_s'] / 1e9:.1f} | {r['matmul_flops_per_s'] / 1e9:.0f} | "
        f"{_ms(r['floor_per_sample_s'])} | {r['bound'] or '-'} | {fraction} | "
        f"{_mib(r['kv_cache_bytes_per_sample'])} | "
        f"{_mib(r['peak_bytes'])} |")
  return '\n'.join(lines)


def _series(rows, level, implementation, dtype):
  """{G: row} for one curve."""
  return {r['kv_heads']: r for r in rows if (r['level'], r['implementation'], r['dtype'])
          == (level, implementation, dtype)}


def summarize(rows, num_heads: int) -> dict:
  """The issue's targets, computed from this run's rows only (ratios are side by side)."""
  summary = {}
  for level, implementation, dtype in sorted({(r['level'], r['implementation'], r['dtype'])
                                              for r in rows}):
    series = _series(rows, level, implementation, dtype)
    key = f'{level}/{implementation}/{dtype}'
    above = [r['time_per_sample_s'] / r['floor_per_sample_s'] for r in series.values()
             if r['floor_per_sample_s']]
    kv = sorted(series, reverse=True)  # H ... 1
    rises = [series[b]['time_per_sample_s'] / series[a]['time_per_sample_s']
             for a, b in zip(kv, kv[1:])]
    above_fastest = [r['time_per_sample_s'] / r['fastest_floor_per_sample_s']
                     for r in series.values() if r['fastest_floor_per_sample_s']]
    entry = {'worst_times_floor': max(above) if above else None,
             'worst_times_fastest_floor': max(above_fastest) if above_fastest else None}
    if rises:
      entry['worst_rise_as_g_falls'] = max(rises)
      entry['never_rises'] = max(rises) <= NOISE_ALLOWANCE
    for g, name in ((8, 'gqa8'), (1, 'mqa')):
      if num_heads in series and g in series and num_heads != g:
        mha, other = series[num_heads], series[g]
        entry[f'speedup_{name}_over_mha'] = mha['time_per_sample_s'] / other['time_per_sample_s']
        # The most the bytes allow (bandwidth-free: rows may see different bandwidths).
        entry[f'floor_speedup_{name}_over_mha'] = mha['bytes_per_step'] / other['bytes_per_step']
    summary[key] = entry
  for dtype in sorted({r['dtype'] for r in rows}):
    ours = _series(rows, 'decode', 'gqa_t5x', dtype)
    xla = _series(rows, 'decode', 'gqa_t5x_xla', dtype)
    for g in sorted(set(ours) & set(xla), reverse=True):
      summary.setdefault(f'xla/{dtype}', {})[f'xla_over_kernel_G{g}'] = (
          xla[g]['time_per_sample_s'] / ours[g]['time_per_sample_s'])
    peer = _series(rows, 'decode', 'hf_t5', dtype).get(num_heads)
    if peer is None:
      continue
    for g, name in ((num_heads, 'peer_over_our_mha'), (8, 'peer_over_our_gqa8')):
      if g in ours:
        summary.setdefault(f'peer/{dtype}', {})[name] = (peer['time_per_sample_s']
                                                         / ours[g]['time_per_sample_s'])
  return summary


def format_summary(summary: dict) -> str:
  lines = []
  for key, entry in summary.items():
    parts = [f'{name}={value:.2f}' if isinstance(value, float) else f'{name}={value}'
             for name, value in entry.items() if value is not None]
    lines.append(f'{key}: ' + ', '.join(parts))
  return '\n'.join(lines)


def write_png(path: str, rows, title: str) -> None:
  """Time per sample against G (log-log), one panel per level, measured lines and dashed floors;
  the peer (MHA only) is a marker at G = H."""
  try:
    import matplotlib
  except ImportError:
    print(f'matplotlib is not installed: {path} not written')
    return
  matplotlib.use('Agg')
  from matplotlib import pyplot as plt

  levels = [level for level in ('attention', 'decode') if any(r['level'] == level for r in rows)]
  fig, panels = plt.subplots(1, max(len(levels), 1), figsize=(6 * max(len(levels), 1), 4.5),
                             squeeze=False)
  for panel, level in zip(panels[0], levels):
    for implementation, dtype in sorted({(r['implementation'], r['dtype']) for r in rows
                                         if r['level'] == level}):
      series = _series(rows, level, implementation, dtype)
      g = sorted(series)
      ms = [series[k]['time_per_sample_s'] * 1e3 for k in g]
      label = f'{implementation} {dtype}'
      line, = panel.plot(g, ms, 'o-' if implementation == 'gqa_t5x' else 's', label=label,
                         markersize=8 if implementation != 'gqa_t5x' else 5)
      floors = [series[k]['floor_per_sample_s'] for k in g]
      if implementation == 'gqa_t5x' and all(floors):
        panel.plot(g, [f * 1e3 for f in floors], '--', color=line.get_color(),
                   label=f'floor {dtype} (roofline)')
    panel.set_xscale('log', base=2)
    panel.set_yscale('log')
    panel.set_xlabel('key/value heads G (H = MHA, 1 = MQA)')
    panel.set_ylabel('time per sample (ms)')
    panel.set_title({'attention': 'attention decode step', 'decode': 'whole greedy decode'}[level])
    panel.grid(True, which='both', alpha=0.3)
    panel.legend(fontsize=8)
  fig.suptitle(title, fontsize=8, wrap=True)
  fig.tight_layout()
  files.write_atomically(path, lambda f: fig.savefig(f, format='png', dpi=110))
  plt.close(fig)
