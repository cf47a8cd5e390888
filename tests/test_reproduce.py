"""The reproduction pipeline end to end at smoke size: every stage through the public commands,
Table 1 / JSON / CSV / Figures 3-6 with finite scores for every row, conversions and step
counts as the paper's recipe prescribes, and a rerun that reuses finished stages and redoes only
a deleted one, with identical scores."""
import csv
import json
import math
import shutil
import subprocess
import sys

import numpy as np
import pytest

from gqa_t5x import errors
from gqa_t5x.reproduce import presets, stages
from tests import runner_helpers as helpers

TASK = 'gqa_embedded_lead_summary'
# The smoke preset's rows, listed by hand from the paper's design: MHA as pre-trained; GQA-2 and
# MQA at alpha 0 and 0.1 (Figure 5); MQA converted by first head and at random (Figure 4).
ROWS = ['mha-alpha0', 'gqa2-alpha0', 'gqa2-alpha0.1', 'mqa-alpha0', 'mqa-alpha0.1',
        'mqa-first-alpha0.1', 'mqa-random-alpha0.1']
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


@pytest.fixture(scope='module')
def smoke(tmp_path_factory):
  output_dir = tmp_path_factory.mktemp('smoke')
  cache_dir = tmp_path_factory.mktemp('cache')
  _ok(_reproduce(output_dir, cache_dir))
  with open(output_dir / 'results.json') as f:
    return output_dir, cache_dir, json.load(f)


def test_every_row_has_finite_scores_equal_to_the_evaluators_output(smoke):
  output_dir, _, results = smoke
  assert [r['name'] for r in results['rows']] == ROWS
  for row in results['rows']:
    eval_file = output_dir / 'work' / 'eval' / row['name'] / TASK / 'eval_metrics.jsonl'
    written_by_eval = json.loads(eval_file.read_text().splitlines()[-1])
    assert row['primary'][TASK] == {'metric': 'rouge1',
                                    'value': written_by_eval[f'{TASK}/rouge1']}
    assert math.isfinite(row['average']) and 0 <= row['average'] <= 100
    assert math.isfinite(row['t_infer_s']) and row['t_infer_s'] > 0
  with open(output_dir / 'results.csv') as f:
    table = list(csv.DictReader(f))
  assert [r['name'] for r in table] == ROWS
  assert [float(r[f'{TASK}/rouge1']) for r in table] == [
      r['primary'][TASK]['value'] for r in results['rows']]


def test_markdown_table_has_one_line_per_row_and_the_papers_table(smoke):
  output_dir, _, results = smoke
  text = (output_dir / 'table.md').read_text()
  for row in results['rows']:
    assert f"| {row['model']} | {row['alpha']:g} | " in text
    assert f"| {row['average']:.2f} |" in text
  assert '| GQA-8-XXL | 0.28 | 47.1 |' in text  # the paper's Table 1 beside ours
  assert len(results['findings']) == 6
  assert {f['verdict'] for f in results['findings']} <= {
      'held', 'did not hold', 'no measurable difference'}


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
  work = output_dir / 'work'
  key = 'decoder/layers_0/self_attention/key/kernel'
  pretrained = helpers.read_params(str(work / 'pretrain' / f'checkpoint_{PRETRAIN_STEPS}'))
  heads = pretrained[key].reshape(-1, NUM_HEADS, HEAD_DIM)  # [e, h, d]
  converted = lambda v: helpers.read_params(
      str(work / 'convert' / v / f'checkpoint_{PRETRAIN_STEPS}'))[key]
  np.testing.assert_array_equal(converted('mha'), pretrained[key])
  np.testing.assert_allclose(converted('mqa'), heads.mean(1), rtol=1e-6, atol=1e-7)
  np.testing.assert_array_equal(converted('mqa-first'), heads[:, 0])
  np.testing.assert_allclose(converted('gqa2'),  # contiguous groups of 4 query heads
                             heads.reshape(-1, 2, 4, HEAD_DIM).mean(2).reshape(-1, 2 * HEAD_DIM),
                             rtol=1e-6, atol=1e-7)
  assert converted('mqa-random').shape == (heads.shape[0], HEAD_DIM)


