"""results/: Table 1 (Markdown, JSON, CSV), Figures 3-6 (PNG) and the paper's findings, decided.

Reads only what the stages recorded. Every quality number is a mean over the preset's seeds with
its 95% interval (stats.py); every claim of the paper is decided on two measures: the held-out
teacher-forced loss on the uptraining task (sensitive: it moves with every change of the model)
and the downstream score of the best fine-tuning checkpoint (the paper's measure).
"""
import csv
import io
import os
import statistics

from gqa_t5x import files
from gqa_t5x.reproduce import paper, stats
from gqa_t5x.reproduce.stages import Plan, Row, Variant, primary

FIGURES = {'fig3': 'fig3_quality_vs_time.png', 'fig4': 'fig4_conversion.png',
           'fig5': 'fig5_uptraining.png', 'fig6': 'fig6_groups_vs_time.png'}
HELDOUT = 'held-out loss'  # the measures a claim is decided on
DOWNSTREAM = 'downstream score'


# What the stages recorded, per row and seed.
def heldout_values(plan: Plan, variant: Variant, alpha: float, metric: str) -> list[float]:
  """The held-out metric ('cross_entropy' or 'accuracy') of a variant after alpha, per seed."""
  p = plan.preset
  if variant.kv_heads == p.num_heads and alpha == 0:
    scores = plan.stage('heldout mha').result()['heldout']
    return [_heldout(scores, metric)] * len(p.seeds)
  return [_heldout(plan.stage(plan.uptrain_name(variant.name(p.num_heads), s)).result()
                   ['heldout'][f'{alpha:g}'], metric) for s in p.seeds]


def _heldout(scores: dict, metric: str) -> float:
  return next(v for k, v in scores.items() if k.endswith('/' + metric))


def finetune_results(plan: Plan, row: Row, task: str) -> list[dict]:
  return [plan.stage(plan.finetune_name(plan.row_name(row), s, task)).result()
          for s in plan.preset.seeds]


def downstream_values(plan: Plan, row: Row) -> list[float]:
  """Per seed: the average over tasks of the paper's metric at the best checkpoint."""
  per_task = [[primary(task, r['best'])[1] for r in finetune_results(plan, row, task)]
              for task, _ in plan.preset.finetune_tasks]
  return [statistics.fmean(values) for values in zip(*per_task)]


def benchmark_rows(plan: Plan) -> dict[int, dict]:
  """Benchmark G -> its decode row (seconds, roofline fraction, ...)."""
  return {r['kv_heads']: r for r in plan.stage('benchmark').result()['rows']
          if r['level'] == 'decode'}


def collect(plan: Plan) -> list[dict]:
  """One record per Table 1 row."""
  p, h = plan.preset, plan.preset.num_heads
  bench = benchmark_rows(plan)
  records = []
  for row in plan.rows:
    v = row.variant
    bench_row = bench[p.benchmark_kv_heads(v.kv_heads)]
    tasks = {}
    for task, _ in p.finetune_tasks:
      results = finetune_results(plan, row, task)
      metrics = sorted(k.split('/', 1)[1] for k in results[0]['best'] if k.startswith(task + '/'))
      tasks[task] = {
          'metric': primary(task, results[0]['best'])[0],
          'scores': {m: _summary([r['best'][f'{task}/{m}'] for r in results]) for m in metrics},
          'best_steps': [r['best_step'] for r in results],
          'decode_ms_per_sample': statistics.fmean(
              r['best']['timing/decode_ms_per_sample'] for r in results)}
    records.append({
        'name': plan.row_name(row), 'model': v.label(h), 'kv_heads': v.kv_heads,
        'method': v.method, 'alpha': row.alpha, 'uptrain_steps': p.uptrain_steps(row.alpha),
        'heldout': {m: _summary(heldout_values(plan, v, row.alpha, m))
                    for m in ('cross_entropy', 'accuracy')},
        'tasks': tasks, 'average': _summary(downstream_values(plan, row)),
        'benchmark_kv_heads': bench_row['kv_heads'], 't_infer_s': bench_row['time_per_sample_s'],
        'roofline_fraction': bench_row['roofline_fraction'],
        'model_decode_ms_per_sample': statistics.fmean(
            t['decode_ms_per_sample'] for t in tasks.values())})
  return records


def _summary(values: list[float]) -> dict:
  return {**stats.interval(values).to_json(), 'values': values}


