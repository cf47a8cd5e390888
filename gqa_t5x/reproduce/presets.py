"""Sizes of a reproduction: one Preset per machine class, from a CI smoke run to the paper.

Why presets: the paper's experiment (T5.1.1 XXL, C4, seven tasks, TPUv4 pods) cannot run on a
laptop, but its *shape* can: pre-train an MHA model, convert, uptrain for alpha of the
pre-training steps, fine-tune, evaluate, time decoding. A preset fixes every size, step count and
seed of that shape so that a run is reproducible and its cost predictable.
"""
import dataclasses
from typing import Optional

from gqa_t5x.errors import ConfigError

Lengths = tuple[tuple[str, int], ...]  # (('inputs', n), ('targets', m)): hashable and ordered


def lengths(inputs: int, targets: int) -> Lengths:
  return (('inputs', inputs), ('targets', targets))


@dataclasses.dataclass(frozen=True)
class Benchmark:
  """The decode benchmark (gqa-t5x-benchmark) that gives T_infer per kv-head count.

  Its head layout is the paper's XXL one (64 heads x 64) whatever the trained model's, so that the
  key/value cache is what decoding reads most, as in the paper; width, depth and batch are what
  the machine can hold. MHA and MQA rows are timed as MHA and MQA; a GQA-G row of the trained
  model's H heads at the same fraction G/H of MHA's cache (Preset.benchmark_kv_heads).
  """
  input_length: int
  output_length: int
  batch: int
  num_heads: int = 64
  head_dim: int = 64
  emb_dim: int = 512
  mlp_dim: int = 1024
  vocab_size: int = 32128
  num_decoder_layers: int = 1
  reps: int = 3
  rate_settle_s: float = 1.0  # gqa-t5x-benchmark's wait before each sample of the machine's rates


@dataclasses.dataclass(frozen=True)
class Preset:
  """Everything that decides what a reproduction computes (see the presets below)."""
  name: str
  description: str
  model_gin: str  # under gin_configs/, e.g. models/t5_1_1/tiny.gin
  num_heads: int  # H of model_gin; G = H is MHA, G = 1 is MQA
  gqa_groups: tuple[int, ...]  # G of the GQA rows; the first is the alpha sweep's GQA
  pretrain_task: str  # also the uptraining task (the paper continues pre-training)
  heldout_task: str  # its validation split gives the teacher-forced held-out loss
  pretrain_lengths: Lengths
  pretrain_steps: int  # alpha is a fraction of these (the paper: 1M steps of T5.1.1)
  pretrain_batch: int
  warmup_steps: int  # rsqrt schedule of pre-training and uptraining
  finetune_tasks: tuple[tuple[str, Lengths], ...]
  finetune_steps: int
  finetune_batch: int
  eval_batch: int
  benchmark: Benchmark
  seeds: tuple[int, ...] = (0, 1, 2)  # uptraining and fine-tuning data order and dropout
  alphas: tuple[float, ...] = (0.0, 0.05, 0.1)  # uptraining proportions (Figure 5)
  main_alpha: float = 0.05  # Table 1 and Figure 4 use this one
  ablation_methods: tuple[str, ...] = ('first', 'random')  # MQA conversions besides mean (Fig. 4)
  finetune_learning_rate: float = 0.001  # the paper's constant rate
  finetune_checkpoints: int = 4  # periodic fine-tuning checkpoints, each scored; best reported
  pretrain_seed: int = 0
  # A released MHA checkpoint to start from instead of pre-training (the paper: T5.1.1's).
  pretrained_checkpoint: Optional[str] = None
  extra_bindings: tuple[str, ...] = ()  # gin bindings of the model, e.g. VOCAB_SIZE
  num_partitions: int = 1  # model-parallel devices per replica (a pod: 8)
  seconds_per_kilotoken: float = 0.02  # training cost prior, for the ETA before measurements

  def __post_init__(self):
    for g in self.gqa_groups:
      if not 1 < g < self.num_heads or self.num_heads % g:
        raise ConfigError(f'preset {self.name}: GQA group count {g} must divide num_heads='
                          f'{self.num_heads} and lie strictly between 1 (MQA) and H (MHA)')
    if self.main_alpha not in self.alphas or 0.0 not in self.alphas:
      raise ConfigError(f'preset {self.name}: alphas {self.alphas} must hold 0 and main_alpha '
                        f'{self.main_alpha}')
    if len(self.seeds) < 2 or len(set(self.seeds)) != len(self.seeds):
      raise ConfigError(f'preset {self.name}: seeds {self.seeds} must be at least two distinct '
                        'values (intervals need replicates)')
    if self.benchmark.num_heads % self.num_heads:
      raise ConfigError(f'preset {self.name}: the benchmark\'s {self.benchmark.num_heads} heads '
                        f'must be a multiple of the model\'s {self.num_heads}')
    if self.finetune_steps % self.finetune_checkpoints:
      raise ConfigError(f'preset {self.name}: finetune_steps {self.finetune_steps} must be a '
                        f'multiple of finetune_checkpoints {self.finetune_checkpoints}')

  def uptrain_steps(self, alpha: float) -> int:
    """alpha of the pre-training steps; at least one step for any alpha > 0."""
    return max(1, round(alpha * self.pretrain_steps)) if alpha > 0 else 0

  def benchmark_kv_heads(self, kv_heads: int) -> int:
    """The benchmark's G for a row with G = kv_heads: 1 for MQA, else the same fraction G/H."""
    return 1 if kv_heads == 1 else kv_heads * self.benchmark.num_heads // self.num_heads


