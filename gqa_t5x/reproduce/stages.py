"""The stage graph of a reproduction, and what each stage computes.

  pretrain MHA -> held-out score of MHA
  per variant and seed: convert (gqa-t5x-convert's plan; MHA stays as it is) -> held-out score
      at alpha 0 -> uptrain, keeping a checkpoint and a held-out score at every alpha
  per row (variant, alpha), seed and task: fine-tune, score every periodic checkpoint on the
      validation split by greedy decoding, keep the best (the paper's "best dev checkpoint")
  trivial baselines per task; the decode benchmark at the paper's XXL head layout

Every stage but the benchmark runs in this process on the models and compiled steps of
models.Models. A stage is done when its directory holds MARKER (written last, atomically, with
the stage's spec and result); rerunning skips finished stages. An unfinished stage starts over,
except pre-training, which resumes from its newest checkpoint.
"""
import dataclasses
import json
import os
import shutil
import subprocess
import sys
import time
from typing import Callable

from etils import epath

from gqa_t5x import checkpointing, errors, files, runs
from gqa_t5x.reproduce import baselines
from gqa_t5x.reproduce.models import FINETUNE, PRETRAIN, Models, train_data
from gqa_t5x.reproduce.presets import Preset

MARKER = 'reproduce_stage.json'
BENCHMARK_FILE = 'decode_benchmark.json'
PRIMARY_METRICS = ('rouge1', 'bleu', 'f1')  # the paper's: ROUGE-1, BLEU, F1 (TriviaQA)


def primary(task: str, scores: dict) -> tuple[str, float]:
  """The paper's metric of a task, from '<task>/<metric>' scores."""
  for name in PRIMARY_METRICS:
    if f'{task}/{name}' in scores:
      return name, scores[f'{task}/{name}']
  raise ValueError(f'task {task} reported {sorted(scores)}, none of {PRIMARY_METRICS}')


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
  """MHA as pre-trained, and trained on for the main alpha (the control: at small scale a few
  percent more steps move quality, so a converted model is compared with MHA trained as long);
  MQA and the first GQA at every alpha (Figure 5); the other GQA sizes and the MQA conversion
  ablation (Figure 4) at the main alpha."""
  main_gqa, *other_gqa = preset.gqa_groups
  out = [Row(Variant(preset.num_heads), 0.0), Row(Variant(preset.num_heads), preset.main_alpha)]
  out += [Row(Variant(g), a) for g in (main_gqa, 1) for a in preset.alphas]
  out += [Row(Variant(g), preset.main_alpha) for g in other_gqa]
  out += [Row(Variant(1, m), preset.main_alpha) for m in preset.ablation_methods]
  return out


@dataclasses.dataclass
class Stage:
  """One unit of work; `directory` holds its outputs and, once finished, MARKER."""
  name: str
  directory: str
  spec: dict  # everything that decides the result; a finished stage must match it
  estimate_s: float  # for the overall ETA before anything was measured
  work: Callable[[], dict]  # computes the stage; returns its result (kept in MARKER)
  resumes: bool = False  # continues from its own checkpoints instead of starting over

  @property
  def marker(self) -> str:
    return os.path.join(self.directory, MARKER)

  def describe(self) -> str:
    return json.dumps(self.spec, sort_keys=True)

  def is_done(self) -> bool:
    """True if finished with the same spec; a different spec is an error, not a redo."""
    if not os.path.exists(self.marker):
      return False
    with open(self.marker) as f:
      recorded = json.load(f)['spec']
    if recorded != json.loads(self.describe()):
      raise errors.ConfigError(
          f'{self.directory} was produced by a different stage ({json.dumps(recorded)}); this '
          f'run would compute {self.describe()}. Use another --output_dir, or delete that '
          'directory.')
    return True

  def result(self) -> dict:
    with open(self.marker) as f:
      return json.load(f)['result']

  def run(self) -> float:
    """Computes the stage, then writes MARKER; returns the seconds it took."""
    start = time.perf_counter()
    if not self.resumes and os.path.exists(self.directory):
      shutil.rmtree(self.directory)  # an interrupted attempt: start over
    os.makedirs(self.directory, exist_ok=True)
    result = self.work()
    seconds = time.perf_counter() - start
    files.write_json(self.marker, {'stage': self.name, 'spec': json.loads(self.describe()),
                                        'seconds': seconds, 'result': result})
    return seconds


def checkpoint(model_dir: str, step: int) -> str:
  return os.path.join(model_dir, f'checkpoint_{step}')