# The paper's findings.
def _quality(plan: Plan, measure: str, row: Row) -> list[float]:
  """Per-seed quality on a measure, oriented so that larger is better."""
  if measure == HELDOUT:
    return [-x for x in heldout_values(plan, row.variant, row.alpha, 'cross_entropy')]
  return downstream_values(plan, row)


def decide(comparisons: list[tuple[list[float], list[float]]], paired: bool = True) -> dict:
  """Each (a, b) claims mean(a) > mean(b); returns the verdict and each difference's interval."""
  diffs = [stats.difference(a, b, paired) for a, b in comparisons]
  return {'verdict': stats.combine([stats.verdict(d, +1) for d in diffs]),
          'differences': [d.to_json() for d in diffs]}


def _fmt_diff(d: dict, scale: float = 1.0, digits: int = 3) -> str:
  """'+mean [low, high]' of a difference, scaled (scale -1 turns 'larger is better' back into a
  loss difference)."""
  low, high = sorted((scale * d['low'], scale * d['high']))
  return f"{scale * d['mean']:+.{digits}f} [{low:+.{digits}f}, {high:+.{digits}f}]"


def quality_findings(plan: Plan) -> list[dict]:
  """The paper's quality claims, each on both measures, decided by paired seed differences."""
  p, h = plan.preset, plan.preset.num_heads
  g, a, top = p.gqa_groups[0], p.main_alpha, max(p.alphas)
  gqa, mqa = Variant(g), Variant(1)
  mha = Variant(h)
  claims = [  # (finding, paper, [(better row, worse row, words)], measures)
      (f'Uptrained GQA-{g} beats uptrained MQA (GQA is closer to MHA)',
       'MHA 47.2, GQA-8 47.1, MQA 46.6 (Table 1)',
       [(Row(gqa, a), Row(mqa, a), f'GQA-{g} - MQA at alpha {a:g}')], (HELDOUT, DOWNSTREAM)),
      ('MHA beats uptrained MQA (MQA costs quality; MHA trained as many steps)',
       'MHA 47.2, MQA 46.6 (Table 1)',
       [(Row(mha, a), Row(mqa, a), f'MHA - MQA at alpha {a:g}')], (HELDOUT, DOWNSTREAM)),
      ('Mean pooling converts best: mean > first > random (MQA)',
       'mean > first > random (Fig. 4, alpha 0.05)',
       [(Row(Variant(1, x), a), Row(Variant(1, y), a), f'{x} - {y} at alpha {a:g}')
        for x, y in _ablation_pairs(p.ablation_methods)], (HELDOUT, DOWNSTREAM)),
      ('Right after conversion, mean > first > random (MQA)', 'not shown in the paper',
       [(Row(Variant(1, x), 0.0), Row(Variant(1, y), 0.0), f'{x} - {y} at alpha 0')
        for x, y in _ablation_pairs(p.ablation_methods)], (HELDOUT,)),
      (f'Without uptraining GQA-{g} is usable and MQA is not (GQA > MQA at alpha 0)',
       'GQA 56.8, MQA 54.0 (Fig. 5)',
       [(Row(gqa, 0.0), Row(mqa, 0.0), f'GQA-{g} - MQA at alpha 0')], (HELDOUT, DOWNSTREAM)),
      (f'Uptraining improves GQA-{g} (alpha {top:g} > alpha 0)', 'GQA 56.8 -> 57.5 (Fig. 5)',
       [(Row(gqa, top), Row(gqa, 0.0), f'GQA-{g} alpha {top:g} - alpha 0')],
       (HELDOUT, DOWNSTREAM)),
      (f'Uptraining improves MQA (alpha {top:g} > alpha 0)', 'MQA 54.0 -> 57.2 (Fig. 5)',
       [(Row(mqa, top), Row(mqa, 0.0), f'MQA alpha {top:g} - alpha 0')], (HELDOUT, DOWNSTREAM)),
  ]
  if 'aligned' in p.ablation_methods:
    claims.append(('Aligned pooling beats mean pooling (MQA; this project, not the paper)',
                   'not in the paper (issue: align heads before pooling)',
                   [(Row(Variant(1, 'aligned'), alpha), Row(mqa, alpha),
                     f'aligned - mean at alpha {alpha:g}')
                    for alpha in (0.0, a)], (HELDOUT,)))
  out = []
  for finding, paper_value, comparisons, measures in claims:
    for measure in measures:
      usable = [c for c in comparisons if _measured(plan, c[0], measure) and _measured(
          plan, c[1], measure)]
      if not usable:
        continue
      decided = decide([(_quality(plan, measure, x), _quality(plan, measure, y))
                        for x, y, _ in usable])
      if measure == HELDOUT:  # shown as cross entropy differences: negative favours the first
        compared = '; '.join(f'{words}: {_fmt_diff(d, -1.0)} nats/token cross entropy'
                             for (_, _, words), d in zip(usable, decided['differences']))
      else:
        compared = '; '.join(f'{words}: {_fmt_diff(d, 1.0, 2)} points'
                             for (_, _, words), d in zip(usable, decided['differences']))
      out.append({'finding': finding, 'measure': measure, 'paper': paper_value,
                  'compared': compared, **decided})
  return out


