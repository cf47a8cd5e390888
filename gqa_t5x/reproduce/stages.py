"""The stage graph of a reproduction: pretrain -> convert -> uptrain -> finetune -> eval, plus
the decode benchmark, each stage one invocation of a public command.

Every stage is a command line of gqa-t5x-train / -eval / -convert / -benchmark (so a
reproduction is also the product's end-to-end test, and any stage can be replayed by hand from
its marker). A stage is done when its directory holds MARKER, written last and atomically; a
half-finished training stage resumes from its newest checkpoint through the runner itself.
"""
import dataclasses
import functools
import json
import os
import shlex
import subprocess
import sys
import tempfile
import time
from typing import Callable, Optional

from gqa_t5x import errors
from gqa_t5x.reproduce.presets import Preset

MARKER = 'reproduce_stage.json'
BENCHMARK_FILE = 'decode_benchmark.json'
EVAL_FILE = 'eval_metrics.jsonl'  # what runs.evaluate appends to EVAL_OUTPUT_DIR


@dataclasses.dataclass(frozen=True)
class Variant:
  """A converted model: G key/value heads in decoder self- and cross-attention, made by `method`."""
  kv_heads: int
  method: str = 'mean'

  def label(self, num_heads: int) -> str:
    """'MHA', 'GQA-4', 'MQA (first)', ...: the row's name in tables and plots."""
    kind = 'MHA' if self.kv_heads == num_heads else 'MQA' if self.kv_heads == 1 else (
        f'GQA-{self.kv_heads}')
    return kind if self.method == 'mean' else f'{kind} ({self.method})'

  def name(self, num_heads: int) -> str:
    """'mha', 'gqa4', 'mqa-first', ...: the row's directory name."""
    kind = self.label(num_heads).split(' ')[0].lower().replace('-', '')
    return kind if self.method == 'mean' else f'{kind}-{self.method}'


@dataclasses.dataclass(frozen=True)
class Row:
  """One line of Table 1: a variant uptrained for alpha of the pre-training steps."""
  variant: Variant
  alpha: float

  def name(self, num_heads: int) -> str:
    return f'{self.variant.name(num_heads)}-alpha{self.alpha:g}'


def rows(preset: Preset) -> list[Row]:
  """MHA as pre-trained; MQA and the first GQA at every alpha (Figure 5); the other GQA sizes and
  the MQA conversion ablation (Figure 4) at the main alpha."""
  main_gqa, *other_gqa = preset.gqa_groups
  out = [Row(Variant(preset.num_heads), 0.0)]
  out += [Row(Variant(g), a) for g in (main_gqa, 1) for a in preset.alphas]
  out += [Row(Variant(g), preset.main_alpha) for g in other_gqa]
  out += [Row(Variant(1, m), preset.main_alpha) for m in preset.ablation_methods]
  return out


@dataclasses.dataclass
class Stage:
  """One command; `directory` holds its outputs and, once finished, MARKER."""
  name: str
  directory: str
  module: str  # python -m <module> <argv>
  argv: list[str]
  estimate_s: float  # for the overall ETA before anything was measured
  in_process: Optional[Callable[[], None]] = None  # same job without a new interpreter

  @property
  def marker(self) -> str:
    return os.path.join(self.directory, MARKER)

  def command(self) -> str:
    return ' '.join([f'python -m {self.module}'] + [shlex.quote(a) for a in self.argv])

  def is_done(self) -> bool:
    """True if finished with the same command; a different command is an error, not a redo."""
    if not os.path.exists(self.marker):
      return False
    with open(self.marker) as f:
      recorded = json.load(f)['command']
    if recorded != self.command():
      raise errors.ConfigError(
          f'{self.directory} was produced by a different command ({recorded}); this run would '
          f'execute {self.command()}. Use another --output_dir, or delete that directory.')
    return True

  def run(self, use_subprocess: bool, env: dict) -> float:
    """Runs the command, then writes MARKER; returns the seconds it took."""
    start = time.perf_counter()
    os.makedirs(self.directory, exist_ok=True)
    if self.in_process and not use_subprocess:
      self.in_process()
    else:  # its own progress output goes straight to the console
      sys.stdout.flush()
      status = subprocess.call([sys.executable, '-m', self.module, *self.argv], env=env)
      if status:
        raise errors.ConfigError(f'stage {self.name} failed (exit {status}; its output is '
                                 f'above): {self.command()}')
    seconds = time.perf_counter() - start
    write_json_atomically(self.marker, {'stage': self.name, 'command': self.command(),
                                        'seconds': seconds})
    return seconds


