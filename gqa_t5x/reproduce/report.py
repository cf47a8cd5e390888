"""results/: Table 1 (Markdown, JSON, CSV), Figures 3-6 (PNG) and which findings held, each
beside the paper's numbers. Reads only what the stages wrote (eval metrics, benchmark JSON).
"""
import csv
import io
import json
import math
import os
import statistics

from gqa_t5x.reproduce import paper
from gqa_t5x.reproduce.stages import BENCHMARK_FILE, EVAL_FILE, Plan, write_json_atomically

PRIMARY_METRICS = ('rouge1', 'bleu', 'f1')  # the paper's: ROUGE-1, BLEU, F1 (TriviaQA)
QUALITY_TIE = 0.1  # points: quality claims over scores closer than this are not decided
FIGURES = {'fig3': 'fig3_quality_vs_time.png', 'fig4': 'fig4_conversion.png',
           'fig5': 'fig5_uptraining.png', 'fig6': 'fig6_groups_vs_time.png'}


def _last_json_line(path: str) -> dict:
  with open(path) as f:
    return json.loads(f.read().strip().splitlines()[-1])


def _primary(task: str, metrics: dict) -> tuple[str, float]:
  for name in PRIMARY_METRICS:
    if name in metrics:
      return name, metrics[name]
  raise ValueError(f'task {task} reported {sorted(metrics)}, none of {PRIMARY_METRICS}')


def decode_times(plan: Plan) -> dict[int, float]:
  """G -> seconds per sample of the whole greedy decode, from gqa-t5x-benchmark's JSON."""
  with open(os.path.join(plan.benchmark_dir(), BENCHMARK_FILE)) as f:
    document = json.load(f)
  return {r['kv_heads']: r['time_per_sample_s'] for r in document['rows']
          if r['level'] == 'decode' and r['implementation'] == 'gqa_t5x'}


def collect(plan: Plan, times: dict) -> list[dict]:
  """One record per Table 1 row: scores per task, their average, T_infer (from `times`)."""
  h, records = plan.preset.num_heads, []
  for row in plan.rows:
    scores, primary, eval_ms = {}, {}, []
    for task, _ in plan.preset.finetune_tasks:
      last = _last_json_line(os.path.join(plan.eval_dir(row, task), EVAL_FILE))
      scores[task] = {k.split('/', 1)[1]: v for k, v in last.items() if k.startswith(task + '/')}
      primary[task] = _primary(task, scores[task])
      eval_ms.append(last['timing/decode_ms_per_sample'])
    records.append({
        'name': plan.row_name(row), 'model': row.variant.label(h), 'kv_heads': row.variant.kv_heads,
        'method': row.variant.method, 'alpha': row.alpha,
        'uptrain_steps': plan.preset.uptrain_steps(row.alpha), 'scores': scores,
        'primary': {t: {'metric': m, 'value': v} for t, (m, v) in primary.items()},
        'average': statistics.mean(v for _, v in primary.values()),
        't_infer_s': times[row.variant.kv_heads],
        'eval_decode_ms_per_sample': statistics.mean(eval_ms)})
  return records


def _find(records, kv_heads, alpha, method='mean'):
  return next(r for r in records
              if (r['kv_heads'], r['alpha'], r['method']) == (kv_heads, alpha, method))