def _measured(plan: Plan, row: Row, measure: str) -> bool:
  """Whether the run has the row on the measure: fine-tuned rows downstream; held-out scores at
  every alpha a variant was uptrained to (and at 0)."""
  if measure == DOWNSTREAM:
    return row in plan.rows
  return row.variant in plan.variants and row.alpha in plan.variant_alphas(row.variant)


def _ablation_pairs(methods: tuple[str, ...]) -> list[tuple[str, str]]:
  """The paper's order among the methods present: mean > first > random."""
  order = [m for m in paper.FIG4_ORDER if m == 'mean' or m in methods]
  return list(zip(order, order[1:]))


def speed_findings(plan: Plan) -> list[dict]:
  """Speed claims on the benchmark's repeated timings (unpaired: each call is its own sample)."""
  p = plan.preset
  bench = benchmark_rows(plan)
  times = lambda k: [t / p.benchmark.batch for t in bench[k]['times_s']]  # per sample
  mha, gqa, mqa = (p.benchmark_kv_heads(k) for k in (p.num_heads, p.gqa_groups[0], 1))
  ms = lambda k: f"G={k} {1e3 * bench[k]['time_per_sample_s']:.3g} ms"
  faster = [stats.difference(times(mha), times(x), paired=False) for x in (gqa, mqa)]
  # Closer to MQA than to MHA: t(GQA) - t(MQA) < t(MHA) - t(GQA), i.e. 2 t(GQA) < t(MHA) + t(MQA).
  keep = stats.difference([a + c for a, c in zip(times(mha), times(mqa))],
                          [2 * b for b in times(gqa)], paired=False)
  calls = f'XXL heads, {p.benchmark.reps} timed calls each'
  return [
      {'finding': 'MQA and GQA decode faster than MHA', 'measure': 'time per sample',
       'paper': 'MHA 1.51 s, GQA-8 0.28 s, MQA 0.24 s (Table 1)',
       'compared': f'{ms(mha)}, {ms(gqa)}, {ms(mqa)} ({calls})',
       'verdict': stats.combine([stats.verdict(d, +1) for d in faster]),
       'differences': [d.to_json() for d in faster]},
      {'finding': "GQA keeps most of MQA's speed-up (its time is closer to MQA's than to MHA's)",
       'measure': 'time per sample', 'paper': 'G=8 0.51 s, G=1 0.48 s, MHA 2.5 s (Fig. 6)',
       'compared': f'{ms(gqa)} against {ms(mha)} and {ms(mqa)} ({calls})',
       'verdict': stats.verdict(keep, +1), 'differences': [keep.to_json()]},
  ]


# Tables.
def _cell(summary: dict, scale: float = 1.0, digits: int = 2) -> str:
  """'mean ± half-width of the 95% interval'."""
  half = (summary['high'] - summary['low']) / 2
  return f"{scale * summary['mean']:.{digits}f} ± {scale * half:.{digits}f}"


def _table_md(plan: Plan, records: list[dict], baseline_scores: dict) -> str:
  tasks = [t for t, _ in plan.preset.finetune_tasks]
  metric = {t: records[0]['tasks'][t]['metric'] for t in tasks}
  head = ('| Model | alpha | T_infer (ms, XXL heads) | of roofline | T_infer (ms, this model) '
          '| held-out loss | held-out accuracy (%) | Average | '
          + ' | '.join(f'{t} ({metric[t]})' for t in tasks) + ' |')
  lines = [head, '|---' * (8 + len(tasks)) + '|']
  for r in records:
    fraction = '–' if r['roofline_fraction'] is None else f"{r['roofline_fraction']:.0%}"
    lines.append(
        f"| {r['model']} | {r['alpha']:g} | {1e3 * r['t_infer_s']:.3g} "
        f"(G={r['benchmark_kv_heads']}) | {fraction} | {r['model_decode_ms_per_sample']:.3g} | "
        f"{_cell(r['heldout']['cross_entropy'], digits=3)} | "
        f"{_cell(r['heldout']['accuracy'], 100, 1)} | {_cell(r['average'])} | "
        + ' | '.join(_cell(r['tasks'][t]['scores'][metric[t]]) for t in tasks) + ' |')
  for name in baseline_scores[tasks[0]]:
    values = [baseline_scores[t][name][metric[t]] for t in tasks]
    lines.append(f'| baseline: {name} | – | – | – | – | – | – | {statistics.fmean(values):.2f} | '
                 + ' | '.join(f'{v:.2f}' for v in values) + ' |')
  return '\n'.join(lines)


