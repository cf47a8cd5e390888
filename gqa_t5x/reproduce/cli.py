"""`python -m gqa_t5x.reproduce [--preset=cpu]`: the paper's Table 1 and Figures 3-6, end to end.

Pre-trains a small MHA T5.1.1 (or starts from a released checkpoint), converts it with
gqa-t5x-convert's plan to GQA and MQA (mean, plus the conversion ablation for MQA), uptrains
each for alpha of the pre-training steps, fine-tunes and evaluates every row with several seeds,
times decoding with gqa-t5x-benchmark, and writes OUTPUT_DIR/{table.md, results.json,
results.csv, fig*.png}: every quality number a mean over seeds with its 95% interval, every
claim of the paper decided held / contradicted / inconclusive. Rerunning reuses finished stages;
an interrupted run continues where it stopped.
"""
import os
import textwrap

from absl import flags

from gqa_t5x import cli
from gqa_t5x import common_flags
from gqa_t5x.reproduce import presets

_PRESET = flags.DEFINE_enum('preset', 'cpu', list(presets.PRESETS),
                            'Sizes: ' + '; '.join(f'{p.name}: {p.description}'
                                                  for p in presets.PRESETS.values()))
_OUTPUT_DIR = common_flags.output_dir()  # results/<preset> when unset
_DRY_RUN = flags.DEFINE_bool('dry_run', False, 'Print every stage command and whether it is '
                             'finished, then stop.')


def _compilation_cache(work_dir: str) -> None:
  """A persistent XLA cache: a rerun (or the benchmark's process) compiles nothing twice."""
  import jax  # pylint: disable=g-import-not-at-top
  cache = os.environ.setdefault('JAX_COMPILATION_CACHE_DIR', os.path.join(work_dir, 'xla_cache'))
  jax.config.update('jax_compilation_cache_dir', cache)
  jax.config.update('jax_persistent_cache_min_compile_time_secs', 0)


def _main(argv) -> None:
  cli.no_positional_arguments(argv)
  cli.import_tensorflow_quietly()  # the stages' tasks and data pipelines import it
  # pylint: disable=g-import-not-at-top  (here: --help and flag errors need no TensorFlow or JAX)
  from gqa_t5x.reproduce import pipeline, report, stages, stats
  preset = presets.get(_PRESET.value)
  output_dir = os.path.abspath(_OUTPUT_DIR.value or os.path.join('results', preset.name))
  plan = stages.Plan(preset, os.path.join(output_dir, 'work'))
  if _DRY_RUN.value:
    for i, stage in enumerate(plan.stages, 1):
      state = 'finished' if stage.is_done() else 'to run'
      print(f'[{i}/{len(plan.stages)}] {stage.name} ({state})')
      print(textwrap.fill(stage.describe(), 100, initial_indent='    ', subsequent_indent='    '))
    return
  _compilation_cache(plan.work_dir)
  summary = pipeline.run(plan, log=lambda s: print(s, flush=True))
  document = report.write(plan, output_dir)
  counts = {v: sum(f['verdict'] == v for f in document['findings']) for v in stats.VERDICTS}
  print(f"Done in {pipeline.format_duration(summary['seconds'])} ({len(summary['ran'])} stages "
        f"run, {len(summary['reused'])} reused). Findings: "
        + ', '.join(f'{n} {v}' for v, n in counts.items())
        + f". See {os.path.join(output_dir, 'table.md')}", flush=True)


def main(argv=None) -> None:
  cli.run('gqa-t5x-reproduce', _main, __doc__, argv)
