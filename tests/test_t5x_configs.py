"""gin_configs/t5x: the T5X model gins bind gqa_t5x's network for every size and attention kind,
and (when T5X is installed) uptrain/fine-tune/eval/infer run under T5X's own t5x.train,
t5x.eval and t5x.infer on CPU with a tiny model restored from a gqa-t5x-convert output.

Without T5X, its four modules the model gins import are replaced by stand-ins with T5X's
signatures (t5x at cc342d4, 2026-04-21), so the model part of every config still binds here.
"""
import importlib.util
import json
import sys
import types

import gin
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import gqa_t5x
from gqa_t5x.checkpoints.base import unflatten
from gqa_t5x.network import Transformer
from tests import runner_helpers

HAVE_T5X = importlib.util.find_spec('t5x') is not None

# T5.1.1 sizes (T5X's t5_1_1/*.gin; tiny is ours): emb, heads, layers, mlp, head_dim, vocab.
SIZES = {
    'tiny': (128, 8, 2, 256, 16, 1152),
    'small': (512, 6, 8, 1024, 64, 32128),
    'base': (768, 12, 12, 2048, 64, 32128),
    'large': (1024, 16, 24, 2816, 64, 32128),
    'xl': (2048, 32, 24, 5120, 64, 32128),
    'xxl': (4096, 64, 24, 10240, 64, 32128),
}
KINDS = {'mha': lambda h: h, 'mqa': lambda h: 1, 'gqa8': lambda h: 8}


# ----------------------------- T5X stand-ins (only without T5X) ----------------------------
class EncoderDecoderModel:
  """Keeps its arguments under T5X's attribute names (models.BaseTransformerModel)."""

  def __init__(self, module, input_vocabulary, output_vocabulary, optimizer_def,
               decode_fn=None, feature_converter_cls=None, label_smoothing=0.0, z_loss=0.0,
               loss_normalizing_factor=None):
    self.module, self.optimizer_def = module, optimizer_def
    self.input_vocabulary, self.output_vocabulary = input_vocabulary, output_vocabulary
    self._decode_fn, self._label_smoothing, self._z_loss = decode_fn, label_smoothing, z_loss


class Adafactor:
  """Keeps the hyper-parameters the gins set in `hyper_params`, as T5X's Adafactor does."""

  def __init__(self, learning_rate=None, factored=True, multiply_by_parameter_scale=True,
               beta1=None, decay_rate=0.8, step_offset=0, clipping_threshold=1.0,
               weight_decay_rate=None, min_dim_size_to_factor=128, epsilon1=1e-30,
               epsilon2=1e-3, dtype_momentum=jnp.float32, factor_map=None,
               logical_factor_rules=None, weight_decay_rate_lr_exponent=None,
               global_norm_clip_threshold=None, max_parameter_scale=None,
               skip_nan_updates=False):
    self.hyper_params = types.SimpleNamespace(decay_rate=decay_rate, step_offset=step_offset,
                                              logical_factor_rules=logical_factor_rules)


def temperature_sample(inputs, cache, tokens_to_logits, eos_id, decode_rng=None,
                       num_decodes=1, temperature=1.0, topk=1, topp=0.0, cache_offset=0,
                       initial_index=None, max_decode_steps=None, max_decode_steps_hard_limit=None,
                       rescale_log_probs=True, state_callback_fn=None, logit_callback_fn=None):
  raise NotImplementedError('stand-in: only its gin parameters are used')


class PjitPartitioner:
  def __init__(self, num_partitions=None, model_parallel_submesh=None, params_on_devices=True,
               backend=None, ici_mesh_shape=None, dcn_mesh_shape=None,
               logical_axis_rules=None, use_cpu_pjit=False):
    self._num_partitions, self._logical_axis_rules = num_partitions, logical_axis_rules


def standard_logical_axis_rules(activation_partitioning_dims=1, parameter_partitioning_dims=1,
                                additional_rules=None):
  """T5X's 1-D rules (partitioning.py), additional rules appended after them."""
  return [('batch', 'data'), ('vocab', 'model'), ('embed', None), ('mlp', 'model'),
          ('heads', 'model'), ('kv', None), ('joined_kv', 'model'), ('relpos_buckets', None),
          ('length', None)] + list(additional_rules or [])