def findings(plan: Plan, records: list[dict], times: dict[int, float]) -> list[dict]:
  """The paper's claims, each tested on this run's numbers.

  A quality claim whose scores all lie within QUALITY_TIE points of each other is reported as
  no measurable difference rather than held or not: at small scale every model can collapse to
  the same output, and equal scores support no ordering.
  """
  p, h = plan.preset, plan.preset.num_heads
  g, a, top = p.gqa_groups[0], p.main_alpha, max(p.alphas)
  mha, gqa, mqa = _find(records, h, 0.0), _find(records, g, a), _find(records, 1, a)
  gqa0, mqa0 = _find(records, g, 0.0), _find(records, 1, 0.0)
  gqa_top, mqa_top = _find(records, g, top), _find(records, 1, top)
  methods = [_find(records, 1, a, m) for m in ('mean',) + p.ablation_methods]
  avg = lambda r: f"{r['average']:.2f}"
  ms = lambda s: f'{1e3 * s:.3g} ms'
  claims = [  # (finding, paper, this run, held, rows whose scores it compares or None)
      ('MQA and GQA decode faster than MHA', 'MHA 1.51 s, GQA-8 0.28 s, MQA 0.24 s',
       f"MHA {ms(mha['t_infer_s'])}, GQA-{g} {ms(gqa['t_infer_s'])}, MQA {ms(mqa['t_infer_s'])}",
       mqa['t_infer_s'] < mha['t_infer_s'] and gqa['t_infer_s'] < mha['t_infer_s'], None),
      ('Uptrained GQA is closer to MHA quality than MQA is', 'MHA 47.2, GQA-8 47.1, MQA 46.6',
       f'MHA {avg(mha)}, GQA-{g} {avg(gqa)}, MQA {avg(mqa)}',
       abs(mha['average'] - gqa['average']) < abs(mha['average'] - mqa['average']),
       [mha, gqa, mqa]),
      ('Mean pooling converts best: mean > first > random', 'mean > first > random (Fig. 4)',
       ', '.join(f"{r['method']} {avg(r)}" for r in methods),
       all(x['average'] > y['average'] for x, y in zip(methods, methods[1:])), methods),
      ('Without uptraining GQA is usable and MQA is not (GQA > MQA at alpha 0)',
       'GQA 56.8, MQA 54.0 (Fig. 5)', f'GQA-{g} {avg(gqa0)}, MQA {avg(mqa0)}',
       gqa0['average'] > mqa0['average'], [gqa0, mqa0]),
      (f'Uptraining improves the converted models (alpha {top:g} > alpha 0)',
       'GQA 56.8 -> 57.5, MQA 54.0 -> 57.2 (Fig. 5)',
       f'GQA-{g} {avg(gqa0)} -> {avg(gqa_top)}, MQA {avg(mqa0)} -> {avg(mqa_top)}',
       gqa_top['average'] > gqa0['average'] and mqa_top['average'] > mqa0['average'],
       [gqa0, gqa_top, mqa0, mqa_top]),
      ('Time per sample grows with G; small G costs about what MQA costs',
       'G=1 0.48 s, G=8 0.51 s, G=64 2.5 s (Fig. 6)',
       ', '.join(f'G={k} {ms(v)}' for k, v in sorted(times.items())),
       times[1] < times[h] and times[g] < times[h], None),
  ]
  out = []
  for finding, paper_value, here, held, compared in claims:
    scores = [r['average'] for r in compared or ()]
    tie = bool(scores) and max(scores) - min(scores) < QUALITY_TIE
    verdict = 'no measurable difference' if tie else 'held' if held else 'did not hold'
    out.append({'finding': finding, 'paper': paper_value, 'this_run': here, 'verdict': verdict})
  return out


def _table_md(plan: Plan, records: list[dict]) -> str:
  tasks = [t for t, _ in plan.preset.finetune_tasks]
  metric = {t: records[0]['primary'][t]['metric'] for t in tasks}
  lines = ['| Model | alpha | T_infer (ms) | Average | ' + ' | '.join(
      f'{t} ({metric[t]})' for t in tasks) + ' |', '|---' * (4 + len(tasks)) + '|']
  for r in records:
    lines.append(f"| {r['model']} | {r['alpha']:g} | {1e3 * r['t_infer_s']:.3g} | "
                 f"{r['average']:.2f} | " + ' | '.join(
                     f"{r['primary'][t]['value']:.2f}" for t in tasks) + ' |')
  return '\n'.join(lines)


