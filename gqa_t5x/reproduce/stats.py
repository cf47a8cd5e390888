"""Means over seeds with 95% confidence intervals, and the verdict they support.

A reproduction at small scale is noisy: one seed per row can order any two rows either way. Each
quality number is therefore a mean over seeds with Student's t interval, and a claim of the
paper ("A beats B") is decided by the interval of the difference A - B: on the claimed side of
zero, the claim held; on the other side, it is contradicted; straddling zero, inconclusive.
Seeds fix the uptraining and fine-tuning data order and dropout, so two rows run with the same
seed saw the same batches: their difference is taken seed by seed (paired), which removes the
noise the rows share.
"""
import dataclasses
import math
import statistics
from typing import Sequence

from scipy import stats as scipy_stats

CONFIDENCE = 0.95
VERDICTS = ('held', 'contradicted', 'inconclusive')


@dataclasses.dataclass(frozen=True)
class Interval:
  """A mean and its CONFIDENCE interval [low, high] over n values."""
  mean: float
  low: float
  high: float
  n: int

  @property
  def half_width(self) -> float:
    return (self.high - self.low) / 2

  def to_json(self) -> dict:
    return {'mean': self.mean, 'low': self.low, 'high': self.high, 'n': self.n,
            'confidence': CONFIDENCE}


def _t(df: float) -> float:
  return float(scipy_stats.t.ppf(0.5 + CONFIDENCE / 2, df))


def interval(values: Sequence[float]) -> Interval:
  """Student's t interval of the mean; zero width when every value is the same."""
  values = [float(v) for v in values]
  if len(values) < 2:
    raise ValueError(f'an interval needs at least 2 values, got {values}')
  mean = statistics.fmean(values)
  half = _t(len(values) - 1) * statistics.stdev(values) / math.sqrt(len(values))
  return Interval(mean, mean - half, mean + half, len(values))


def difference(a: Sequence[float], b: Sequence[float], paired: bool) -> Interval:
  """Interval of mean(a) - mean(b): per-seed differences if paired, else Welch's interval."""
  if paired:
    if len(a) != len(b):
      raise ValueError(f'paired values must match one to one, got {len(a)} and {len(b)}')
    return interval([x - y for x, y in zip(a, b)])
  va, vb = statistics.variance(a) / len(a), statistics.variance(b) / len(b)
  mean = statistics.fmean(a) - statistics.fmean(b)
  if va + vb == 0:
    return Interval(mean, mean, mean, len(a) + len(b))
  df = (va + vb) ** 2 / (va ** 2 / (len(a) - 1) + vb ** 2 / (len(b) - 1))
  half = _t(df) * math.sqrt(va + vb)
  return Interval(mean, mean - half, mean + half, len(a) + len(b))


def verdict(diff: Interval, sign: int) -> str:
  """'held' if the interval of the difference lies on the claimed side of 0 (sign +1: positive,
  -1: negative), 'contradicted' if on the other side, else 'inconclusive'."""
  if sign not in (1, -1):
    raise ValueError(f'sign must be +1 or -1, got {sign}')
  low, high = sorted((sign * diff.low, sign * diff.high))
  if low > 0:
    return 'held'
  if high < 0:
    return 'contradicted'
  return 'inconclusive'


def combine(verdicts: Sequence[str]) -> str:
  """A claim made of several comparisons: held if all held, contradicted if any is."""
  if 'contradicted' in verdicts:
    return 'contradicted'
  return 'held' if verdicts and all(v == 'held' for v in verdicts) else 'inconclusive'