def _stand_in_t5x() -> dict:
  package = types.ModuleType('t5x')
  package.__path__ = []
  modules = {'t5x': package}
  for name, members in {
      'models': [EncoderDecoderModel], 'adafactor': [Adafactor],
      'decoding': [temperature_sample],
      'partitioning': [PjitPartitioner, standard_logical_axis_rules]}.items():
    module = types.ModuleType(f't5x.{name}')
    for member in members:
      setattr(module, member.__name__, member)
    setattr(package, name, module)
    modules[f't5x.{name}'] = module
  return modules


@pytest.fixture
def t5x_modules(monkeypatch):
  """Real T5X when installed, else the stand-ins in sys.modules for this test only."""
  if not HAVE_T5X:
    for name, module in _stand_in_t5x().items():
      monkeypatch.setitem(sys.modules, name, module)
  yield
  gin.clear_config()


def bind(*files, bindings=()):
  """Parses gin files the way t5x.train does (our gin_configs on the search path)."""
  gin.clear_config()
  gin.add_config_file_search_path(str(gqa_t5x.GIN_CONFIGS_DIR))
  gin.parse_config_files_and_bindings(list(files), list(bindings))


def bound_model():
  return gin.get_configurable('gqa_t5x.t5x_models.EncoderDecoderModel')()


def vocabulary_file(size: str) -> str:
  """T5's SentencePiece model; the embedded tasks' own for the tiny model."""
  from gqa_t5x.tasks import vocab
  return vocab.embedded_sentencepiece_model() if size == 'tiny' else vocab.T5_SENTENCEPIECE_MODEL


def axis_names(params_axes) -> set:
  leaves = jax.tree.leaves(params_axes, is_leaf=lambda x: hasattr(x, 'names'))
  return {name for leaf in leaves for name in leaf.names}


# ----------------------------- the model part, always --------------------------------------
@pytest.mark.parametrize('size', SIZES)
def test_every_size_and_kind_binds_gqa_network_into_t5x_model(t5x_modules, size):
  emb, heads, layers, mlp, head_dim, vocab_size = SIZES[size]
  for kind, kv_heads in KINDS.items():
    g = kv_heads(heads)
    if heads % g:
      continue  # GQA-8 needs a multiple of 8 heads (not Small's 6 or Base's 12)
    bind(f't5x/t5_1_1/{size}.gin', f'models/attention/{kind}.gin')
    model = bound_model()
    cfg = model.module.config
    assert isinstance(model.module, Transformer)
    assert (cfg.emb_dim, cfg.num_heads, cfg.num_encoder_layers, cfg.num_decoder_layers,
            cfg.mlp_dim, cfg.head_dim, cfg.vocab_size) == (emb, heads, layers, layers, mlp,
                                                           head_dim, vocab_size)
    assert cfg.kv_head_counts == (heads, g, g), kind  # encoder stays MHA (the paper)
    vocabularies = (model.input_vocabulary, model.output_vocabulary)
    assert {v.sentencepiece_model_file for v in vocabularies} == {vocabulary_file(size)}
    assert {v.extra_ids for v in vocabularies} == {100}
    assert (model._z_loss, model._label_smoothing) == (1e-4, 0.0)
    optimizer = model.optimizer_def.hyper_params
    assert (optimizer.decay_rate, optimizer.step_offset) == (0.8, 0)
  assert gin.query_parameter('t5x.decoding.temperature_sample.temperature') == 0.0  # greedy, as the paper


