"""The reproduction pipeline end to end at smoke size: every stage with two seeds, Table 1 / JSON /
CSV / Figures 3-6 with an interval for every quality cell, conversions and step counts as the
paper's recipe prescribes, the best fine-tuning checkpoint kept, and a rerun that reuses
finished stages and redoes only a deleted one with identical scores."""
import csv
import json
import math
import shutil
import statistics
import subprocess
import sys

import numpy as np
import pytest

from gqa_t5x import errors, files
from gqa_t5x.reproduce import presets, stages
from tests import runner_helpers as helpers

TASK = 'gqa_embedded_module_qa'
# The smoke preset's rows, listed by hand from the paper's design: MHA as pre-trained and trained
# on for alpha 0.1 (the control); GQA-2 and MQA at alpha 0 and 0.1 (Figure 5); MQA converted by
# first head and at random (Figure 4).
ROWS = ['mha-alpha0', 'mha-alpha0.1', 'gqa2-alpha0', 'gqa2-alpha0.1', 'mqa-alpha0', 'mqa-alpha0.1',
        'mqa-first-alpha0.1', 'mqa-random-alpha0.1']
SEEDS = (0, 1)
HEAD_DIM, NUM_HEADS = 16, 8  # models/t5_1_1/tiny.gin
PRETRAIN_STEPS, UPTRAIN_STEPS, FINETUNE_STEPS = 20, 2, 4  # alpha 0.1 of 20 steps = 2
PNG_MAGIC = b'\x89PNG\r\n\x1a\n'


def _reproduce(output_dir, cache_dir, *flags):
  env = helpers.env(str(cache_dir), num_devices=1)  # one CPU device, as a user's run
  return subprocess.run(
      [sys.executable, '-m', 'gqa_t5x.reproduce', '--preset=smoke', f'--output_dir={output_dir}',
       *flags], cwd=helpers.REPO, env=env, capture_output=True, text=True, timeout=900)


def _ok(process):
  assert process.returncode == 0, process.stdout[-3000:] + process.stderr[-5000:]
  return process.stdout


def _marker(output_dir, *parts):
  with open(output_dir.joinpath('work', *parts, stages.MARKER)) as f:
    return json.load(f)['result']


@pytest.fixture(scope='module')
def smoke(tmp_path_factory):
  output_dir = tmp_path_factory.mktemp('smoke')
  cache_dir = tmp_path_factory.mktemp('cache')
  _ok(_reproduce(output_dir, cache_dir))
  with open(output_dir / 'results.json') as f:
    return output_dir, cache_dir, json.load(f)


def _is_interval(cell, n):
  return (len(cell['values']) == n and cell['low'] <= cell['mean'] <= cell['high']
          and all(math.isfinite(v) for v in cell['values'])
          and cell['mean'] == pytest.approx(statistics.fmean(cell['values'])))


def test_every_quality_cell_is_a_mean_over_seeds_with_an_interval(smoke):
  output_dir, _, results = smoke
  assert [r['name'] for r in results['rows']] == ROWS
  for row in results['rows']:
    assert _is_interval(row['heldout']['cross_entropy'], len(SEEDS))
    assert _is_interval(row['heldout']['accuracy'], len(SEEDS))
    assert _is_interval(row['average'], len(SEEDS))
    for cell in row['tasks'][TASK]['scores'].values():
      assert _is_interval(cell, len(SEEDS))
    # Each seed's downstream score is its best scored fine-tuning checkpoint.
    for seed, value in zip(SEEDS, row['tasks'][TASK]['scores']['f1']['values']):
      recorded = _marker(output_dir, 'finetune', row['name'], f'seed{seed}', TASK)
      assert value == max(e[f'{TASK}/f1'] for e in recorded['evals'].values())
    assert math.isfinite(row['t_infer_s']) and row['t_infer_s'] > 0
  with open(output_dir / 'results.csv') as f:
    table = list(csv.DictReader(f))
  assert [r['name'] for r in table] == ROWS
  assert [float(r['average']) for r in table] == [r['average']['mean'] for r in results['rows']]


def test_held_out_scores_are_the_stages_own(smoke):
  output_dir, _, results = smoke
  rows = {r['name']: r for r in results['rows']}
  mha = _marker(output_dir, 'heldout')['heldout'][
      'train_eval/gqa_embedded_span_corruption/cross_entropy']
  assert rows['mha-alpha0']['heldout']['cross_entropy']['values'] == [mha] * len(SEEDS)
  for seed, value in zip(SEEDS, rows['mqa-alpha0.1']['heldout']['cross_entropy']['values']):
    recorded = _marker(output_dir, 'uptrain', 'mqa', f'seed{seed}')['heldout']['0.1']
    assert value == recorded['train_eval/gqa_embedded_span_corruption/cross_entropy']


def test_markdown_table_has_one_line_per_row_baselines_and_the_papers_table(smoke):
  output_dir, _, results = smoke
  text = (output_dir / 'table.md').read_text()
  for row in results['rows']:
    assert f"| {row['model']} | {row['alpha']:g} | " in text
  assert '| baseline: constant |' in text and '| baseline: lead |' in text
  assert '| GQA-8-XXL | 0.28 | 47.1 |' in text  # the paper's Table 1 beside ours
  assert {f['verdict'] for f in results['findings']} <= {'held', 'contradicted', 'inconclusive'}
  assert all(f['compared'] for f in results['findings'])