def write_json_atomically(path: str, document) -> None:
  directory = os.path.dirname(path) or '.'
  os.makedirs(directory, exist_ok=True)
  with tempfile.NamedTemporaryFile('w', dir=directory, delete=False, suffix='.tmp') as f:
    json.dump(document, f, indent=2)
    f.write('\n')
  os.replace(f.name, path)


def _gin_flags(files: list[str], macros: dict) -> list[str]:
  """--gin_file=... --gin.NAME=<python literal>, as typed on a T5X command line."""
  return ([f'--gin_file={f}' for f in files]
          + [f'--gin.{name}={_literal(value)}' for name, value in macros.items()])


def _literal(value) -> str:
  """A gin literal: strings and dicts in double quotes (as T5X's docs write them)."""
  return json.dumps(value) if isinstance(value, (str, dict)) else repr(value)


def _gin_job(module: str, argv: list[str]) -> Callable[[], None]:
  """The job `python -m module argv` runs (gqa_t5x.gin_utils.run), called in this process."""
  def run():
    import gin  # pylint: disable=g-import-not-at-top  (kept off the import path of the CLI)
    from gqa_t5x import gin_utils, runs  # pylint: disable=g-import-not-at-top
    job = {'gqa_t5x.train': runs.train, 'gqa_t5x.eval': runs.evaluate}[module]
    files, bindings = [], []
    for flag in gin_utils.rewrite_gin_args(argv):
      name, value = flag[2:].split('=', 1)
      (files if name == 'gin_file' else bindings).append(value)
    gin_utils.parse_gin(files, bindings, gin_utils.DEFAULT_SEARCH_PATHS)
    gin.get_configurable(job)()
  return run


@functools.lru_cache(maxsize=None)
def model_config(model_gin: str, extra_bindings: tuple[str, ...]):
  """The T5Config the model gin describes (sizes for the benchmark), read without locking gin."""
  from gqa_t5x import gin_utils  # pylint: disable=g-import-not-at-top
  return gin_utils.model_config([model_gin], extra_bindings)


