"""Wall-clock timing of a blocking call: warm-up (compilation) excluded, median and range."""
import dataclasses
import statistics
import time


@dataclasses.dataclass(frozen=True)
class Timing:
  """Wall-clock seconds of `reps` timed calls (after warm-up): median, range and each call."""
  median_s: float
  min_s: float
  max_s: float
  reps: int
  times_s: tuple[float, ...] = ()

  @property
  def spread(self) -> float:
    """(max - min) / median: how noisy the repetitions were."""
    return (self.max_s - self.min_s) / self.median_s


def seconds(fn) -> float:
  """Wall-clock seconds of one call of `fn()` (which must block until its result is ready)."""
  start = time.perf_counter()
  fn()
  return time.perf_counter() - start


def time_call(fn, warmup: int = 1, reps: int = 5, between=None) -> Timing:
  """Times `fn()` (which must block until its result is ready); warm-up calls are not counted.

  The first warm-up call pays for compilation, so warmup must be at least 1. `between()`, when
  given, runs untimed before each timed call (the benchmark samples the machine's rates there).
  """
  if warmup < 1 or reps < 1:
    raise ValueError(f'warmup and reps must be >= 1 (warm-up absorbs compilation); '
                     f'got warmup={warmup}, reps={reps}')
  for _ in range(warmup):
    fn()
  times = []
  for _ in range(reps):
    if between is not None:
      between()
    times.append(seconds(fn))
  return Timing(statistics.median(times), min(times), max(times), reps, tuple(times))