@pytest.mark.parametrize('size', SIZES)
def test_adafactor_has_a_factor_rule_for_every_parameter_axis(t5x_modules, size):
  """T5X's Adafactor raises KeyError for an axis name without a rule; kv kernels factor as
  T5X's query kernels do (row = embed, column = heads x head_dim)."""
  bind(f't5x/t5_1_1/{size}.gin', bindings=['NUM_KV_HEADS = 2'])  # 2 divides every size's heads
  model = bound_model()
  tokens = jnp.ones((1, 4), jnp.int32)
  variables = jax.eval_shape(lambda: model.module.init(jax.random.key(0), tokens, tokens,
                                                       tokens, enable_dropout=False))
  rules = dict(model.optimizer_def.hyper_params.logical_factor_rules)
  assert axis_names(variables['params_axes']) <= set(rules)
  assert {rules['embed'], rules['joined_kv_heads']} == {'row', 'column'}
  assert rules['joined_kv_heads'] == rules['joined_kv'] == 'column'
  key = variables['params']['decoder']['layers_0']['self_attention']['key']['kernel']
  emb, head_dim = SIZES[size][0], SIZES[size][4]
  assert key.shape == (emb, 2 * head_dim)


def test_tiny_t5x_model_runs_and_gqa_equals_mha_with_repeated_kv_heads(t5x_modules):
  """The bound GQA-2 network, run forward, against the bound MHA network whose kv heads are
  the GQA heads each repeated H/G times (what GQA means), so a wrong binding cannot hide."""
  bind('t5x/t5_1_1/tiny.gin', bindings=['NUM_KV_HEADS = 2'])
  gqa = bound_model().module
  bind('t5x/t5_1_1/tiny.gin', 'models/attention/mha.gin')
  mha = bound_model().module
  rng = np.random.default_rng(0)
  enc = jnp.asarray(rng.integers(2, 1152, (2, 12)), jnp.int32)
  dec_target = jnp.asarray(rng.integers(2, 1152, (2, 6)), jnp.int32)
  dec_input = jnp.pad(dec_target[:, :-1], ((0, 0), (1, 0)))
  params = jax.jit(lambda: gqa.init(jax.random.key(1), enc, dec_input, dec_target,
                                    enable_dropout=False)['params'])()

  def repeat_heads(path, x):
    names = [p.key for p in path]
    if names[-2] in ('key', 'value') and names[-3] != 'attention':  # decoder attention only
      return np.repeat(np.asarray(x).reshape(x.shape[0], 2, 16), 4, axis=1).reshape(-1, 128)
    return x
  mha_params = jax.tree_util.tree_map_with_path(repeat_heads, params)
  run = jax.jit(lambda module, p: module.apply({'params': p}, enc, dec_input, dec_target,
                                               enable_dropout=False), static_argnums=0)
  logits, expected = run(gqa, params), run(mha, mha_params)
  assert logits.shape == (2, 6, 1152)
  np.testing.assert_allclose(logits, expected, atol=2e-5, rtol=1e-5)


@pytest.mark.parametrize('num_kv_heads, num_partitions, kv_axis', [
    (1, 2, None),       # MQA: one kv head cannot be split
    (2, 2, 'model'),    # GQA-2 on a 2-way model axis
    (2, 4, None),       # GQA-2 on a 4-way model axis
    (8, 4, 'model'),    # MHA (8 kv heads) on 4
])
def test_partitioning_gin_replicates_kv_heads_unless_every_g_divides_model_axis(
    t5x_modules, num_kv_heads, num_partitions, kv_axis):
  bind('t5x/t5_1_1/tiny.gin', 't5x/runs/partitioning.gin',
       bindings=[f'NUM_KV_HEADS = {num_kv_heads}', f'NUM_PARTITIONS = {num_partitions}'])
  partitioner = gin.get_configurable('t5x.partitioning.PjitPartitioner')()
  assert partitioner._num_partitions == num_partitions
  rules = gin.get_configurable('t5x.partitioning.standard_logical_axis_rules')()

  def mesh_axis(name):  # flax uses the first rule for a name
    return next(axis for logical, axis in rules if logical == name)
  assert (mesh_axis('kv_heads'), mesh_axis('joined_kv_heads')) == (kv_axis, kv_axis)
  assert (mesh_axis('heads'), mesh_axis('joined_kv')) == ('model', 'model')


# ----------------------------- real T5X on CPU ----------------------------------------------
TINY_LENGTHS = "{'inputs': 64, 'targets': 16}"
SUMMARY_TASK = 'gqa_embedded_lead_summary'
START_STEP = 100


