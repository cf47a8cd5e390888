r"""Training throughput of gqa-t5x-train beside T5X's t5x.train on the same model, data and mesh.

  .venv/bin/python tools/benchmark_train.py --t5x_python=$HOME/t5x-venv/bin/python \
      [--models=tiny,small] [--steps=60] [--log_period=10] [--batch=32] [--lengths=128,32] \
      [--rounds=4]

Both train from scratch with the pre-training recipe (Adafactor, rsqrt schedule, no dropout,
packed span corruption on the embedded corpus) on one CPU device, the network of
gin_configs/models/t5_1_1/<model>.gin (T5X: gin_configs/t5x/t5_1_1/<model>.gin wraps the same
one), GQA-2 in the decoder. Throughput is each framework's own per-window report (steps/s, and
target tokens/s, which T5X counts with padding and we without, so only steps/s compares), median
over the windows after the first (which holds compilation).

A round runs each framework once, in turn, and its ratio is ours / T5X's median; the order flips
from round to round, so that drift on a shared machine does not favour whichever runs first. The
rounds' ratios give a mean with Student's t 95% interval (gqa_t5x.reproduce.stats, the rule the
reproduction's findings use), and the interval decides the goal "at least T5X's rate": above 1,
faster; below 1, slower; straddling 1, no difference resolved at this many rounds.
"""
import argparse
import glob
import json
import os
import shutil
import statistics
import struct
import subprocess
import sys
import tempfile

from tensorboard.compat.proto import event_pb2
from tensorboard.util import tensor_util

from gqa_t5x.reproduce import stats

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TASK = 'gqa_embedded_span_corruption'
METRICS = ('timing/steps_per_second', 'timing/target_tokens_per_second')


def common_macros(args, model_dir: str) -> dict:
  inputs, targets = args.lengths
  return {'MIXTURE_OR_TASK_NAME': f'"{TASK}"', 'MIXTURE_OR_TASK_MODULE': '"gqa_t5x.tasks"',
          'TASK_FEATURE_LENGTHS': f"{{'inputs': {inputs}, 'targets': {targets}}}",
          'TRAIN_STEPS': args.steps, 'BATCH_SIZE': args.batch, 'MODEL_DIR': f'"{model_dir}"',
          'USE_CACHED_TASKS': False, 'NUM_KV_HEADS': 2}


def ours(args, model: str, model_dir: str) -> list[str]:
  macros = {**common_macros(args, model_dir), 'LOG_PERIOD': args.log_period,
            'SAVING_PERIOD': args.steps}
  return ([sys.executable, '-m', 'gqa_t5x.train', f'--gin_file=models/t5_1_1/{model}.gin',
           '--gin_file=runs/pretrain.gin'] + [f'--gin.{k}={v}' for k, v in macros.items()])


# T5X's models beyond tiny default to T5's SentencePiece model in a cloud bucket; the embedded
# task's vocabulary is the one both frameworks then train with (model sizes unchanged).
EMBEDDED_VOCABULARY_GIN = '''from __gin__ import dynamic_registration
from gqa_t5x.tasks import vocab
VOCABULARY = @vocab.embedded_vocabulary()
'''


def t5x(args, model: str, model_dir: str) -> list[str]:
  macros = {**common_macros(args, model_dir), 'train.eval_period': args.steps,
            'train.stats_period': args.log_period, 'train.train_eval_dataset_cfg': None,
            'utils.SaveCheckpointConfig.period': args.steps}
  vocabulary_gin = os.path.join(os.path.dirname(model_dir), 'embedded_vocabulary.gin')
  with open(vocabulary_gin, 'w') as f:
    f.write(EMBEDDED_VOCABULARY_GIN)
  return ([args.t5x_python, '-m', 't5x.train', f'--gin_search_paths={REPO}/gin_configs',
           f'--gin_file=t5x/t5_1_1/{model}.gin', '--gin_file=t5x/configs/runs/pretrain.gin',
           '--gin_file=t5x/runs/partitioning.gin', f'--gin_file={vocabulary_gin}']
          + [f'--gin.{k}={v}' for k, v in macros.items()])


def our_windows(model_dir: str) -> list[dict]:
  rows = [json.loads(line) for line in open(os.path.join(model_dir, 'train', 'metrics.jsonl'))]
  return [{m: row[m] for m in METRICS} for row in rows if METRICS[0] in row]


def tfrecords(path: str):
  """The records of a TFRecord file (8-byte length, its CRC, the data, the data's CRC; CRCs not
  checked). Read here rather than through TensorFlow, whose import logs start-up lines."""
  with open(path, 'rb') as f:
    while header := f.read(12):
      (length,) = struct.unpack('<Q', header[:8])
      yield f.read(length)
      f.read(4)


def t5x_windows(model_dir: str) -> list[dict]:
  by_step = {}
  for path in sorted(glob.glob(os.path.join(model_dir, 'train', 'events.out.tfevents.*'))):
    for record in tfrecords(path):
      event = event_pb2.Event.FromString(record)
      for value in event.summary.value:
        if value.tag in METRICS:
          by_step.setdefault(event.step, {})[value.tag] = float(
              tensor_util.make_ndarray(value.tensor))
  return [by_step[s] for s in sorted(by_step) if len(by_step[s]) == len(METRICS)]


