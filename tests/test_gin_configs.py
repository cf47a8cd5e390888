"""Every gin file under gin_configs/ (except t5x/, which needs T5X) parses the way the runner
parses it (gin_utils.parse_gin) and binds the values the paper prescribes, resolved from the bound
job's arguments. Table 1's experiment files are run through the exact commands their headers
document, stage after stage, checking that each stage starts from the checkpoint the previous
one writes. Expected values are written here from the paper (Ainslie et al. 2023, section 3) and
T5.1.1's published sizes, never read from the gins.
"""
import re
import shlex

import gin
import pytest
import seqio

import gqa_t5x
from gqa_t5x import errors, gin_utils, network, partitioning, runs
from gqa_t5x.tasks import lengths, vocab

GIN_DIR = gqa_t5x.GIN_CONFIGS_DIR
GIN_FILES = sorted(str(p.relative_to(GIN_DIR)) for p in GIN_DIR.rglob('*.gin')
                   if p.relative_to(GIN_DIR).parts[0] != 't5x')  # t5x/: tests/test_t5x_configs.py

# Section 3.1: CNN/DM and WMT 512/256; arXiv, PubMed, MediaSum, MultiNews 2048/512; TriviaQA
# 2048/32. Uptraining: T5.1.1's pre-training lengths.
PAPER_LENGTHS = {
    'gqa_cnn_dailymail': (512, 256), 'gqa_wmt14_ende': (512, 256),
    'gqa_arxiv': (2048, 512), 'gqa_pubmed': (2048, 512), 'gqa_mediasum': (2048, 512),
    'gqa_multi_news': (2048, 512), 'gqa_trivia_qa': (2048, 32),
    'gqa_c4_span_corruption': (512, 114)}
EMBEDDED_LENGTHS = {'gqa_embedded_span_corruption': (128, 32),
                    'gqa_embedded_lead_summary': (256, 64), 'gqa_embedded_module_qa': (96, 8)}
TABLE1_TASKS = ['gqa_cnn_dailymail', 'gqa_arxiv', 'gqa_pubmed', 'gqa_mediasum', 'gqa_multi_news',
                'gqa_wmt14_ende', 'gqa_trivia_qa']  # Table 1's columns
T5_VOCABULARY = 'gs://t5-data/vocabs/cc_all.32000.100extra/sentencepiece.model'

# T5.1.1: d_model, heads, head dim, vocabulary rows (tiny: the project's CPU model).
SIZES = {'tiny': (128, 8, 16, 1152), 'small': (512, 6, 64, 32128), 'base': (768, 12, 64, 32128),
         'large': (1024, 16, 64, 32128), 'xl': (2048, 32, 64, 32128),
         'xxl': (4096, 64, 64, 32128)}
ATTENTION_KV_HEADS = {'mha': None, 'mqa': 1, 'gqa8': 8}  # None: one per query head
# Table 1's rows: size, decoder kv heads G, uptrained (MQA/GQA) or the public checkpoint (MHA).
TABLE1_ROWS = {'mha_large': ('large', 16, False), 'mha_xxl': ('xxl', 64, False),
               'mqa_xxl': ('xxl', 1, True), 'gqa8_xxl': ('xxl', 8, True)}

# Path pattern, kind, expectation table: every gin file must match a pattern, and its name must
# have an entry in that table (None: the kind is a single file or needs no table).
KINDS = [
    (r'models/t5_1_1/(\w+)\.gin', 'model', SIZES),
    (r'models/attention/(\w+)\.gin', 'attention', ATTENTION_KV_HEADS),
    (r'tasks/t5_vocabulary\.gin', 'vocabulary', None),
    (r'tasks/(\w+)\.gin', 'task', {**PAPER_LENGTHS, **EMBEDDED_LENGTHS}),
    (r'runs/uptrain_alpha_(\d+\.\d+)\.gin', 'uptrain_alpha', None),
    (r'runs/(\w+)\.gin', 'run', {'pretrain', 'uptrain', 'finetune', 'eval', 'infer'}),
    (r'experiments/table1/(\w+?)_(uptrain|finetune|eval)\.gin', 'table1', TABLE1_ROWS),
]
TRAIN_MACROS = {'MIXTURE_OR_TASK_NAME': 'gqa_embedded_lead_summary',
                'TASK_FEATURE_LENGTHS': {'inputs': 256, 'targets': 64},
                'TRAIN_STEPS': 7, 'MODEL_DIR': '/runs/m'}
EVAL_MACROS = {'MIXTURE_OR_TASK_NAME': 'gqa_embedded_lead_summary',
               'TASK_FEATURE_LENGTHS': {'inputs': 256, 'targets': 64},
               'CHECKPOINT_PATH': '/runs/m'}