class Plan:
  """Directories and commands of every stage of a preset, in dependency order."""

  def __init__(self, preset: Preset, work_dir: str):
    self.preset, self.work_dir = preset, work_dir
    self.rows = rows(preset)
    self.variants = list(dict.fromkeys(r.variant for r in self.rows))
    self.stages: list[Stage] = []
    self._build()

  # Paths, shared with the report.
  def path(self, *parts: str) -> str:
    return os.path.join(self.work_dir, *parts)

  def row_name(self, row: Row) -> str:
    return row.name(self.preset.num_heads)

  def eval_dir(self, row: Row, task: str) -> str:
    return self.path('eval', self.row_name(row), task)

  def benchmark_dir(self) -> str:
    return self.path('benchmark')

  # The graph.
  def _train_macros(self, task, lengths, steps, model_dir, batch, kv_heads, initial=None):
    # TRAIN_STEPS counts the initial checkpoint's steps; checkpoint 4 times per stage (resume).
    todo = steps - (initial[1] if initial else 0)
    macros = dict(MIXTURE_OR_TASK_NAME=task, TASK_FEATURE_LENGTHS=dict(lengths),
                  TRAIN_STEPS=steps, MODEL_DIR=model_dir, BATCH_SIZE=batch,
                  NUM_KV_HEADS=kv_heads, RANDOM_SEED=self.preset.seed,
                  SAVING_PERIOD=max(1, todo // 4), KEEP_CHECKPOINTS=1,
                  LOG_PERIOD=max(1, min(50, todo // 10)))
    if initial:
      macros['INITIAL_CHECKPOINT_PATH'] = initial[0]
    return macros

  def _add_train(self, name, run_gin, macros, estimate_s):
    argv = _gin_flags([self.preset.model_gin, run_gin], macros) + [
        f'--gin_bindings={b}' for b in self.preset.extra_bindings]
    self.stages.append(Stage(name, macros['MODEL_DIR'], 'gqa_t5x.train', argv, estimate_s,
                             _gin_job('gqa_t5x.train', argv)))

  def _train_estimate(self, steps: int, batch: int, lengths) -> float:
    tokens = steps * batch * sum(n for _, n in lengths)
    return 10.0 + tokens / 1000 * self.preset.seconds_per_kilotoken

  def checkpoint(self, model_dir: str, step: int) -> str:
    return os.path.join(model_dir, f'checkpoint_{step}')

  def _build(self):
    p, h = self.preset, self.preset.num_heads
    if p.pretrained_checkpoint:
      source = p.pretrained_checkpoint
    else:
      pre_dir = self.path('pretrain')
      self._add_train('pretrain', 'runs/pretrain.gin', dict(
          self._train_macros(p.pretrain_task, p.pretrain_lengths, p.pretrain_steps, pre_dir,
                             p.pretrain_batch, h), WARMUP_STEPS=p.warmup_steps),
          self._train_estimate(p.pretrain_steps, p.pretrain_batch, p.pretrain_lengths))
      source = self.checkpoint(pre_dir, p.pretrain_steps)

    converted = {}
    for v in self.variants:
      directory = self.path('convert', v.name(h))
      converted[v] = self.checkpoint(directory, p.pretrain_steps)
      argv = [f'--input={source}', f'--output={converted[v]}', f'--gin_file={p.model_gin}',
              f'--gin_bindings=NUM_KV_HEADS = {v.kv_heads}',
              *[f'--gin_bindings={b}' for b in p.extra_bindings],
              f'--method={v.method}', f'--seed={p.seed}', '--overwrite']
      self.stages.append(Stage(f'convert {v.name(h)}', directory, 'gqa_t5x.convert', argv, 10.0))

    for row in self.rows:
      start, up_steps = converted[row.variant], p.uptrain_steps(row.alpha)
      if up_steps:
        up_dir = self.path('uptrain', self.row_name(row))
        total = p.pretrain_steps + up_steps
        self._add_train(f'uptrain {self.row_name(row)}', 'runs/uptrain.gin', dict(
            self._train_macros(p.pretrain_task, p.pretrain_lengths, total, up_dir,
                               p.pretrain_batch, row.variant.kv_heads,
                               (start, p.pretrain_steps)), WARMUP_STEPS=p.warmup_steps),
            self._train_estimate(up_steps, p.pretrain_batch, p.pretrain_lengths))
        start = self.checkpoint(up_dir, total)
      first = p.pretrain_steps + up_steps
      for task, lengths in p.finetune_tasks:
        ft_dir = self.path('finetune', self.row_name(row), task)
        total = first + p.finetune_steps
        self._add_train(f'finetune {self.row_name(row)} {task}', 'runs/finetune.gin', dict(
            self._train_macros(task, lengths, total, ft_dir, p.finetune_batch,
                               row.variant.kv_heads, (start, first)),
            BASE_LEARNING_RATE=p.finetune_learning_rate),
            self._train_estimate(p.finetune_steps, p.finetune_batch, lengths))
        argv = _gin_flags([p.model_gin, 'runs/eval.gin'], dict(
            MIXTURE_OR_TASK_NAME=task, TASK_FEATURE_LENGTHS=dict(lengths),
            CHECKPOINT_PATH=self.checkpoint(ft_dir, total),
            EVAL_OUTPUT_DIR=self.eval_dir(row, task), BATCH_SIZE=p.eval_batch,
            NUM_KV_HEADS=row.variant.kv_heads)) + [
                f'--gin_bindings={b}' for b in p.extra_bindings]
        self.stages.append(Stage(f'eval {self.row_name(row)} {task}', self.eval_dir(row, task),
                                 'gqa_t5x.eval', argv, 20.0, _gin_job('gqa_t5x.eval', argv)))
    self._add_benchmark()

  def kv_head_counts(self) -> list[int]:
    """Every G that divides H, largest first (Figure 6's x axis)."""
    h = self.preset.num_heads
    return [g for g in range(h, 0, -1) if h % g == 0]

  def _add_benchmark(self):
    b, c = self.preset.benchmark, model_config(self.preset.model_gin, self.preset.extra_bindings)
    argv = ['--levels=decode', '--kv_heads=' + ','.join(map(str, self.kv_head_counts())),
            f'--num_heads={c.num_heads}', f'--head_dim={c.head_dim}', f'--emb_dim={c.emb_dim}',
            f'--mlp_dim={c.mlp_dim}', f'--vocab_size={c.vocab_size}',
            f'--num_decoder_layers={c.num_decoder_layers}',
            f'--num_encoder_layers={c.num_encoder_layers}', f'--input_length={b.input_length}',
            f'--output_length={b.output_length}', f'--batch={b.batch}', f'--reps={b.reps}',
            '--peer=false', '--bandwidth_mib=64', f'--seed={self.preset.seed}',
            f'--output_dir={self.benchmark_dir()}']
    self.stages.append(Stage('benchmark', self.benchmark_dir(), 'gqa_t5x.benchmark', argv,
                             15.0 + 5.0 * len(self.kv_head_counts())))