def test_uptraining_and_finetuning_continue_the_step_count(smoke):
  output_dir, _, _ = smoke
  work = output_dir / 'work'
  up = PRETRAIN_STEPS + UPTRAIN_STEPS
  assert (work / 'uptrain' / 'mqa-alpha0.1' / f'checkpoint_{up}').is_dir()
  assert not (work / 'uptrain' / 'mqa-alpha0').exists()  # alpha 0: the conversion as is
  for row, first in (('mqa-alpha0', PRETRAIN_STEPS), ('mqa-alpha0.1', up)):
    assert (work / 'finetune' / row / TASK / f'checkpoint_{first + FINETUNE_STEPS}').is_dir()


def test_rerun_reuses_finished_stages_and_redoes_only_a_deleted_one(smoke):
  output_dir, cache_dir, results = smoke
  deleted = output_dir / 'work' / 'eval' / 'mqa-alpha0.1' / TASK
  shutil.rmtree(deleted)
  stdout = _ok(_reproduce(output_dir, cache_dir))
  started = [line.split(':')[0] for line in stdout.splitlines() if ': starting;' in line]
  assert len(started) == 1 and started[0].endswith(f'eval mqa-alpha0.1 {TASK}'), stdout
  assert stdout.count('finished earlier, reused') == 24, stdout
  with open(output_dir / 'results.json') as f:
    again = json.load(f)
  assert [r['primary'] for r in again['rows']] == [r['primary'] for r in results['rows']]


def test_a_stage_directory_made_by_another_command_is_an_error(tmp_path):
  plan = stages.Plan(presets.get('smoke'), str(tmp_path))
  stage = plan.stages[0]
  stages.write_json_atomically(stage.marker, {'command': 'python -m gqa_t5x.train --other'})
  with pytest.raises(errors.ConfigError, match='produced by a different command'):
    stage.is_done()


def test_unknown_preset_names_the_choices():
  with pytest.raises(errors.ConfigError, match='choose one of smoke, cpu, gpu, paper'):
    presets.get('huge')


def _records(averages: dict) -> list[dict]:
  """Table 1 records of the smoke plan's rows with the given averages (name -> score)."""
  plan_rows = stages.rows(presets.get('smoke'))
  return [{'kv_heads': r.variant.kv_heads, 'alpha': r.alpha, 'method': r.variant.method,
           'average': averages[r.name(NUM_HEADS)], 't_infer_s': {8: 4e-3, 2: 2e-3, 1: 1.8e-3}[
               r.variant.kv_heads]} for r in plan_rows]


@pytest.mark.parametrize('averages, verdict', [
    # The paper's pattern: GQA ~ MHA > MQA, mean > first > random, uptraining helps.
    (dict(zip(ROWS, [47.2, 46.8, 47.1, 44.0, 46.6, 46.0, 45.0])), 'held'),
    # The opposite on every quality claim.
    (dict(zip(ROWS, [47.2, 44.0, 43.0, 46.8, 45.0, 47.0, 48.0])), 'did not hold'),
    # Every model collapsed to the same output.
    (dict.fromkeys(ROWS, 10.05), 'no measurable difference'),
])
def test_findings_follow_the_numbers_and_equal_scores_decide_nothing(tmp_path, averages,
                                                                     verdict):
  from gqa_t5x.reproduce import report
  plan = stages.Plan(presets.get('smoke'), str(tmp_path))
  times = {8: 4e-3, 4: 3e-3, 2: 2e-3, 1: 1.8e-3}
  found = report.findings(plan, _records(averages), times)
  is_speed = lambda f: 'faster' in f['finding'] or 'Time per sample' in f['finding']
  assert [f['verdict'] for f in found if is_speed(f)] == ['held', 'held']  # times fall with G
  assert [f['verdict'] for f in found if not is_speed(f)] == [verdict] * 4