def test_figures_3_to_6_are_png_images(smoke):
  output_dir, _, _ = smoke
  from matplotlib import image
  for name in ('fig3_quality_vs_time', 'fig4_conversion', 'fig5_uptraining',
               'fig6_groups_vs_time'):
    path = output_dir / f'{name}.png'
    assert path.read_bytes()[:8] == PNG_MAGIC
    height, width, _ = image.imread(path).shape
    assert height >= 300 and width >= 400


def test_conversions_pool_the_pretrained_kv_heads_as_asked(smoke):
  output_dir, _, _ = smoke
  plan = stages.Plan(presets.get('smoke'), str(output_dir / 'work'))
  key = 'decoder/layers_0/self_attention/key/kernel'
  pretrained = helpers.read_params(str(output_dir / 'work' / 'pretrain' /
                                       f'checkpoint_{PRETRAIN_STEPS}'))
  heads = pretrained[key].reshape(-1, NUM_HEADS, HEAD_DIM)  # [e, h, d]

  def converted(kv_heads, method):
    params, step, facts = plan.models.converted(kv_heads, method, seed=0)
    assert step == PRETRAIN_STEPS and facts['method'] == method
    return np.asarray(params['decoder']['layers_0']['self_attention']['key']['kernel'])

  np.testing.assert_allclose(converted(1, 'mean'), heads.mean(1), rtol=1e-6, atol=1e-7)
  np.testing.assert_array_equal(converted(1, 'first'), heads[:, 0])
  np.testing.assert_allclose(converted(2, 'mean'),  # contiguous groups of 4 query heads
                             heads.reshape(-1, 2, 4, HEAD_DIM).mean(2).reshape(-1, 2 * HEAD_DIM),
                             rtol=1e-6, atol=1e-7)
  assert converted(1, 'random').shape == (heads.shape[0], HEAD_DIM)


def test_uptraining_and_finetuning_continue_the_step_count_and_keep_the_best(smoke):
  output_dir, _, _ = smoke
  work = output_dir / 'work'
  up = PRETRAIN_STEPS + UPTRAIN_STEPS
  for seed in SEEDS:
    assert (work / 'uptrain' / 'mqa' / f'seed{seed}' / f'checkpoint_{up}').is_dir()
    for row, first in (('mqa-alpha0', PRETRAIN_STEPS), ('mqa-alpha0.1', up)):
      directory = work / 'finetune' / row / f'seed{seed}' / TASK
      recorded = _marker(output_dir, 'finetune', row, f'seed{seed}', TASK)
      assert sorted(map(int, recorded['evals'])) == [first + FINETUNE_STEPS // 2,
                                                     first + FINETUNE_STEPS]
      assert sorted(p.name for p in directory.glob('checkpoint_*')) == [
          f"checkpoint_{recorded['best_step']}"]


def test_rerun_reuses_finished_stages_and_redoes_only_a_deleted_one(smoke):
  output_dir, cache_dir, results = smoke
  shutil.rmtree(output_dir / 'work' / 'finetune' / 'mqa-alpha0.1' / 'seed1' / TASK)
  stdout = _ok(_reproduce(output_dir, cache_dir))
  started = [line.split(':')[0] for line in stdout.splitlines() if ': starting;' in line]
  assert len(started) == 1 and started[0].endswith(f'finetune mqa-alpha0.1 seed 1 {TASK}'), stdout
  assert stdout.count('finished earlier, reused') == len(stages.Plan(
      presets.get('smoke'), str(output_dir / 'work')).stages) - 1, stdout
  with open(output_dir / 'results.json') as f:
    again = json.load(f)
  scores = lambda document: [(r['tasks'][TASK]['scores'], r['tasks'][TASK]['best_steps'])
                             for r in document['rows']]  # decode timings differ, scores may not
  assert scores(again) == scores(results)


def test_a_stage_directory_made_with_another_spec_is_an_error(tmp_path):
  plan = stages.Plan(presets.get('smoke'), str(tmp_path))
  stage = plan.stages[0]
  files.write_json(stage.marker, {'spec': {'steps': 1}, 'result': {}})
  with pytest.raises(errors.ConfigError, match='produced by a different stage'):
    stage.is_done()


def test_every_row_runs_every_seed_and_shares_one_pretrained_model(tmp_path):
  plan = stages.Plan(presets.get('cpu'), str(tmp_path))
  names = [s.name for s in plan.stages]
  assert names.count('pretrain') == 1
  for seed in presets.get('cpu').seeds:
    for row in plan.rows:
      assert f'finetune {plan.row_name(row)} seed {seed} {TASK}' in names


def test_unknown_preset_names_the_choices():
  with pytest.raises(errors.ConfigError, match='choose one of smoke, cpu, gpu, paper'):
    presets.get('huge')


def test_a_preset_needs_replicates():
  with pytest.raises(errors.ConfigError, match='at least two distinct'):
    presets.dataclasses.replace(presets.get('smoke'), seeds=(0,))