class Plan:
  """Every stage of a preset, in dependency order, and where each writes."""

  def __init__(self, preset: Preset, work_dir: str):
    self.preset, self.work_dir = preset, work_dir
    self.rows = rows(preset)
    self.variants = list(dict.fromkeys(r.variant for r in self.rows))  # each uptrained once
    self.stages: list[Stage] = []
    self.models = Models(preset, preset.pretrained_checkpoint or checkpoint(
        self.path('pretrain'), preset.pretrain_steps))
    self._build()

  def path(self, *parts: str) -> str:
    return os.path.join(self.work_dir, *parts)

  def row_name(self, row: Row) -> str:
    return row.name(self.preset.num_heads)

  def stage(self, name: str) -> Stage:
    return next(s for s in self.stages if s.name == name)

  # Stage names, shared with the report.
  @staticmethod
  def uptrain_name(variant_name: str, seed: int) -> str:
    return f'uptrain {variant_name} seed {seed}'

  @staticmethod
  def finetune_name(row_name: str, seed: int, task: str) -> str:
    return f'finetune {row_name} seed {seed} {task}'

  def variant_alphas(self, variant: Variant) -> list[float]:
    return sorted({0.0} | {r.alpha for r in self.rows if r.variant == variant})

  def _add(self, name, directory, spec, estimate_s, work, resumes=False):
    self.stages.append(Stage(name, directory, spec, estimate_s, work, resumes))

  def _train_estimate(self, steps: int, batch: int, lengths) -> float:
    tokens = steps * batch * sum(n for _, n in lengths)
    return 2.0 + tokens / 1000 * self.preset.seconds_per_kilotoken

  def _build(self):
    p, h = self.preset, self.preset.num_heads
    # Every spec names what its stage depends on, so a changed preset cannot reuse stale stages.
    common = {'model_gin': p.model_gin, 'extra_bindings': list(p.extra_bindings)}
    if not p.pretrained_checkpoint:
      self._add('pretrain', self.path('pretrain'), dict(
          common, task=p.pretrain_task, lengths=dict(p.pretrain_lengths), steps=p.pretrain_steps,
          batch=p.pretrain_batch, warmup=p.warmup_steps, seed=p.pretrain_seed),
          self._train_estimate(p.pretrain_steps, p.pretrain_batch, p.pretrain_lengths),
          self._pretrain, resumes=True)
    self._add('heldout mha', self.path('heldout'), dict(
        common, source=self.models.pretrained_checkpoint, task=p.heldout_task,
        lengths=dict(p.pretrain_lengths)), 5.0, self._reference)
    for seed in p.seeds:
      for v in self.variants:
        alphas = self.variant_alphas(v)
        steps = max(p.uptrain_steps(a) for a in alphas)
        self._add(self.uptrain_name(v.name(h), seed),
                  self.path('uptrain', v.name(h), f'seed{seed}'),
                  dict(common, source=self.models.pretrained_checkpoint, kv_heads=v.kv_heads,
                       method=v.method, alphas=alphas, steps=[p.uptrain_steps(a) for a in alphas],
                       seed=seed, task=p.pretrain_task, lengths=dict(p.pretrain_lengths),
                       heldout_task=p.heldout_task, warmup=p.warmup_steps,
                       batch=p.pretrain_batch),
                  5.0 + self._train_estimate(steps, p.pretrain_batch, p.pretrain_lengths),
                  lambda v=v, seed=seed: self._uptrain(v, seed))
    for task, lengths in p.finetune_tasks:
      self._add(f'baselines {task}', self.path('baselines', task), dict(
          task=task, lengths=dict(lengths)), 5.0, lambda t=task, n=lengths: baselines.score(
              t, dict(n)))
    for seed in p.seeds:
      for row in self.rows:
        for task, lengths in p.finetune_tasks:
          self._add(self.finetune_name(self.row_name(row), seed, task),
                    self.path('finetune', self.row_name(row), f'seed{seed}', task), dict(
                        common, source=self.models.pretrained_checkpoint,
                        kv_heads=row.variant.kv_heads, method=row.variant.method,
                        alpha=row.alpha, seed=seed, task=task, lengths=dict(lengths),
                        steps=p.finetune_steps, batch=p.finetune_batch,
                        learning_rate=p.finetune_learning_rate,
                        checkpoints=p.finetune_checkpoints),
                    5.0 + self._train_estimate(p.finetune_steps, p.finetune_batch, lengths),
                    lambda r=row, s=seed, t=task, n=lengths: self._finetune(r, s, t, n))
    self._add_benchmark()

  # What each stage computes.
  def _pretrain(self) -> dict:
    p, h = self.preset, self.preset.num_heads
    trainer, schedule = self.models.trainer(h, PRETRAIN)
    dataset = train_data(p.pretrain_task, p.pretrain_lengths, p.pretrain_batch, p.pretrain_seed)
    runs.fit(trainer, dataset, p.pretrain_steps, self.path('pretrain'), schedule,
             checkpoint_cfg=checkpointing.CheckpointConfig(
                 save_period=max(1, p.pretrain_steps // 4), keep=1),
             random_seed=p.pretrain_seed, log_period=max(1, p.pretrain_steps // 10))
    return {}

  def _reference(self) -> dict:
    params, step = self.models.pretrained()
    return {'step': step, 'heldout': self.models.heldout(self.preset.num_heads).run(params, step)}

  def _uptrain(self, variant: Variant, seed: int) -> dict:
    """Held-out scores of the converted model at alpha 0 and after each alpha of uptraining."""
    p, g = self.preset, variant.kv_heads
    params, step, facts = self.models.converted(g, variant.method, seed)
    heldout = self.models.heldout(g)
    scores = {'0': heldout.run(params, step)}
    targets = {f'{a:g}': step + p.uptrain_steps(a) for a in self.variant_alphas(variant) if a}
    if targets:
      trainer, schedule = self.models.trainer(g, PRETRAIN)
      steps = tuple(sorted(set(targets.values())))
      batches = self.models.batches(p.pretrain_task, p.pretrain_lengths, p.pretrain_batch, seed)
      _, evals = runs.fit(
          trainer, batches, steps[-1], self.path('uptrain', variant.name(p.num_heads),
                                                 f'seed{seed}'), schedule,
          checkpoint_cfg=checkpointing.CheckpointConfig(save_period=steps[-1], save_steps=steps),
          initial_params=(params, step), random_seed=seed,
          log_period=max(1, (steps[-1] - step) // 4), eval_steps=steps, evaluators=[heldout])
      scores.update({alpha: evals[s] for alpha, s in targets.items()})
    return {'conversion': facts, 'heldout': scores, 'steps': {'0': step, **targets}}

  def _start(self, row: Row, seed: int):
    """(parameters, step) a row's fine-tuning starts from."""
    p, v = self.preset, row.variant
    if row.alpha == 0:
      return self.models.converted(v.kv_heads, v.method, seed)[:2]
    stage = self.stage(self.uptrain_name(v.name(p.num_heads), seed))
    step = stage.result()['steps'][f'{row.alpha:g}']
    return self.models.load(checkpoint(stage.directory, step), v.kv_heads)

  def _finetune(self, row: Row, seed: int, task: str, lengths) -> dict:
    """Fine-tunes, scores each periodic checkpoint on validation, keeps the best one."""
    p, g = self.preset, row.variant.kv_heads
    params, step = self._start(row, seed)
    trainer, schedule = self.models.trainer(g, FINETUNE)
    evaluation = self.models.evaluation(g, task, lengths)
    period = p.finetune_steps // p.finetune_checkpoints
    steps = tuple(step + period * k for k in range(1, p.finetune_checkpoints + 1))
    directory = self.path('finetune', self.row_name(row), f'seed{seed}', task)
    _, evals = runs.fit(
        trainer, self.models.batches(task, lengths, p.finetune_batch, seed), steps[-1], directory,
        schedule, checkpoint_cfg=checkpointing.CheckpointConfig(save_period=steps[-1],
                                                                save_steps=steps),
        initial_params=(params, step), random_seed=seed, log_period=period, eval_steps=steps,
        evaluators=[evaluation])
    best = max(steps, key=lambda s: primary(task, evals[s])[1])
    # Every periodic checkpoint was scored; only the best one is worth its disk space.
    for path in epath.Path(directory).glob('checkpoint_*'):
      if path.name != f'checkpoint_{best}':
        path.rmtree()
    return {'best_step': best, 'best': evals[best], 'evals': {str(s): evals[s] for s in steps}}

  # The decode benchmark: its own process, so that its timings see no training state.
  def benchmark_dir(self) -> str:
    return self.path('benchmark')

  def benchmark_kv_heads(self) -> list[int]:
    """Every G that divides the benchmark's heads, largest first (Figure 6's x axis)."""
    h = self.preset.benchmark.num_heads
    return [g for g in range(h, 0, -1) if h % g == 0]

  def _add_benchmark(self):
    b = self.preset.benchmark
    # The read bandwidth is measured on the benchmark's default 1 GiB buffer: a smaller one can
    # sit in the last-level cache (480 MiB on this project's CPU machines), and a 64 MiB buffer
    # there read at 41-46 GB/s against DRAM's 25-27, putting the floors out of reach.
    argv = ['--levels=decode', '--kv_heads=' + ','.join(map(str, self.benchmark_kv_heads())),
            f'--num_heads={b.num_heads}', f'--head_dim={b.head_dim}', f'--emb_dim={b.emb_dim}',
            f'--mlp_dim={b.mlp_dim}', f'--vocab_size={b.vocab_size}',
            f'--num_decoder_layers={b.num_decoder_layers}', '--num_encoder_layers=0',
            f'--input_length={b.input_length}', f'--output_length={b.output_length}',
            f'--batch={b.batch}', f'--reps={b.reps}', f'--rate_settle_s={b.rate_settle_s}',
            '--peer=false',
            f'--output_dir={self.benchmark_dir()}']

    def work():
      sys.stdout.flush()
      status = subprocess.call([sys.executable, '-m', 'gqa_t5x.benchmark', *argv])
      if status:
        raise errors.ConfigError(f'the decode benchmark failed (exit {status}; its output is '
                                 f'above): python -m gqa_t5x.benchmark {" ".join(argv)}')
      with open(os.path.join(self.benchmark_dir(), BENCHMARK_FILE)) as f:
        document = json.load(f)
      return {'rows': [r for r in document['rows'] if r['implementation'] == 'gqa_t5x'],
              'settings': document['settings'], 'machine': document['machine']}
    self._add('benchmark', self.benchmark_dir(), {'argv': argv},
              15.0 + 8.0 * len(self.benchmark_kv_heads()), work)
