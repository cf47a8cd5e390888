"""notebooks/gqa_t5x_colab.ipynb, executed top to bottom in its tiny local mode (CPU, generated
checkpoint, embedded tasks) in a fresh environment where its install cell pip-installs the
project's wheel, outside the checkout; then checked against what each stage must have produced."""
import json
import os
import subprocess

import numpy as np
import pytest

from tests import installation
from tests import runner_helpers

NOTEBOOK = os.path.join(runner_helpers.REPO, 'notebooks', 'gqa_t5x_colab.ipynb')


def code_cells(path: str) -> list:
  """The notebook's code cells, checked to be plain Python (no shell escapes or magics), so the
  same source runs in Colab and here."""
  notebook = json.load(open(path))
  assert notebook['nbformat'] == 4
  cells = [c for c in notebook['cells'] if c['cell_type'] == 'code']
  for cell in cells:
    source = ''.join(cell['source'])
    assert not any(line.lstrip().startswith(('!', '%')) for line in source.splitlines()), source
    cell['source'] = source
  return cells


# Runs the cells in one namespace, like a kernel; after the parameters cell, an injected cell
# switches to local mode and names the wheel to install (as papermill does). Then dumps what the
# checks below need.
_KERNEL = """
import json, sys
cells, parameters, results = (json.load(open(sys.argv[1])), json.load(open(sys.argv[2])),
                              sys.argv[3])
namespace = {'__name__': '__main__'}
for cell in cells:
  exec(compile(cell['source'], cell['id'], 'exec'), namespace)
  if 'parameters' in cell['metadata'].get('tags', []):
    namespace.update(parameters)
json.dump({'gqa_t5x_file': sys.modules['gqa_t5x'].__file__,
           **{name: namespace[name] for name in sys.argv[4:]}}, open(results, 'w'))
"""
RESULTS = ('SOURCE', 'CONVERTED', 'MODEL_DIR', 'UPTRAIN_STEPS', 'losses', 'scores', 'bench')


@pytest.fixture(scope='module')
def executed(tmp_path_factory, installed):
  """The notebook run top to bottom by a new kernel (a fresh interpreter) in local mode, in a
  fresh venv without the project, from a directory outside the checkout."""
  root = tmp_path_factory.mktemp('notebook')
  work_dir, cells, results = root / 'work', root / 'cells.json', root / 'results.json'
  cells.write_text(json.dumps(code_cells(NOTEBOOK)))
  parameters = root / 'parameters.json'
  parameters.write_text(json.dumps({'LOCAL_MODE': True, 'WORK_DIR': str(work_dir),
                                    'PROJECT_SOURCE': installed.wheel}))
  python = installation.fresh_venv(str(root / 'venv'))
  environment = dict(runner_helpers.env(str(root / 'cache'), num_devices=8), MPLBACKEND='Agg',
                     **installation.OFFLINE_PIP)
  log = str(root / 'notebook.log')
  process = subprocess.Popen([python, '-c', _KERNEL, str(cells), str(parameters), str(results),
                              *RESULTS], cwd=root, env=environment, stdout=open(log, 'w'),
                             stderr=subprocess.STDOUT)
  runner_helpers.wait(process, log, timeout=600)
  executed = json.loads(results.read_text())
  assert executed['gqa_t5x_file'].startswith(str(root / 'venv')), executed['gqa_t5x_file']
  return dict(executed, WORK_DIR=str(work_dir))


def test_parameters_cell_defaults_to_tpu_mode_with_a_t5_checkpoint():
  parameters = [c for c in code_cells(NOTEBOOK)
                if 'parameters' in c['metadata'].get('tags', [])]
  assert len(parameters) == 1
  namespace = {}
  exec(parameters[0]['source'], namespace)
  assert namespace['LOCAL_MODE'] is False and namespace['SIZE'] == 'base'
  assert 12 % namespace['NUM_KV_HEADS'] == 0  # T5.1.1 Base has 12 heads


def test_notebook_converts_by_mean_pooling_kv_heads(executed):
  """The converted checkpoint's decoder kv kernels are the means of each group of 4 of the
  generated MHA checkpoint's 8 heads (head_dim 16), computed here by hand."""
  mha = runner_helpers.read_params(executed['SOURCE'])
  gqa = runner_helpers.read_params(executed['CONVERTED'])
  for name in ('decoder/layers_0/self_attention/key/kernel',
               'decoder/layers_1/encoder_decoder_attention/value/kernel'):
    expected = mha[name].reshape(128, 2, 4, 16).mean(axis=2).reshape(128, 32)
    np.testing.assert_allclose(gqa[name], expected, rtol=1e-6, atol=1e-7)
  np.testing.assert_array_equal(gqa['encoder/layers_0/attention/key/kernel'],
                                mha['encoder/layers_0/attention/key/kernel'])


def test_notebook_uptrains_from_the_converted_parameters(executed):
  steps = [step for step, _ in executed['losses']]
  assert steps[-1] == executed['UPTRAIN_STEPS'] == 4
  assert all(np.isfinite(loss) for _, loss in executed['losses'])
  converted = runner_helpers.read_params(executed['CONVERTED'])
  uptrained = runner_helpers.read_params(os.path.join(executed['MODEL_DIR'], 'checkpoint_4'))
  name = 'decoder/layers_0/self_attention/key/kernel'
  assert uptrained[name].shape == (128, 32)
  change = np.abs(uptrained[name] - converted[name]).max()
  assert 0 < change < 0.1 * np.abs(converted[name]).max()


def test_notebook_scores_both_checkpoints_and_benchmarks_every_g(executed):
  for name in ('converted', 'uptrained'):
    assert {'rouge1', 'rouge2', 'rougeLsum'} <= set(executed['scores'][name])
    assert all(0 <= v <= 100 for v in executed['scores'][name].values())
  rows = executed['bench']['rows']
  assert sorted(r['kv_heads'] for r in rows) == [1, 2, 4, 8]  # H, H/2, ..., 1
  assert all(r['time_per_sample_s'] > 0 for r in rows)
  for png in ('uptrain_loss.png', 'eval_rouge.png', 'decode_benchmark.png'):
    with open(os.path.join(executed['WORK_DIR'], png), 'rb') as f:
      assert f.read(8) == b'\x89PNG\r\n\x1a\n'
