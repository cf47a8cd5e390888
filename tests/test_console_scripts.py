"""Every console script, run through its entry point as installed from the wheel, from a
directory outside the checkout: --help lists exactly the flags the command reads; a user error is
`<command>: error: ...` and exit status 2; one tiny real invocation each succeeds, with output for
people (no ERROR line, no native library's log line, no line over 300 characters)."""
import json
import os
import re
import subprocess

import numpy as np
import pytest

from tests import runner_helpers

GIN = {'gin_file', 'gin_bindings', 'gin_search_paths'}
MULTIPROCESS = {'coordinator_address', 'process_count', 'process_index', 'multiprocess'}
FLAGS_READ = {
    'gqa-t5x-train': GIN | MULTIPROCESS,
    'gqa-t5x-eval': GIN | MULTIPROCESS,
    'gqa-t5x-infer': GIN | MULTIPROCESS,
    'gqa-t5x-demo': GIN | {'kv_heads', 'decode_length'},
    'gqa-t5x-convert': GIN | {'input', 'output', 'method', 'num_kv_heads', 'num_encoder_kv_heads',
                              'num_decoder_self_kv_heads', 'num_decoder_cross_kv_heads',
                              'overwrite', 'head_dim', 'seed'},
    'gqa-t5x-benchmark': {'levels', 'num_heads', 'head_dim', 'emb_dim', 'mlp_dim', 'vocab_size',
                          'num_decoder_layers', 'num_encoder_layers', 'input_length',
                          'output_length', 'batch', 'dtypes', 'device', 'peer', 'peer_device',
                          'warmup', 'reps', 'bandwidth_mib', 'matmul_n', 'rate_settle_s',
                          'kv_heads', 'seed', 'output_dir', 'xla_rows', 'huge_pages'},
    'gqa-t5x-reproduce': {'preset', 'output_dir', 'dry_run'},
}
TINY = ['--gin_file=models/t5_1_1/tiny.gin', '--gin.VOCAB_SIZE=1152',
        f'--gin.TASK_FEATURE_LENGTHS={runner_helpers.TINY_LENGTHS}']


def run(installed, command: str, *args: str, cwd, status: int = 0) -> str:
  """Runs an installed console script; returns its stdout + stderr, checked for `status`."""
  environment = runner_helpers.env(os.path.join(cwd, 'cache'), num_devices=1)
  del environment['TF_CPP_MIN_LOG_LEVEL']  # the commands' own default, as a user gets it
  result = subprocess.run([os.path.join(installed.bin_dir, command), *args], cwd=cwd,
                          env=environment, capture_output=True, text=True, timeout=600)
  output = result.stdout + result.stderr
  assert result.returncode == status, f'{command} {" ".join(args)}: {output[-5000:]}'
  return output


def test_the_installed_package_builds_its_cpu_kernel(installed, tmp_path):
  # The kernel's C++ source ships in the wheel and compiles from there (a wheel without it would
  # decode on the slower einsums with only a warning).
  result = subprocess.run(
      [installed.python, '-c', 'from gqa_t5x import cpu_kernels; print(cpu_kernels.available())'],
      cwd=tmp_path, env=dict(os.environ, GQA_T5X_KERNEL_CACHE=str(tmp_path / 'kernels')),
      capture_output=True, text=True, timeout=300)
  assert result.stdout.strip() == 'True', result.stderr[-3000:]
  assert len(os.listdir(tmp_path / 'kernels')) == 1  # the built library, nothing half-written


def assert_for_people(output: str) -> None:
  for line in output.splitlines():
    assert not re.match(r'(E\d{4} |ERROR\b|Traceback)', line), line
    # A native library's log line (absl C++: "I0000 00:00:1796511615.03 30867 port.cc:153] ...")
    # or absl's notice before its first one; the project's own lines come from .py files.
    assert not re.search(r'\.cc:\d+\] |before absl::InitializeLog', line), line
    assert len(line) <= 300, line


@pytest.mark.parametrize('command', sorted(FLAGS_READ))
def test_help_lists_exactly_the_flags_the_command_reads(installed, tmp_path, command):
  output = run(installed, command, '--help', cwd=tmp_path)
  listed = re.findall(r'^  --(\w+):', output.split(f'Flags of {command}:')[1], re.MULTILINE)
  assert set(listed) == FLAGS_READ[command]