def classify(path):
  """(kind, the pattern's groups, the kind's expectation table) of a gin file under GIN_DIR."""
  for pattern, kind, known in KINDS:
    if (m := re.fullmatch(pattern, path)):
      return kind, m.groups(), known
  return None, (), None


def files_of(kind):
  return [f for f in GIN_FILES if classify(f)[0] == kind]


@pytest.fixture(autouse=True)
def clean_gin():
  yield
  gin.clear_config()


def parse(*files, **macros):
  gin_utils.parse_gin(files, [f'{name} = {value!r}' for name, value in macros.items()])


def parse_command(argv):
  """Parses a documented `gqa-t5x-train/eval ...` command line as the driver would."""
  files, bindings = [], []
  for arg in gin_utils.rewrite_gin_args(argv[1:]):
    name, value = arg[2:].split('=', 1)
    (files if name == 'gin_file' else bindings).append(value)
  gin_utils.parse_gin(files, bindings)


def kv_heads(config):
  return config.num_encoder_kv_heads, config.num_decoder_self_kv_heads, \
      config.num_decoder_cross_kv_heads


def lengths_of(dataset_cfg):
  return dataset_cfg.task_feature_lengths['inputs'], dataset_cfg.task_feature_lengths['targets']


def test_every_gin_file_is_covered_and_every_table1_row_has_its_stages():
  assert len(GIN_FILES) > 30
  for path in GIN_FILES:
    kind, groups, known = classify(path)
    assert kind, f'{path}: no test here covers it; add a pattern to KINDS'
    assert known is None or groups[0] in known, f'{path}: add its expected values to this test'
  stages = {f.split('/')[-1][:-4] for f in files_of('table1')}
  assert stages == {f'{row}_{stage}' for row, (_, _, uptrained) in TABLE1_ROWS.items()
                    for stage in (('uptrain',) if uptrained else ()) + ('finetune', 'eval')}
  assert 'runs/uptrain_alpha_0.05.gin' in GIN_FILES  # Table 1's alpha


@pytest.mark.parametrize('path', files_of('model'))
def test_model_gin_builds_t5_1_1_with_mha_by_default(path):
  emb, heads, head_dim, vocab_size = SIZES[classify(path)[1][0]]
  parse(path)
  config = gin.get_bindings(network.Transformer)['config']
  assert (config.emb_dim, config.num_heads, config.head_dim, config.vocab_size) == (
      emb, heads, head_dim, vocab_size)
  assert kv_heads(config) == (heads, heads, heads)
  assert config.dropout_rate == 0.0


@pytest.mark.parametrize('size', ['large', 'xxl'])
@pytest.mark.parametrize('path', files_of('attention'))
def test_attention_gin_sets_decoder_kv_heads_and_keeps_the_encoder_mha(path, size):
  heads = SIZES[size][1]
  groups = ATTENTION_KV_HEADS[classify(path)[1][0]] or heads
  parse(f'models/t5_1_1/{size}.gin', path)
  assert kv_heads(gin.get_bindings(network.Transformer)['config']) == (heads, groups, groups)


@pytest.mark.parametrize('run', ['runs/finetune.gin', 'runs/eval.gin'])
@pytest.mark.parametrize('path', files_of('task'))
def test_task_gin_names_a_registered_task_at_its_lengths(path, run):
  name = classify(path)[1][0]
  expected = PAPER_LENGTHS.get(name) or EMBEDDED_LENGTHS[name]
  macros = ({'TRAIN_STEPS': 7, 'MODEL_DIR': '/runs/m', 'INITIAL_CHECKPOINT_PATH': '/ckpt/c'}
            if run == 'runs/finetune.gin' else
            {'CHECKPOINT_PATH': '/runs/m', 'EVAL_OUTPUT_DIR': '/runs/e'})
  parse('models/t5_1_1/tiny.gin', run, path, **macros)
  job = runs.train if run == 'runs/finetune.gin' else runs.evaluate
  bound = gin.get_bindings(job)
  dataset_cfgs = ([bound['train_dataset_cfg'], bound['infer_eval_dataset_cfg']]
                  if job is runs.train else [bound['dataset_cfg']])
  for dataset_cfg in dataset_cfgs:
    assert dataset_cfg.mixture_or_task_name == name
    assert dataset_cfg.module == 'gqa_t5x.tasks'
    assert lengths_of(dataset_cfg) == expected
  assert name in seqio.TaskRegistry.names()
  assert lengths.TASK_FEATURE_LENGTHS[name] == dict(zip(('inputs', 'targets'), expected))
  if name in PAPER_LENGTHS:  # T5's vocabulary, through the binding the task actually resolves
    task_vocabulary = seqio.get_mixture_or_task(name).output_features['targets'].vocabulary
    assert task_vocabulary.vocabulary.sentencepiece_model_file == T5_VOCABULARY