def _paper_table_md() -> str:
  lines = ['| Model | T_infer (s) | Average | ' + ' | '.join(paper.TABLE1_TASKS) + ' |',
           '|---' * (3 + len(paper.TABLE1_TASKS)) + '|']
  for model, (t, average, scores) in paper.TABLE1.items():
    lines.append(f'| {model} | {t} | {average} | ' + ' | '.join(map(str, scores)) + ' |')
  return '\n'.join(lines)


def _findings_md(found: list[dict]) -> str:
  lines = ['| Finding | Measure | Paper | This run: difference [95% interval] | Verdict |',
           '|---|---|---|---|---|']
  lines += [f"| {f['finding']} | {f['measure']} | {f['paper']} | {f['compared']} | "
            f"**{f['verdict']}** |" for f in found]
  return '\n'.join(lines)


def markdown(plan: Plan, records, baseline_scores, found) -> str:
  p, b = plan.preset, plan.preset.benchmark
  counts = ', '.join(f"{sum(f['verdict'] == v for f in found)} {v}" for v in stats.VERDICTS)
  figures = '\n'.join(f'![{k}]({v})' for k, v in FIGURES.items())
  tasks = ', '.join(f'`{t}`' for t, _ in p.finetune_tasks)
  return f"""# GQA reproduction, preset `{p.name}`

{p.description}

Model `{p.model_gin}` (H = {p.num_heads}); pre-training {p.pretrain_steps} steps of
`{p.pretrain_task}` (seed {p.pretrain_seed}); uptraining alpha in {list(p.alphas)} of those
steps; fine-tuning {p.finetune_steps} steps on {tasks} at learning rate
{p.finetune_learning_rate:g}, dropout 0.1, {p.finetune_checkpoints} periodic checkpoints each
scored on the validation split by greedy decoding, the best one reported (as the paper does).
Seeds {list(p.seeds)} fix the uptraining and fine-tuning data order and dropout: every quality
cell is the mean over them ± the half-width of its 95% t interval (n = {len(p.seeds)}). Held-out
loss: teacher-forced cross entropy (nats per target token) on the validation split of
`{p.heldout_task}`; it does not depend on the seed at alpha 0 (except for random
initialisation), so its interval there is zero. T_infer: seconds per sample of a whole greedy
decode measured by gqa-t5x-benchmark at the paper's XXL head layout ({b.num_heads} heads x
{b.head_dim}, d_model {b.emb_dim}, {b.num_decoder_layers} decoder layer(s), input
{b.input_length}, output {b.output_length}, batch {b.batch}, median of {b.reps}), each row at the
same number of query heads per kv head as the trained model's G, beside the fraction of the
memory-bandwidth roofline it reached; the trained model's own greedy time on the task is the
next column.

## Table 1, this run

{_table_md(plan, records, baseline_scores)}

## Table 1, the paper (T5.1.1 on TPUv4)

{_paper_table_md()}

## The paper's findings at this scale ({counts})

A claim "A beats B" is decided by the 95% interval of the per-seed difference A - B (paired: the
same seed gave both rows the same batches and dropout): entirely on the claimed side of zero,
**held**; entirely on the other side, **contradicted**; across zero, **inconclusive**. Speed
claims use the benchmark's repeated calls (unpaired). Held-out differences are in cross entropy (nats
per target token): negative favours the first-named row.

{_findings_md(found)}

## Figures (this run beside the paper)

{figures}
"""