def run(command: list[str], model_dir: str, log_path: str) -> None:
  os.makedirs(os.path.dirname(log_path), exist_ok=True)
  environment = dict(os.environ, JAX_PLATFORMS='cpu', TF_CPP_MIN_LOG_LEVEL='3',
                     GQA_T5X_CACHE_DIR=os.path.join(os.path.dirname(model_dir), 'vocab'))
  with open(log_path, 'w') as log:
    result = subprocess.run(command, cwd=REPO, env=environment, stdout=log,
                            stderr=subprocess.STDOUT)
  if result.returncode:
    sys.exit(f'{command[:3]} failed (exit {result.returncode}); see {log_path}:\n'
             + open(log_path).read()[-3000:])


FRAMEWORKS = (('gqa-t5x', ours, our_windows), ('T5X', t5x, t5x_windows))


def one_run(args, workdir: str, model: str, framework: str, command, windows) -> dict:
  """Median steps/s and tokens/s over one run's windows after the first."""
  model_dir = os.path.join(workdir, f'{model}_{framework}')
  shutil.rmtree(model_dir, ignore_errors=True)
  run(command(args, model, model_dir), model_dir, model_dir + '.log')
  rows = windows(model_dir)[1:]  # the first window holds compilation
  if not rows:
    sys.exit(f'{framework} logged no timing after its first window; see {model_dir}.log')
  return {m: statistics.median(r[m] for r in rows) for m in METRICS} | {'windows': len(rows)}


def verdict(ratio: stats.Interval) -> str:
  """The reproduction's verdict on "ours is faster" (the ratio's interval against 1), in words."""
  above_one = stats.Interval(ratio.mean - 1, ratio.low - 1, ratio.high - 1, ratio.n)
  return {'held': 'faster than T5X', 'contradicted': 'slower than T5X',
          'inconclusive': 'no difference resolved'}[stats.verdict(above_one, sign=1)]


def main():
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--t5x_python', required=True, help='python of a venv with T5X installed')
  parser.add_argument('--models', default='tiny,small')
  parser.add_argument('--steps', type=int, default=60)
  parser.add_argument('--log_period', type=int, default=10)
  parser.add_argument('--batch', type=int, default=32)
  parser.add_argument('--lengths', type=lambda s: tuple(int(x) for x in s.split(',')),
                      default=(128, 32), help='inputs,targets')
  parser.add_argument('--rounds', type=int, default=4,
                      help='runs of each framework (at least 2, for an interval)')
  parser.add_argument('--workdir', default='')
  args = parser.parse_args()
  if args.steps < 2 * args.log_period:
    parser.error('--steps must cover at least two --log_period windows (the first compiles)')
  if args.rounds < 2:
    parser.error(f'--rounds={args.rounds}: an interval needs at least 2 rounds')
  if not (os.path.isfile(args.t5x_python) and os.access(args.t5x_python, os.X_OK)):
    parser.error(f'--t5x_python={args.t5x_python} is not an executable file: give the python of '
                 'a venv with T5X (bash tools/install_t5x.sh VENV; then VENV/bin/python)')
  workdir = args.workdir or tempfile.mkdtemp(prefix='gqa_train_bench_')
  print('| model | round | gqa-t5x steps/s | T5X steps/s | gqa-t5x / T5X (steps/s) | target '
        'tokens/s, ours / T5X\'s | windows each |\n|---|---|---|---|---|---|---|', flush=True)
  summaries = []
  try:
    for model in args.models.split(','):
      ratios = {m: [] for m in METRICS}
      for round_ in range(args.rounds):
        order = FRAMEWORKS if round_ % 2 == 0 else FRAMEWORKS[::-1]
        result = {name: one_run(args, workdir, model, name, command, windows)
                  for name, command, windows in order}
        ours_, theirs = result['gqa-t5x'], result['T5X']
        for m in METRICS:
          ratios[m].append(ours_[m] / theirs[m])
        print(f'| {model} | {round_ + 1} ({order[0][0]} first) | {ours_[METRICS[0]]:.3f} | '
              f'{theirs[METRICS[0]]:.3f} | {ratios[METRICS[0]][-1]:.3f} | '
              f'{ours_[METRICS[1]]:.0f} / {theirs[METRICS[1]]:.0f} | '
              f'{ours_["windows"]} / {theirs["windows"]} |', flush=True)
      steps = stats.interval(ratios[METRICS[0]])
      summaries.append(
          f'{model}: gqa-t5x / T5X steps/s {steps.mean:.3f} [{steps.low:.3f}, {steps.high:.3f}] '
          f'(mean of {steps.n} rounds, 95% interval): {verdict(steps)}; tokens/s '
          f'{statistics.fmean(ratios[METRICS[1]]):.2f} (T5X counts padding, we do not); '
          f'batch {args.batch}, lengths {args.lengths}, load {os.getloadavg()[0]:.1f}')
    print('\n'.join(summaries))
  finally:
    if not args.workdir:
      shutil.rmtree(workdir, ignore_errors=True)


if __name__ == '__main__':
  main()