def test_t5_vocabulary_gin_takes_a_local_sentencepiece_model():
  parse('tasks/t5_vocabulary.gin')
  assert vocab.get_vocabulary().sentencepiece_model_file == T5_VOCABULARY
  parse('tasks/gqa_arxiv.gin', SENTENCEPIECE_MODEL='/data/spm.model')
  arxiv = seqio.get_mixture_or_task('gqa_arxiv').output_features['inputs'].vocabulary
  assert arxiv.vocabulary.sentencepiece_model_file == '/data/spm.model'


def check_pretraining_recipe(bound, global_step, batch_size=128, num_microbatches=None):
  """T5.1.1's recipe: rsqrt decay after 10k warm-up steps, packed, no dropout; T5X's batch 128,
  or T5's 2048 in microbatches of 128 for the paper's uptraining."""
  schedule = bound['learning_rate']
  assert float(schedule(0)) == pytest.approx(0.01) == float(schedule(9_999))
  assert float(schedule(global_step)) == pytest.approx(global_step ** -0.5)
  assert bound['model'].config.dropout_rate == 0.0
  assert bound['train_dataset_cfg'].batch_size == batch_size and bound['train_dataset_cfg'].pack
  assert bound['num_microbatches'] == num_microbatches
  assert bound['z_loss'] == 1e-4


def check_finetuning_recipe(bound):
  """The paper's fine-tuning: constant learning rate 1e-3, batch 128, dropout 0.1."""
  for step in (0, 1_000_000, 1_069_999):
    assert float(bound['learning_rate'](step)) == pytest.approx(1e-3)
  assert bound['model'].config.dropout_rate == 0.1
  assert bound['train_dataset_cfg'].batch_size == 128


@pytest.mark.parametrize('path', files_of('run'))
def test_run_gin_binds_its_recipe(path):
  name = classify(path)[1][0]
  if name in ('eval', 'infer'):
    output = {'eval': 'EVAL_OUTPUT_DIR', 'infer': 'INFER_OUTPUT_DIR'}[name]
    parse('models/t5_1_1/tiny.gin', path, **EVAL_MACROS, **{output: '/runs/out'})
    bound = gin.get_bindings(runs.evaluate if name == 'eval' else runs.infer)
    dataset_cfg = bound['dataset_cfg']
    assert dataset_cfg.split == 'validation'
    assert not dataset_cfg.shuffle and not dataset_cfg.pack
    assert lengths_of(dataset_cfg) == (256, 64)
    assert bound['model'].config.dropout_rate == 0.0
    assert (bound['checkpoint_path'], bound['output_dir']) == ('/runs/m', '/runs/out')
    return
  needs_checkpoint = name in ('uptrain', 'finetune')
  if needs_checkpoint:  # starting from random parameters would be a silent mistake
    with pytest.raises(errors.ConfigError, match='INITIAL_CHECKPOINT_PATH'):
      parse('models/t5_1_1/tiny.gin', path, **TRAIN_MACROS)
  checkpoint = {'INITIAL_CHECKPOINT_PATH': '/ckpt/c'} if needs_checkpoint else {}
  parse('models/t5_1_1/tiny.gin', path, **TRAIN_MACROS, **checkpoint)
  bound = gin.get_bindings(runs.train)
  assert bound['train_steps'] == 7
  assert bound['initial_checkpoint_path'] == ('/ckpt/c' if needs_checkpoint else None)
  assert bound['train_dataset_cfg'].split == 'train'
  if name == 'finetune':
    check_finetuning_recipe(bound)
  else:
    check_pretraining_recipe(bound, 1_000_000 if name == 'uptrain' else 40_000)


@pytest.mark.parametrize('path', files_of('uptrain_alpha'))
def test_uptrain_alpha_gin_trains_alpha_of_the_original_million_steps(path):
  alpha = float(classify(path)[1][0])
  parse('models/t5_1_1/tiny.gin', path, 'tasks/gqa_c4_span_corruption.gin',
        INITIAL_CHECKPOINT_PATH='/ckpt/c', MODEL_DIR='/runs/m')
  bound = gin.get_bindings(runs.train)
  assert bound['train_steps'] == round(1_000_000 * (1 + alpha))
  check_pretraining_recipe(bound, 1_000_000, batch_size=2048, num_microbatches=16)