@pytest.mark.parametrize('command, args, message', [
    ('gqa-t5x-train', ['--seed=3', '--kv_heads=2'], "Unknown command line flag 'seed'"),
    ('gqa-t5x-convert', ['--kv_heads=2'], "Unknown command line flag 'kv_heads'"),
    ('gqa-t5x-benchmark', ['--gin.NUM_HEADS=8'], "Unknown command line flag 'gin_bindings'"),
    ('gqa-t5x-reproduce', ['--preset=huge'], 'value should be one of <smoke|cpu|gpu|paper>'),
    ('gqa-t5x-eval', ['--gin_file=runs/eval.gin', 'extra'], 'unexpected arguments extra'),
    ('gqa-t5x-infer', [], 'No --gin_file given'),
    ('gqa-t5x-demo', ['--kv_heads=3'], '--kv_heads=3 must divide num_heads=8; valid values: '
                                       '1, 2, 4, 8'),
])
def test_a_user_error_is_one_line_and_exit_status_2(installed, tmp_path, command, args, message):
  output = run(installed, command, *args, cwd=tmp_path, status=2)
  assert output.startswith(f'{command}: error: ') and output.count('\n') == 1, output
  assert message in output, output


def test_demo_benchmark_and_reproduce_run(installed, tmp_path):
  output = run(installed, 'gqa-t5x-demo', '--kv_heads=2', '--decode_length=4', cwd=tmp_path)
  assert_for_people(output)
  # K and V x 2 layers x 2 kv heads x head_dim 16 x 4 bytes
  assert re.search(r'GQA-2: [\d,]+ params, KV cache 512 B/token', output), output
  output = run(installed, 'gqa-t5x-benchmark', '--levels=attention', '--num_heads=4',
               '--kv_heads=4,1', '--head_dim=8', '--emb_dim=32', '--input_length=16',
               '--output_length=4', '--batch=1', '--reps=1', '--bandwidth_mib=1',
               '--matmul_n=64', '--rate_settle_s=0', '--peer=false',
               f'--output_dir={tmp_path / "bench"}',
               cwd=tmp_path)
  assert_for_people(output)
  rows = json.loads((tmp_path / 'bench' / 'decode_benchmark.json').read_text())['rows']
  assert [r['kv_heads'] for r in rows] == [4, 1]
  output = run(installed, 'gqa-t5x-reproduce', '--preset=smoke', '--dry_run',
               f'--output_dir={tmp_path / "results"}', cwd=tmp_path)
  assert_for_people(output)
  assert re.search(r'^\[1/\d+\] .*\(to run\)$', output, re.MULTILINE), output


def test_train_convert_eval_and_infer_with_the_shipped_gin_configs(installed, tmp_path):
  """MHA trained 2 steps, converted to GQA-2 (checked against numpy mean pooling), then scored
  and decoded: every gin file found through the installed package."""
  output = run(installed, 'gqa-t5x-train',
               *runner_helpers.tiny_train_flags(str(tmp_path / 'mha'), NUM_KV_HEADS=8,
                                                TRAIN_STEPS=2, LOG_PERIOD=1), cwd=tmp_path)
  assert_for_people(output)
  assert re.search(r'step 2/2 .*loss.*ETA', output), output  # the progress line
  mha, gqa = tmp_path / 'mha' / 'checkpoint_2', tmp_path / 'gqa2' / 'checkpoint_2'

  output = run(installed, 'gqa-t5x-convert', f'--input={mha}', f'--output={gqa}', *TINY[:2],
               '--gin.NUM_KV_HEADS=2', cwd=tmp_path)
  assert_for_people(output)
  before, after = runner_helpers.read_params(str(mha)), runner_helpers.read_params(str(gqa))
  name = 'decoder/layers_1/self_attention/value/kernel'
  expected = before[name].reshape(128, 2, 4, 16).mean(axis=2).reshape(128, 32)
  np.testing.assert_allclose(after[name], expected, rtol=1e-6, atol=1e-7)

  task = ['--gin.MIXTURE_OR_TASK_NAME="gqa_embedded_lead_summary"', '--gin.NUM_KV_HEADS=2',
          '--gin.BATCH_SIZE=64', f'--gin.CHECKPOINT_PATH="{gqa}"']
  output = run(installed, 'gqa-t5x-eval', *TINY, '--gin_file=runs/eval.gin', *task,
               f'--gin.EVAL_OUTPUT_DIR="{tmp_path / "eval"}"', cwd=tmp_path)
  assert_for_people(output)
  scores = json.loads((tmp_path / 'eval' / 'eval_metrics.jsonl').read_text().splitlines()[0])
  assert scores['step'] == 2 and 0 <= scores['gqa_embedded_lead_summary/rouge1'] <= 100
  output = run(installed, 'gqa-t5x-infer', *TINY, '--gin_file=runs/infer.gin', *task,
               f'--gin.INFER_OUTPUT_DIR="{tmp_path / "infer"}"', cwd=tmp_path)
  assert_for_people(output)
  predictions = (tmp_path / 'infer' / 'gqa_embedded_lead_summary-validation-2.jsonl')
  assert len(predictions.read_text().splitlines()) == 110  # the task's validation split