def _paper_table_md() -> str:
  lines = ['| Model | T_infer (s) | Average | ' + ' | '.join(paper.TABLE1_TASKS) + ' |',
           '|---' * (3 + len(paper.TABLE1_TASKS)) + '|']
  for model, (t, average, scores) in paper.TABLE1.items():
    lines.append(f'| {model} | {t} | {average} | ' + ' | '.join(map(str, scores)) + ' |')
  return '\n'.join(lines)


def markdown(plan: Plan, records, found, times) -> str:
  p, b = plan.preset, plan.preset.benchmark
  held = sum(f['verdict'] == 'held' for f in found)
  rows = '\n'.join(f"| {f['finding']} | {f['paper']} | {f['this_run']} | {f['verdict']} |"
                   for f in found)
  figures = '\n'.join(f'![{k}]({v})' for k, v in FIGURES.items())
  return f"""# GQA reproduction, preset `{p.name}`

{p.description}

Model `{p.model_gin}` (H = {p.num_heads}); pre-training {p.pretrain_steps} steps of
`{p.pretrain_task}`; uptraining alpha in {list(p.alphas)} of those steps; fine-tuning
{p.finetune_steps} steps at learning rate {p.finetune_learning_rate:g}; greedy decoding; seed
{p.seed}. T_infer: seconds per sample of a whole greedy decode measured by gqa-t5x-benchmark
(input {b.input_length}, output {b.output_length}, batch {b.batch}, median of {b.reps}).
Scores: the paper's metric per task (ROUGE-1 / BLEU / F1) on the validation split.

## Table 1, this run

{_table_md(plan, records)}

## Table 1, the paper (T5.1.1 on TPUv4)

{_paper_table_md()}

## The paper's findings at this scale ({held} of {len(found)} held)

One seed per row: a quality gap of a fraction of a point is within run-to-run noise, so a
finding that held or failed by a small margin is weak evidence either way. Quality claims whose
scores lie within {QUALITY_TIE} points of each other are reported as no measurable difference
(typically every model has collapsed to the same output: the scale is too small to learn the
task).

| Finding | Paper | This run | |
|---|---|---|---|
{rows}

## Figures (this run beside the paper)

{figures}
"""


def _csv(records: list[dict]) -> str:
  tasks = list(records[0]['primary'])
  buffer = io.StringIO()
  writer = csv.writer(buffer, lineterminator='\n')
  writer.writerow(['name', 'model', 'kv_heads', 'method', 'alpha', 'uptrain_steps',
                   't_infer_s', 'eval_decode_ms_per_sample', 'average']
                  + [f'{t}/{m}' for t in tasks for m in records[0]['scores'][t]])
  for r in records:
    writer.writerow([r[k] for k in ('name', 'model', 'kv_heads', 'method', 'alpha',
                                    'uptrain_steps', 't_infer_s', 'eval_decode_ms_per_sample',
                                    'average')]
                    + [r['scores'][t][m] for t in tasks for m in records[0]['scores'][t]])
  return buffer.getvalue()


def _write_text(path: str, text: str) -> None:
  tmp = path + '.tmp'
  with open(tmp, 'w') as f:
    f.write(text)
  os.replace(tmp, path)


