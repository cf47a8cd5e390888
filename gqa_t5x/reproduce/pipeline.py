"""Runs a Plan's stages in order, skipping finished ones, with per-stage and overall progress.

The overall ETA starts from the preset's cost estimates and is rescaled by how long the stages
run so far actually took compared with their estimates (the machine's speed, measured).
"""
import time
from typing import Callable

from gqa_t5x.reproduce.stages import Plan


def format_duration(seconds: float) -> str:
  seconds = int(round(seconds))
  return f'{seconds // 3600}h{seconds // 60 % 60:02d}m' if seconds >= 3600 else (
      f'{seconds // 60}m{seconds % 60:02d}s')


def run(plan: Plan, log: Callable[[str], None] = print) -> dict:
  """Runs every unfinished stage; returns {'ran': [names], 'reused': [names], 'seconds': total}."""
  stages = plan.stages
  finished = {s.name for s in stages if s.is_done()}
  pending = [s for s in stages if s.name not in finished]
  log(f'{len(stages)} stages: {len(finished)} finished earlier (reused), {len(pending)} to run, '
      f'first estimate {format_duration(sum(s.estimate_s for s in pending))}')
  spent = estimated = 0.0
  begin = time.perf_counter()
  ran = []
  for i, stage in enumerate(stages, 1):
    if stage.name in finished:
      log(f'[{i}/{len(stages)}] {stage.name}: finished earlier, reused ({stage.directory})')
      continue
    left = sum(s.estimate_s for s in pending[len(ran):]) * (spent / estimated if estimated else 1)
    log(f'[{i}/{len(stages)}] {stage.name}: starting; overall {len(ran)}/{len(pending)} done, '
        f'ETA {format_duration(left)}')
    seconds = stage.run()
    spent, estimated = spent + seconds, estimated + stage.estimate_s
    ran.append(stage.name)
    log(f'[{i}/{len(stages)}] {stage.name}: finished in {format_duration(seconds)} '
        f'(elapsed {format_duration(time.perf_counter() - begin)})')
  return {'ran': ran, 'reused': sorted(finished), 'seconds': time.perf_counter() - begin}
