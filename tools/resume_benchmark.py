#!/usr/bin/env python3
"""Time to put a resumed run's input pipeline at step N: restored (gqa_t5x's checkpointed
tf.data iterator) against replayed (a fresh pipeline skipping the N batches consumed before).

  python tools/resume_benchmark.py [--steps=100,1000,10000] [--repeats=3] [--output=resume.json]

The tiny run's pipeline (embedded span corruption, batch 8, lengths 32/16, one shard). Both
ways are timed in one process, side by side: building the seqio pipeline (the same work either
way, whatever N), then positioning it, up to and including the first batch after step N. The
restore is timed `--repeats` times (the fastest is reported), the replay once. Each way checks
that batch equals the uninterrupted pipeline's.
"""
import argparse
import json
import os
import sys
import tempfile
import time

import numpy as np
import seqio

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from gqa_t5x import data  # pylint: disable=wrong-import-position

CFG = data.DatasetConfig('gqa_embedded_span_corruption', {'inputs': 32, 'targets': 16},
                         split='train', batch_size=8, seed=0, module='gqa_t5x.tasks')
SHARD = seqio.ShardInfo(0, 1)


def _timed(build, position) -> tuple[float, float, dict]:
  """Seconds to build the pipeline, seconds to position it and draw a batch, and the batch."""
  begin = time.perf_counter()
  pipeline = build()
  built = time.perf_counter()
  batch = position(pipeline)
  return built - begin, time.perf_counter() - built, batch


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
  parser.add_argument('--steps', default='100,1000,10000')
  parser.add_argument('--repeats', type=int, default=3)
  parser.add_argument('--output', default=None, help='also write the figures as JSON here')
  args = parser.parse_args()
  rows = []
  run = data.train_batches(CFG, SHARD)  # the uninterrupted run, saved at each step N
  with tempfile.TemporaryDirectory() as tmp:
    for steps in sorted(int(s) for s in args.steps.split(',')):
      while run.position < steps:
        next(run)
        if run.position % 1000 == 0:
          print(f'  consuming step {run.position}/{steps}', flush=True)
      path = os.path.join(tmp, f'step_{steps}', 'iterator')
      run.save(path)
      expected = next(run)

      def restore(batches, path=path):
        batches.restore(path)
        return next(batches)

      ways = {'restored': (lambda: data.train_batches(CFG, SHARD), restore),
              'replayed': (lambda steps=steps: data.train_dataset(CFG, SHARD).skip(steps),
                           lambda ds: next(ds.as_numpy_iterator()))}
      state_dir = os.path.dirname(path)
      row = {'step': steps, 'state_bytes': sum(os.path.getsize(os.path.join(state_dir, f))
                                               for f in os.listdir(state_dir))}
      for name, (build, position) in ways.items():
        timings = []
        for _ in range(args.repeats if name == 'restored' else 1):
          build_s, position_s, batch = _timed(build, position)
          for key, value in expected.items():
            np.testing.assert_array_equal(np.asarray(batch[key]), value, err_msg=f'{name} {key}')
          timings.append((position_s, build_s))
        position_s, build_s = min(timings)
        row[f'{name}_position_s'], row[f'{name}_build_s'] = round(position_s, 3), round(build_s, 3)
      rows.append(row)
      print(f'step {steps:>6}: position restored {row["restored_position_s"]:.3f} s, replayed '
            f'{row["replayed_position_s"]:.3f} s (pipeline build {row["restored_build_s"]:.2f} / '
            f'{row["replayed_build_s"]:.2f} s); iterator state {row["state_bytes"] / 1e6:.2f} MB',
            flush=True)
  if args.output:
    with open(args.output, 'w') as f:
      json.dump(rows, f, indent=1)


if __name__ == '__main__':
  main()
