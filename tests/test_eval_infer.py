"""Eval and infer from a converter-layout checkpoint of the tiny model on the embedded summary
task: eval returns the task's ROUGE metrics and T_infer, infer writes one prediction per input."""
import json
import os

import gin
import pytest

from gqa_t5x import errors, gin_utils, runs
from gqa_t5x.tasks import corpus
from tests import runner_helpers as helpers

TASK = 'gqa_embedded_lead_summary'


@pytest.fixture(scope='module')
def checkpoint(tmp_path_factory):
  os.environ['GQA_T5X_CACHE_DIR'] = str(tmp_path_factory.getbasetemp() / 'cache' / 'vocab')
  path = str(tmp_path_factory.mktemp('converted') / 'checkpoint_7')
  helpers.save_params_checkpoint(path, helpers.tiny_params(num_kv_heads=2), step=7)
  return path


def _run(job, run_gin, **macros):
  settings = dict(MIXTURE_OR_TASK_NAME=f'"{TASK}"', TASK_FEATURE_LENGTHS=helpers.TINY_LENGTHS,
                  VOCAB_SIZE=1152, NUM_KV_HEADS=2, BATCH_SIZE=64, NUM_PARTITIONS=2)
  settings.update(macros)
  gin_utils.parse_gin(['models/t5_1_1/tiny.gin', run_gin],
                      [f'{k} = {v}' for k, v in settings.items()])
  return gin.get_configurable(job)()


def test_eval_returns_the_task_metrics_and_decode_time(checkpoint, tmp_path):
  scores = _run(runs.evaluate, 'runs/eval.gin', CHECKPOINT_PATH=f'"{checkpoint}"',
                EVAL_OUTPUT_DIR=f'"{tmp_path}"')
  assert list(scores) == [7]
  metrics = scores[7]
  for name in ('rouge1', 'rouge2', 'rougeLsum'):
    assert 0.0 <= metrics[f'{TASK}/{name}'] <= 100.0
  assert metrics['timing/decode_ms_per_sample'] > 0
  with open(tmp_path / 'eval_metrics.jsonl') as f:
    row = json.loads(f.readline())
  assert row['step'] == 7 and row[f'{TASK}/rouge1'] == metrics[f'{TASK}/rouge1']


def test_infer_writes_one_prediction_per_input(checkpoint, tmp_path):
  path = _run(runs.infer, 'runs/infer.gin', CHECKPOINT_PATH=f'"{checkpoint}"',
              INFER_OUTPUT_DIR=f'"{tmp_path}"')
  assert os.path.basename(path) == f'{TASK}-validation-7.jsonl'
  with open(path) as f:
    rows = [json.loads(line) for line in f]
  pairs = corpus.lead_summary_pairs('validation')
  assert len(rows) == len(pairs) == 110  # 64 + a padded batch of 46
  assert [r['targets'] for r in rows] == [target for _, target in pairs]
  assert all(isinstance(r['prediction'], str) for r in rows)
  written = os.listdir(tmp_path)
  assert 'infer_metrics.jsonl' in written and not any(n.endswith('.tmp') for n in written)


def test_missing_checkpoint_is_a_clear_error(tmp_path):
  with pytest.raises(errors.ConfigError, match=r"CHECKPOINT_PATH='.*/nothing' does not exist"):
    _run(runs.evaluate, 'runs/eval.gin', CHECKPOINT_PATH=f'"{tmp_path}/nothing"',
         EVAL_OUTPUT_DIR=f'"{tmp_path}"')
  with pytest.raises(errors.ConfigError, match=r'is not an Orbax checkpoint'):
    _run(runs.infer, 'runs/infer.gin', CHECKPOINT_PATH=f'"{tmp_path}"',
         INFER_OUTPUT_DIR=f'"{tmp_path}/out"')