def pooled_reference(mha_params: dict, num_kv_heads: int) -> dict:
  """The paper's conversion by hand: mean of each contiguous group of kv heads (head_dim 16)."""
  out = {}
  for name, x in mha_params.items():
    if name.startswith('decoder/') and name.split('/')[-2] in ('key', 'value'):
      emb, cols = x.shape
      x = x.reshape(emb, num_kv_heads, cols // 16 // num_kv_heads, 16).mean(axis=2)
      x = x.reshape(emb, -1)
    out[name] = x
  return out


@pytest.fixture(scope='module')
def t5x_runs(tmp_path_factory):
  """Converted GQA-2/MQA checkpoints of one random tiny MHA model, and a T5X runner."""
  pytest.importorskip('t5x', reason='T5X is not installed (see README: Running with T5X)')
  root = tmp_path_factory.mktemp('t5x')
  environment = runner_helpers.env(str(root / 'cache'), num_devices=2)
  params = runner_helpers.tiny_params(8)
  source = str(root / 'mha' / f'checkpoint_{START_STEP}')
  runner_helpers.save_params_checkpoint(source, params, step=START_STEP)
  for name, g in (('gqa2', 2), ('mqa', 1)):
    log = str(root / f'convert_{name}.log')
    runner_helpers.wait(runner_helpers.start('gqa_t5x.convert', [
        f'--input={source}', f'--output={root / name / f"checkpoint_{START_STEP}"}',
        f'--num_kv_heads={g}', '--head_dim=16'], environment, log), log)

  def run(module: str, run_gin: str, num_kv_heads: int, log_name: str, extra_gin_files=(),
          **macros):
    flags = ([f'--gin_search_paths={gqa_t5x.GIN_CONFIGS_DIR}', '--gin_file=t5x/t5_1_1/tiny.gin',
              f'--gin_file=t5x/runs/{run_gin}', *[f'--gin_file={f}' for f in extra_gin_files],
              f'--gin.NUM_KV_HEADS={num_kv_heads}',
              f'--gin.TASK_FEATURE_LENGTHS={TINY_LENGTHS}']
             + [f'--gin.{k}={v}' for k, v in macros.items()])
    log = str(root / f'{log_name}.log')
    runner_helpers.wait(runner_helpers.start(module, flags, environment, log), log, timeout=600)
  return types.SimpleNamespace(root=root, mha=runner_helpers.flatten(params), run=run,
                               environment=environment)


def partition_specs(model_info: str) -> dict:
  """T5X's model-info.txt: 'Variable NAME size N shape (...) partition spec SPEC' per line."""
  specs = {}
  for line in open(model_info):
    if line.startswith('Variable ') and 'partition spec' in line:
      specs[line.split()[1]] = line.split('partition spec', 1)[1].strip()
  return specs


@pytest.fixture(scope='module')
def uptrained(t5x_runs):
  """t5x.train with t5x/runs/uptrain.gin: GQA-2 from its converted checkpoint, 2 steps, kv
  heads sharded over a 2-way model axis."""
  model_dir = t5x_runs.root / 'uptrain'
  t5x_runs.run('t5x.train', 'uptrain.gin', 2, 'uptrain', NUM_PARTITIONS=2, BATCH_SIZE=8,
               MIXTURE_OR_TASK_NAME='"gqa_embedded_span_corruption"',
               INITIAL_CHECKPOINT_PATH=f'"{t5x_runs.root}/gqa2/checkpoint_{START_STEP}"',
               TRAIN_STEPS=START_STEP + 2, MODEL_DIR=f'"{model_dir}"',
               **{'train.eval_steps': 1})
  return model_dir


def test_t5x_uptrain_restores_converted_params_then_trains(t5x_runs, uptrained):
  restored = runner_helpers.read_params(str(uptrained / f'checkpoint_{START_STEP}'))
  expected = pooled_reference(t5x_runs.mha, 2)
  assert set(restored) == set(expected)
  for name, value in expected.items():
    np.testing.assert_allclose(restored[name], value, rtol=1e-6, atol=1e-7, err_msg=name)
  trained = runner_helpers.read_params(str(uptrained / f'checkpoint_{START_STEP + 2}'))
  key = 'decoder/layers_0/self_attention/key/kernel'
  assert trained[key].shape == (128, 32)
  change = np.abs(trained[key] - restored[key]).max()
  assert 0 < change < 0.1 * np.abs(restored[key]).max()
  specs = partition_specs(uptrained / 'model-info.txt')
  assert specs[f'decoder/layers_0/self_attention/{"key"}/kernel'] == "(None, 'model')"
  assert specs['decoder/layers_1/encoder_decoder_attention/value/kernel'] == "(None, 'model')"


def test_t5x_finetune_mqa_replicates_kv_kernels_and_scores_rouge(t5x_runs):
  """t5x/runs/finetune.gin: MQA (G = 1 does not divide the 2-way model axis) trains with kv
  kernels replicated and query kernels sharded; T5X's in-training evaluation scores ROUGE."""
  model_dir = t5x_runs.root / 'finetune_mqa'
  t5x_runs.run('t5x.train', 'finetune.gin', 1, 'finetune', NUM_PARTITIONS=2, BATCH_SIZE=8,
               MIXTURE_OR_TASK_NAME=f'"{SUMMARY_TASK}"', EVALUATOR_NUM_EXAMPLES=8,
               INITIAL_CHECKPOINT_PATH=f'"{t5x_runs.root}/mqa/checkpoint_{START_STEP}"',
               TRAIN_STEPS=START_STEP + 2, MODEL_DIR=f'"{model_dir}"',
               **{'train.eval_steps': 1})
  specs = partition_specs(model_dir / 'model-info.txt')
  for layer in ('layers_0', 'layers_1'):
    for attention in ('self_attention', 'encoder_decoder_attention'):
      assert specs[f'decoder/{layer}/{attention}/key/kernel'] == '(None, None)'
      assert specs[f'decoder/{layer}/{attention}/query/kernel'] == "(None, 'model')"
  trained = runner_helpers.read_params(str(model_dir / f'checkpoint_{START_STEP + 2}'))
  assert trained['decoder/layers_0/self_attention/value/kernel'].shape == (128, 16)
  metrics = [json.loads(line) for line in
             open(model_dir / 'inference_eval' / f'{SUMMARY_TASK}-metrics.jsonl')]
  assert metrics[-1]['step'] == START_STEP + 2
  assert {'rouge1', 'rouge2', 'rougeLsum'} <= set(metrics[-1])


def test_t5x_eval_and_infer_decode_greedily_under_gqa_network(t5x_runs, uptrained, tmp_path,
                                                              monkeypatch):
  """t5x.eval scores the uptrained checkpoint; every token t5x.infer emits is the argmax of
  gqa_t5x's network, teacher-forced on T5X's own output (so T5X's decoding loop, cache and
  greedy setting are checked by an independent forward pass)."""
  checkpoint = uptrained / f'checkpoint_{START_STEP + 2}'
  eval_dir, infer_dir = t5x_runs.root / 'eval', t5x_runs.root / 'infer'
  t5x_runs.run('t5x.eval', 'eval.gin', 2, 'eval', MIXTURE_OR_TASK_NAME=f'"{SUMMARY_TASK}"',
               CHECKPOINT_PATH=f'"{checkpoint}"', EVAL_OUTPUT_DIR=f'"{eval_dir}"')
  metrics = json.loads(open(eval_dir / 'inference_eval' / f'{SUMMARY_TASK}-metrics.jsonl')
                       .readlines()[-1])
  assert metrics['step'] == START_STEP + 2 and 0 <= metrics['rouge1'] <= 100

  output_ids = tmp_path / 'output_ids.gin'  # T5X's infer writes token ids when asked to
  output_ids.write_text('from __gin__ import dynamic_registration\n'
                        'import __main__ as infer_script\n'
                        'infer_script.infer.write_fn = @infer_script.write_inferences_to_file\n'
                        'infer_script.write_inferences_to_file.output_ids = True\n')
  t5x_runs.run('t5x.infer', 'infer.gin', 2, 'infer', MIXTURE_OR_TASK_NAME=f'"{SUMMARY_TASK}"',
               CHECKPOINT_PATH=f'"{checkpoint}"', INFER_OUTPUT_DIR=f'"{infer_dir}"',
               extra_gin_files=[str(output_ids)])
  rows = [json.loads(line) for line in
          open(infer_dir / f'{SUMMARY_TASK}-predict.jsonl-00000-of-00001')]

  import seqio
  from gqa_t5x import tasks  # noqa: F401  (registers the task)
  from gqa_t5x.network import T5Config
  monkeypatch.setenv('GQA_T5X_CACHE_DIR', t5x_runs.environment['GQA_T5X_CACHE_DIR'])
  task = seqio.get_mixture_or_task(SUMMARY_TASK)
  examples = list(task.get_dataset({'inputs': 64, 'targets': 16}, split='validation',
                                   shuffle=False).as_numpy_iterator())
  assert [r['inputs']['inputs_pretokenized'] for r in rows] == [
      e['inputs_pretokenized'].decode() for e in examples]
  inputs = np.stack([np.pad(e['inputs'], (0, 64 - len(e['inputs']))) for e in examples])
  targets = np.stack([np.pad(r['prediction_tokens'], (0, 16 - len(r['prediction_tokens'])))
                      for r in rows]).astype(np.int32)
  decoder_inputs = np.pad(targets[:, :-1], ((0, 0), (1, 0)))
  # infer.gin restores in bfloat16 (T5X's inference default); activations stay float32.
  params = jax.tree.map(lambda x: jnp.asarray(x, jnp.bfloat16).astype(jnp.float32),
                        unflatten(runner_helpers.read_params(str(checkpoint))))
  model = Transformer(T5Config(vocab_size=1152, emb_dim=128, num_heads=8, num_encoder_layers=2,
                               num_decoder_layers=2, head_dim=16, mlp_dim=256,
                               num_decoder_self_kv_heads=2, num_decoder_cross_kv_heads=2))
  logits = np.asarray(jax.jit(lambda p: model.apply(
      {'params': p}, inputs, decoder_inputs, targets, enable_dropout=False))(params))
  chosen = np.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
  emitted = targets > 0
  assert emitted.sum() > len(rows)  # T5X decoded something for every example
  margin = logits.max(axis=-1) - chosen  # 0 where T5X took the argmax
  assert margin[emitted].max() < 1e-4 * np.abs(logits).max()


@pytest.mark.skipif(not HAVE_T5X, reason='T5X is not installed (see README: Running with T5X)')
def test_t5x_path_greedy_decode_equals_greedy_decode_token_for_token(t5x_modules):
  """The model gin_configs/t5x binds (cross-attention caches filled once, before T5X's
  temperature_sample loop at temperature 0) decodes what gqa_t5x.decoding.greedy_decode does,
  on padded inputs and on rows whose EOS comes early."""
  from gqa_t5x import decoding, t5x_models
  bind('t5x/t5_1_1/tiny.gin', bindings=['NUM_KV_HEADS = 2'])
  model = bound_model()
  assert isinstance(model, t5x_models.EncoderDecoderModel)
  params = runner_helpers.tiny_params(2, seed=3)
  rng = np.random.default_rng(0)
  inputs = rng.integers(2, 1152, (4, 24)).astype(np.int32)
  inputs[1, 10:] = inputs[3, 17:] = 0
  # EOS (id 1) takes the place of the token row 0 emits 4th (its logits, scaled up), so that
  # rows end early and the padding after EOS is compared too.
  token = int(decoding.greedy_decode(model.module, params, inputs, 16)[0, 3])
  kernel = params['decoder']['logits_dense']['kernel']
  params['decoder']['logits_dense']['kernel'] = kernel.at[:, 1].set(1.5 * kernel[:, token])
  expected = np.asarray(decoding.greedy_decode(model.module, params, inputs, 16))
  assert expected[0, 3] == 1 and expected[0, 4:].max() == 0  # row 0 ends early
  batch = {'encoder_input_tokens': inputs, 'decoder_input_tokens': np.zeros((4, 16), np.int32)}
  np.testing.assert_array_equal(jax.jit(model.predict_batch)(params, batch), expected)