def documented_commands(path):
  """The shell commands in a gin file's comments (continuation lines joined), and the tasks of
  its `for TASK in ...; do` loop."""
  comments = [line[1:].strip() for line in (GIN_DIR / path).read_text().splitlines()
              if line.startswith('#')]
  commands, current = [], None
  for line in comments:
    if line.startswith('gqa-t5x-'):
      current = []
    if current is not None:
      current.append(line.rstrip('\\'))
      if not line.endswith('\\'):
        commands.append(' '.join(current))
        current = None
  loop = re.search(r'for TASK in ([\w\s\\]+); do', '\n'.join(comments))
  tasks = loop.group(1).replace('\\', ' ').split() if loop else []
  return commands, tasks


def argv_of(command, task=None):
  argv = shlex.split(command.replace('$CKPT', '/ckpt').replace('$TASK', task or '$TASK'))
  assert '$' not in ' '.join(argv), command
  return argv


def flag(argv, name):
  return next(a.split('=', 1)[1] for a in argv if a.startswith(f'--{name}='))


def check_model(bound, size, groups):
  config = bound['model'].config
  _, heads, head_dim, _ = SIZES[size]
  assert (config.num_heads, config.head_dim) == (heads, head_dim)
  assert kv_heads(config) == (heads, groups, groups)
  assert gin.get_bindings(partitioning.Partitioner)['num_partitions'] == (
      8 if size == 'xxl' else 1)


@pytest.mark.parametrize('row', sorted(TABLE1_ROWS))
def test_table1_row_runs_stage_by_stage_with_its_documented_commands(row):
  size, groups, uptrained = TABLE1_ROWS[row]
  stage_path = f'experiments/table1/{row}_%s.gin'
  first = stage_path % ('uptrain' if uptrained else 'finetune')
  convert = [argv_of(c) for c in documented_commands(first)[0] if c.startswith('gqa-t5x-convert')]
  assert len(convert) == 1
  assert flag(convert[0], 'input') == (
      f'gs://t5-data/pretrained_models/t5x/t5_1_1_{size}/checkpoint_1000000')
  assert int(flag(convert[0], 'num_kv_heads')) == groups
  checkpoint, step = flag(convert[0], 'output'), 1_000_000

  if uptrained:  # alpha = 0.05 on C4 span corruption, T5.1.1's pre-training recipe
    commands, _ = documented_commands(stage_path % 'uptrain')
    (uptrain,) = [argv_of(c) for c in commands if c.startswith('gqa-t5x-train')]
    parse_command(uptrain)
    bound = gin.get_bindings(runs.train)
    assert bound['initial_checkpoint_path'] == checkpoint
    assert bound['train_steps'] == 1_050_000
    assert bound['train_dataset_cfg'].mixture_or_task_name == 'gqa_c4_span_corruption'
    assert lengths_of(bound['train_dataset_cfg']) == PAPER_LENGTHS['gqa_c4_span_corruption']
    check_pretraining_recipe(bound, 1_000_000, batch_size=2048, num_microbatches=16)
    assert bound['loss_normalizing_factor'] == 2048 * 114  # the public checkpoints' loss scale
    check_model(bound, size, groups)
    checkpoint, step = f"{bound['model_dir']}/checkpoint_1050000", 1_050_000

  commands, tasks = documented_commands(stage_path % 'finetune')
  assert tasks == TABLE1_TASKS
  (finetune,) = [c for c in commands if c.startswith('gqa-t5x-train')]
  (evaluate,) = documented_commands(stage_path % 'eval')[0]
  assert documented_commands(stage_path % 'eval')[1] == TABLE1_TASKS
  for task in tasks:
    parse_command(argv_of(finetune, task))
    bound = gin.get_bindings(runs.train)
    assert bound['initial_checkpoint_path'] == checkpoint
    assert bound['train_steps'] == step + 20_000
    for dataset_cfg in (bound['train_dataset_cfg'], bound['infer_eval_dataset_cfg']):
      assert dataset_cfg.mixture_or_task_name == task
      assert lengths_of(dataset_cfg) == PAPER_LENGTHS[task]
    check_finetuning_recipe(bound)
    assert bound['loss_normalizing_factor'] == 2048 * 114
    check_model(bound, size, groups)
    model_dir = bound['model_dir']

    assert evaluate.startswith('gqa-t5x-eval')
    parse_command(argv_of(evaluate, task))
    bound = gin.get_bindings(runs.evaluate)
    assert bound['checkpoint_path'] == model_dir  # scores every fine-tuning checkpoint
    assert (bound['dataset_cfg'].mixture_or_task_name, bound['dataset_cfg'].split) == (
        task, 'validation')
    assert lengths_of(bound['dataset_cfg']) == PAPER_LENGTHS[task]
    assert bound['model'].config.dropout_rate == 0.0
    check_model(bound, size, groups)
