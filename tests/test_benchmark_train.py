"""tools/benchmark_train.py: T5X's TensorBoard events read without TensorFlow, checked against
events that TensorFlow's own summary writer wrote (T5X writes through it, by way of clu), and the
verdict a ratio's interval gives."""
import importlib.util
import os

import numpy as np
import pytest
import tensorflow as tf

from gqa_t5x.reproduce import stats

TOOL = os.path.join(os.path.dirname(os.path.dirname(__file__)), 'tools', 'benchmark_train.py')


@pytest.fixture(scope='module')
def tool():
  spec = importlib.util.spec_from_file_location('benchmark_train', TOOL)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def test_t5x_windows_reads_tensorflow_events(tool, tmp_path):
  expected = []
  with tf.summary.create_file_writer(str(tmp_path / 'train')).as_default() as writer:
    for step in (10, 20, 30):
      window = {'timing/steps_per_second': 12.5 + step / 7,
                'timing/target_tokens_per_second': 3000.25 - step}
      for tag, value in window.items():
        tf.summary.scalar(tag, value, step=step)
      tf.summary.scalar('loss', 2.5, step=step)  # other tags are not read
      expected.append({k: float(np.float32(v)) for k, v in window.items()})
    tf.summary.scalar('timing/steps_per_second', 9.0, step=40)  # half a window: left out
    writer.flush()
  assert tool.t5x_windows(str(tmp_path)) == expected


@pytest.mark.parametrize('low, high, verdict', [
    (1.002, 1.04, 'faster than T5X'), (0.95, 0.999, 'slower than T5X'),
    (0.98, 1.03, 'no difference resolved')])
def test_verdict_is_the_side_of_one_the_interval_lies_on(tool, low, high, verdict):
  assert tool.verdict(stats.Interval((low + high) / 2, low, high, 4)) == verdict