def _csv(records: list[dict]) -> str:
  buffer = io.StringIO()
  writer = csv.writer(buffer, lineterminator='\n')
  tasks = list(records[0]['tasks'])
  writer.writerow(['name', 'model', 'kv_heads', 'method', 'alpha', 'uptrain_steps',
                   'benchmark_kv_heads', 't_infer_s', 'roofline_fraction',
                   'model_decode_ms_per_sample', 'heldout_cross_entropy', 'heldout_ce_low',
                   'heldout_ce_high', 'heldout_accuracy', 'average', 'average_low', 'average_high']
                  + [f'{t}/{m}' for t in tasks for m in records[0]['tasks'][t]['scores']])
  for r in records:
    ce, avg = r['heldout']['cross_entropy'], r['average']
    writer.writerow([r[k] for k in ('name', 'model', 'kv_heads', 'method', 'alpha',
                                    'uptrain_steps', 'benchmark_kv_heads', 't_infer_s',
                                    'roofline_fraction', 'model_decode_ms_per_sample')]
                    + [ce['mean'], ce['low'], ce['high'], r['heldout']['accuracy']['mean'],
                       avg['mean'], avg['low'], avg['high']]
                    + [r['tasks'][t]['scores'][m]['mean'] for t in tasks
                       for m in records[0]['tasks'][t]['scores']])
  return buffer.getvalue()


# Figures.
def _yerr(summaries) -> list[list[float]]:
  """matplotlib's [below, above] error bars of interval summaries."""
  return [[s['mean'] - s['low'] for s in summaries], [s['high'] - s['mean'] for s in summaries]]


def _errorbar(ax, x, summaries, label, **kwargs):
  ax.errorbar(x, [s['mean'] for s in summaries], yerr=_yerr(summaries), capsize=3, label=label,
              **kwargs)


def _plots(plan: Plan, records: list[dict], baseline_scores: dict, results_dir: str) -> None:
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use('Agg')
  from matplotlib import pyplot as plt  # pylint: disable=g-import-not-at-top

  p, h = plan.preset, plan.preset.num_heads
  g, a = p.gqa_groups[0], p.main_alpha
  by_key = {(r['kv_heads'], r['alpha'], r['method']): r for r in records}
  find = lambda k, alpha, method='mean': by_key[(k, alpha, method)]
  mha = find(h, 0.0)
  downstream = 'average score (95% CI)'
  ce = 'held-out loss, nats/token (95% CI)'

  def save(fig, key):
    path = os.path.join(results_dir, FIGURES[key])
    fig.tight_layout()
    fig.savefig(path + '.tmp.png', dpi=100)
    plt.close(fig)
    os.replace(path + '.tmp.png', path)

  # Figure 3: quality against time per sample.
  fig, (ours, theirs) = plt.subplots(1, 2, figsize=(10, 4))
  for r in [mha, find(1, a)] + [find(k, a) for k in p.gqa_groups]:
    _errorbar(ours, [1e3 * r['t_infer_s']], [r['average']], r['model'], fmt='o')
  for name, scores in baseline_scores[p.finetune_tasks[0][0]].items():
    ours.axhline(max(scores.values()), color='gray', linestyle=':', label=f'baseline: {name}')
  ours.set(title=f'This run ({p.name}, alpha {a:g})', xlabel='time per sample, XXL heads (ms)',
           ylabel=downstream)
  ours.legend(fontsize=7)
  for model, (t, average, _) in paper.TABLE1.items():
    theirs.scatter(t, average)
    theirs.annotate(model, (t, average))
  theirs.set(title='Paper (Fig. 3)', xlabel='time per sample (s)', ylabel='average score')
  save(fig, 'fig3')

  # Figure 4: conversion methods for MQA; held-out loss is the main panel.
  methods = ('mean',) + p.ablation_methods
  fig, (main, side) = plt.subplots(1, 2, figsize=(10, 4))
  width = 0.8 / 2
  for i, alpha in enumerate((0.0, a)):
    rows = [by_key.get((1, alpha, m)) for m in methods]  # fine-tuned at the main alpha only
    values = [_heldout_summary(plan, Variant(1, m), alpha) for m in methods]
    xs = [j + (i - 0.5) * width for j in range(len(methods))]
    main.bar(xs, [v['mean'] for v in values], width, yerr=_yerr(values), capsize=3,
             label=f'alpha {alpha:g}')
    if all(rows):
      averages = [r['average'] for r in rows]
      side.bar(xs, [v['mean'] for v in averages], width, yerr=_yerr(averages), capsize=3,
               label=f'alpha {alpha:g}')
  main.axhline(mha['heldout']['cross_entropy']['mean'], color='gray', linestyle='--', label='MHA')
  main.set_xticks(range(len(methods)), methods)
  main.set(title='MQA conversion (paper: mean > first > random)', ylabel=ce)
  main.legend(fontsize=8)
  side.set_xticks(range(len(methods)), methods)
  side.set(title=f'Downstream after fine-tuning', ylabel=downstream)
  side.legend(fontsize=8)
  save(fig, 'fig4')

  # Figure 5: uptraining proportion; held-out loss is the main panel.
  fig, (main, side, theirs) = plt.subplots(1, 3, figsize=(14, 4))
  for k, label in ((g, f'GQA-{g}'), (1, 'MQA')):
    _errorbar(main, p.alphas, [_heldout_summary(plan, Variant(k), x) for x in p.alphas], label,
              marker='o')
    _errorbar(side, p.alphas, [find(k, x)['average'] for x in p.alphas], label, marker='o')
  trained_on = [mha, find(h, a)]  # MHA as pre-trained, and trained on as long as the uptraining
  _errorbar(main, [0.0, a], [r['heldout']['cross_entropy'] for r in trained_on], 'MHA',
            color='gray', linestyle='--', marker='s')
  _errorbar(side, [0.0, a], [r['average'] for r in trained_on], 'MHA', color='gray',
            linestyle='--', marker='s')
  main.set(title=f'This run: held-out loss ({p.name})', xlabel='uptraining proportion alpha',
           ylabel=ce)
  side.set(title='This run: downstream', xlabel='uptraining proportion alpha', ylabel=downstream)
  for label, values in paper.FIG5.items():
    theirs.plot(paper.FIG5_ALPHAS, values, 'o-', label=label)
  theirs.axhline(paper.FIG5_MHA, color='gray', linestyle='--', label='MHA')
  theirs.set(title='Paper (Fig. 5, XXL)', xlabel='uptraining proportion alpha',
             ylabel='average score')
  for ax in (main, side, theirs):
    ax.legend(fontsize=8)
  save(fig, 'fig5')

  # Figure 6: groups against time per sample, with the memory-bandwidth floor.
  bench = benchmark_rows(plan)
  groups = sorted(bench)
  fig, (ours, theirs) = plt.subplots(1, 2, figsize=(10, 4))
  ours.plot(groups, [1e3 * bench[k]['time_per_sample_s'] for k in groups], 'o-', label='measured')
  if all(bench[k]['floor_per_sample_s'] for k in groups):
    ours.plot(groups, [1e3 * bench[k]['floor_per_sample_s'] for k in groups], 'k--',
              label='roofline (bytes / bandwidth)')
  b = p.benchmark
  ours.set(title=f'This run ({b.num_heads} heads x {b.head_dim}, in {b.input_length}, '
                 f'out {b.output_length})', ylabel='time per sample (ms)')
  ours.legend(fontsize=8)
  theirs.plot(list(paper.FIG6), list(paper.FIG6.values()), 'o-')
  theirs.set(title='Paper (Fig. 6, XXL, 2048 -> 512)', ylabel='time per sample (s)')
  for ax, ticks in ((ours, groups), (theirs, list(paper.FIG6))):
    ax.set_xscale('log', base=2)
    ax.set_xticks(ticks, [str(k) for k in ticks])
    ax.minorticks_off()
    ax.set_xlabel('kv heads G')
  save(fig, 'fig6')