SMOKE = Preset(
    name='smoke',
    description='Every stage at toy sizes, for the test suite (about two minutes on 2 CPU '
                'cores).',
    model_gin='models/t5_1_1/tiny.gin', num_heads=8, gqa_groups=(2,),
    pretrain_task='gqa_embedded_multitask', heldout_task='gqa_embedded_span_corruption',
    pretrain_lengths=lengths(32, 8), pretrain_steps=20, pretrain_batch=8, warmup_steps=10,
    finetune_tasks=(('gqa_embedded_module_qa', lengths(32, 8)),),
    finetune_steps=4, finetune_batch=8, eval_batch=256, finetune_checkpoints=2,
    benchmark=Benchmark(input_length=64, output_length=4, batch=2, num_heads=16, head_dim=16,
                        emb_dim=64, mlp_dim=64, vocab_size=256, reps=2, rate_settle_s=0),
    seeds=(0, 1), alphas=(0.0, 0.1), main_alpha=0.1, seconds_per_kilotoken=0.05)

CPU = Preset(
    name='cpu',
    description='The default: tiny T5.1.1 (8 heads) pre-trained on the embedded corpus (span '
                'corruption and module QA), fine-tuned on module QA, 3 seeds; 16 minutes measured '
                'on 2 CPU cores.',
    model_gin='models/t5_1_1/tiny.gin', num_heads=8, gqa_groups=(2,),
    pretrain_task='gqa_embedded_multitask', heldout_task='gqa_embedded_span_corruption',
    pretrain_lengths=lengths(128, 32), pretrain_steps=500, pretrain_batch=32, warmup_steps=100,
    ablation_methods=('first', 'random', 'aligned'),
    finetune_tasks=(('gqa_embedded_module_qa', lengths(96, 8)),),
    finetune_steps=50, finetune_batch=32, eval_batch=256, finetune_checkpoints=2,
    finetune_learning_rate=0.005,
    benchmark=Benchmark(input_length=2048, output_length=32, batch=16),
    seconds_per_kilotoken=0.06)

GPU = Preset(
    name='gpu',
    description='T5.1.1 Small (6 heads of 64, 8+8 layers) on the embedded corpus and task: about '
                'an hour on one GPU or a TPU VM (estimate; not measured).',
    model_gin='models/t5_1_1/small.gin', num_heads=6, gqa_groups=(2, 3),
    pretrain_task='gqa_embedded_multitask', heldout_task='gqa_embedded_span_corruption',
    pretrain_lengths=lengths(512, 114), pretrain_steps=10000, pretrain_batch=64,
    warmup_steps=1000, ablation_methods=('first', 'random', 'aligned'),
    finetune_tasks=(('gqa_embedded_module_qa', lengths(128, 8)),),
    finetune_steps=2000, finetune_batch=64, eval_batch=512,
    benchmark=Benchmark(input_length=2048, output_length=512, batch=32, num_heads=48,
                        emb_dim=4096, mlp_dim=10240, num_decoder_layers=2),
    extra_bindings=('VOCAB_SIZE = 1152',), seconds_per_kilotoken=0.0005)

PAPER = Preset(
    name='paper',
    description="The paper's runs: T5.1.1 XXL from the released checkpoint, uptrained on C4, "
                'fine-tuned on the seven tasks. Needs a TPU slice and the prepared TFDS data.',
    model_gin='models/t5_1_1/xxl.gin', num_heads=64, gqa_groups=(8,),
    pretrain_task='gqa_c4_span_corruption', heldout_task='gqa_c4_span_corruption',
    pretrain_lengths=lengths(512, 114),
    # T5's final recipe: 1M steps of 2048 x 512-token sequences; uptraining continues it.
    pretrain_steps=1_000_000, pretrain_batch=2048, warmup_steps=10000,
    finetune_tasks=(('gqa_cnn_dailymail', lengths(512, 256)), ('gqa_arxiv', lengths(2048, 512)),
                    ('gqa_pubmed', lengths(2048, 512)), ('gqa_mediasum', lengths(2048, 512)),
                    ('gqa_multi_news', lengths(2048, 512)),
                    ('gqa_wmt14_ende', lengths(512, 256)), ('gqa_trivia_qa', lengths(2048, 32))),
    finetune_steps=20000,  # the paper does not state it (it keeps the best dev checkpoint)
    finetune_batch=128, eval_batch=256, finetune_checkpoints=20,
    benchmark=Benchmark(input_length=2048, output_length=512, batch=32, emb_dim=4096,
                        mlp_dim=10240, num_decoder_layers=24),
    seeds=(0, 1), pretrained_checkpoint=(
        'gs://t5-data/pretrained_models/t5x/t5_1_1_xxl/checkpoint_1000000'),
    num_partitions=8, seconds_per_kilotoken=0.0002)

PRESETS = {p.name: p for p in (SMOKE, CPU, GPU, PAPER)}


def get(name: str) -> Preset:
  if name not in PRESETS:
    raise ConfigError(f'unknown preset {name!r}; choose one of {", ".join(PRESETS)}')
  return PRESETS[name]
