#!/usr/bin/env python3
"""Time to put a resumed run's input pipeline at step N: restored (gqa_t5x's checkpointed
tf.data iterator) against replayed (a fresh pipeline skipping the N batches consumed before).

  python tools/resume_benchmark.py [--steps=100,1000,10000] [--output=resume.json]

The tiny run's pipeline (embedded span corruption, batch 8, lengths 32/16, one shard). Both
ways are timed in one process, side by side, up to and including the first batch after step N;
each way also checks that batch equals the uninterrupted pipeline's.
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


def _timed(position) -> tuple[float, dict]:
  """Seconds `position()` takes to return the next batch, and that batch."""
  begin = time.perf_counter()
  batch = position()
  return time.perf_counter() - begin, batch


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
  parser.add_argument('--steps', default='100,1000,10000')
  parser.add_argument('--output', default=None, help='also write the figures as JSON here')
  args = parser.parse_args()
  rows = []
  with tempfile.TemporaryDirectory() as tmp:
    for steps in (int(s) for s in args.steps.split(',')):
      run = data.train_batches(CFG, SHARD)
      for i in range(steps):
        next(run)
        if (i + 1) % 1000 == 0:
          print(f'  consuming step {i + 1}/{steps}', flush=True)
      path = os.path.join(tmp, f'step_{steps}', 'iterator')
      run.save(path)
      expected = next(run)

      def restored(path=path):
        batches = data.train_batches(CFG, SHARD)
        batches.restore(path)
        return next(batches)

      def replayed(steps=steps):
        return next(data.train_dataset(CFG, SHARD).skip(steps).as_numpy_iterator())

      row = {'step': steps,
             'state_bytes': sum(os.path.getsize(os.path.join(path.rsplit('/', 1)[0], f))
                                for f in os.listdir(os.path.dirname(path)))}
      for name, way in (('restored_s', restored), ('replayed_s', replayed)):
        seconds, batch = _timed(way)
        for key, value in expected.items():
          np.testing.assert_array_equal(np.asarray(batch[key]), value, err_msg=f'{name} {key}')
        row[name] = round(seconds, 3)
      rows.append(row)
      print(f'step {steps:>6}: restored {row["restored_s"]:.3f} s, replayed '
            f'{row["replayed_s"]:.3f} s, iterator state {row["state_bytes"] / 1e6:.2f} MB',
            flush=True)
  if args.output:
    with open(args.output, 'w') as f:
      json.dump(rows, f, indent=1)


if __name__ == '__main__':
  main()