def _heldout_summary(plan: Plan, variant: Variant, alpha: float) -> dict:
  return _summary(heldout_values(plan, variant, alpha, 'cross_entropy'))


def write(plan: Plan, results_dir: str) -> dict:
  """Writes table.md, results.json, results.csv and the figures; returns the JSON document."""
  os.makedirs(results_dir, exist_ok=True)
  records = collect(plan)
  baseline_scores = {t: plan.stage(f'baselines {t}').result() for t, _ in plan.preset.finetune_tasks}
  found = quality_findings(plan) + speed_findings(plan)
  p = plan.preset
  document = {'preset': p.name, 'description': p.description, 'seeds': list(p.seeds),
              'rows': records, 'baselines': baseline_scores,
              'heldout_mha': plan.stage('heldout mha').result(),
              'benchmark': plan.stage('benchmark').result(), 'findings': found,
              'paper': {'table1': paper.TABLE1, 'fig5': paper.FIG5, 'fig5_mha': paper.FIG5_MHA,
                        'fig6': paper.FIG6, 'fig4_order': paper.FIG4_ORDER}}
  files.write_json(os.path.join(results_dir, 'results.json'), document)
  files.write_text(os.path.join(results_dir, 'results.csv'), _csv(records))
  files.write_text(os.path.join(results_dir, 'table.md'),
              markdown(plan, records, baseline_scores, found))
  _plots(plan, records, baseline_scores, results_dir)
  return document