def _plots(plan: Plan, records, times, results_dir: str) -> None:
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use('Agg')
  from matplotlib import pyplot as plt  # pylint: disable=g-import-not-at-top

  p, h = plan.preset, plan.preset.num_heads
  g, a = p.gqa_groups[0], p.main_alpha

  def save(fig, key):
    path = os.path.join(results_dir, FIGURES[key])
    fig.tight_layout()
    fig.savefig(path + '.tmp.png', dpi=100)
    plt.close(fig)
    os.replace(path + '.tmp.png', path)

  # Figure 3: quality against time per sample.
  fig, (ours, theirs) = plt.subplots(1, 2, figsize=(10, 4))
  for r in [_find(records, h, 0.0), _find(records, 1, a)] + [
      _find(records, k, a) for k in p.gqa_groups]:
    ours.scatter(1e3 * r['t_infer_s'], r['average'])
    ours.annotate(r['model'], (1e3 * r['t_infer_s'], r['average']))
  ours.set(title=f'This run ({p.name}, alpha {a:g})', xlabel='time per sample (ms)',
           ylabel='average score')
  for model, (t, average, _) in paper.TABLE1.items():
    theirs.scatter(t, average)
    theirs.annotate(model, (t, average))
  theirs.set(title='Paper (Fig. 3)', xlabel='time per sample (s)', ylabel='average score')
  save(fig, 'fig3')

  # Figure 4: conversion methods for MQA.
  fig, ax = plt.subplots(figsize=(5, 4))
  methods = ('mean',) + p.ablation_methods
  ax.bar(methods, [_find(records, 1, a, m)['average'] for m in methods])
  ax.set(title=f'MQA conversion, alpha {a:g} (paper: mean > first > random)',
         ylabel='average score')
  save(fig, 'fig4')

  # Figure 5: uptraining proportion.
  fig, (ours, theirs) = plt.subplots(1, 2, figsize=(10, 4))
  for k, label in ((g, f'GQA-{g}'), (1, 'MQA')):
    ours.plot(p.alphas, [_find(records, k, x)['average'] for x in p.alphas], 'o-', label=label)
  ours.axhline(_find(records, h, 0.0)['average'], color='gray', linestyle='--', label='MHA')
  ours.set(title=f'This run ({p.name})', xlabel='uptraining proportion alpha',
           ylabel='average score')
  ours.legend()
  for label, values in paper.FIG5.items():
    theirs.plot(paper.FIG5_ALPHAS, values, 'o-', label=label)
  theirs.axhline(paper.FIG5_MHA, color='gray', linestyle='--', label='MHA')
  theirs.set(title='Paper (Fig. 5, XXL)', xlabel='uptraining proportion alpha',
             ylabel='average score')
  theirs.legend()
  save(fig, 'fig5')

  # Figure 6: groups against time per sample.
  fig, (ours, theirs) = plt.subplots(1, 2, figsize=(10, 4))
  ours.plot(sorted(times), [1e3 * times[k] for k in sorted(times)], 'o-')
  ours.set(title=f'This run (H = {h}, gqa-t5x-benchmark)', ylabel='time per sample (ms)')
  theirs.plot(list(paper.FIG6), list(paper.FIG6.values()), 'o-')
  theirs.set(title='Paper (Fig. 6, XXL, 2048 -> 512)', ylabel='time per sample (s)')
  for ax, groups in ((ours, sorted(times)), (theirs, list(paper.FIG6))):
    ax.set_xscale('log', base=2)
    ax.set_xticks(groups, [str(k) for k in groups])
    ax.minorticks_off()
    ax.set_xlabel('kv heads G')
  save(fig, 'fig6')


def write(plan: Plan, results_dir: str) -> dict:
  """Writes table.md, results.json, results.csv and the figures; returns the JSON document."""
  os.makedirs(results_dir, exist_ok=True)
  times = decode_times(plan)
  records = collect(plan, times)
  bad = [r['name'] for r in records if not math.isfinite(r['average'])]
  if bad:
    raise ValueError(f'non-finite scores for {bad}: see their eval directories under '
                     f'{plan.path("eval")}')
  found = findings(plan, records, times)
  document = {'preset': plan.preset.name, 'description': plan.preset.description,
              'rows': records, 'decode_seconds_per_sample_by_kv_heads': times,
              'findings': found,
              'paper': {'table1': paper.TABLE1, 'fig5': paper.FIG5, 'fig5_mha': paper.FIG5_MHA,
                        'fig6': paper.FIG6, 'fig4_order': paper.FIG4_ORDER}}
  write_json_atomically(os.path.join(results_dir, 'results.json'), document)
  _write_text(os.path.join(results_dir, 'results.csv'), _csv(records))
  _write_text(os.path.join(results_dir, 'table.md'), markdown(plan, records, found, times))
  _plots(plan, records, times, results_dir)
  return document
