"""Training: losses and optimizer against hand-computed references; the gin-configured run on a
2x4 mesh of 8 CPU devices; a killed run resumed equals an uninterrupted run; clear errors."""
import json
import os
import signal
import subprocess
import sys
import time

import gin
import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P
import numpy as np
import pytest
import seqio
import tensorflow as tf

from gqa_t5x import data, errors, gin_utils, losses, optimizers, partitioning, runs
from gqa_t5x import trainer as trainer_lib
from gqa_t5x.network import T5Config, Transformer
from tests import runner_helpers as helpers


def test_cross_entropy_with_z_loss_and_label_smoothing_matches_numpy():
  rng = np.random.default_rng(0)
  logits = rng.normal(size=(2, 3, 5)).astype(np.float32)
  targets = np.array([[1, 4, 0], [2, 2, 3]])
  weights = np.array([[1, 1, 0], [1, 0, 1]], np.float32)
  z, ls, v = 1e-4, 0.1, 5
  log_z = np.log(np.exp(logits).sum(-1))
  soft = np.full((2, 3, v), ls / (v - 1))
  np.put_along_axis(soft, targets[..., None], 1 - ls, axis=-1)
  entropy = -((1 - ls) * np.log(1 - ls) + ls * np.log(ls / (v - 1)))
  token_loss = -(soft * (logits - log_z[..., None])).sum(-1) + z * log_z ** 2 - entropy
  got = losses.compute_weighted_loss(jnp.asarray(logits), jnp.asarray(targets),
                                     jnp.asarray(weights), z_loss=z, label_smoothing=ls)
  np.testing.assert_allclose(got['loss'], (token_loss * weights).sum(), rtol=1e-5)
  np.testing.assert_allclose(got['z_loss'], (z * log_z ** 2 * weights).sum(), rtol=1e-5)
  assert got['num_tokens'] == 4
  accuracy = ((logits.argmax(-1) == targets) * weights).sum() / 4
  np.testing.assert_allclose(got['accuracy'], accuracy)


def test_rsqrt_schedule_is_flat_during_warmup_then_decays():
  schedule = optimizers.rsqrt_schedule(base_learning_rate=1.0, warmup_steps=10_000)
  np.testing.assert_allclose([schedule(0), schedule(9_999), schedule(40_000)],
                             [0.01, 0.01, 0.005], rtol=1e-6)


def test_adafactor_first_step_is_sign_times_parameter_rms():
  # Step 1: decay 1 - 1^-0.8 = 0, so v = g^2 and g / sqrt(v) = sign(g) (block RMS 1, no clip);
  # T5.1.1 scales by max(rms(param), 1e-3) and the learning rate.
  params = {'w': jnp.array([[3.0, -4.0], [0.0, 5.0]])}
  grads = {'w': jnp.array([[0.5, -2.0], [1.0, -0.1]])}
  tx = optimizers.adafactor(optimizers.constant_schedule(0.1))
  updates, _ = tx.update(grads, tx.init(params), params)
  rms = np.sqrt(np.mean(np.square(params['w'])))
  np.testing.assert_allclose(updates['w'], -0.1 * rms * np.sign(grads['w']), rtol=1e-5)


def test_fresh_optimizer_state_from_a_checkpoint_step_continues_the_schedule():
  # Uptraining from T5.1.1's step 1M must run at 1/sqrt(1M) = 1e-3, not at the warm-up's 1e-2.
  # A fresh second moment then gives update = -lr * sign(g) * rms(param) (clipped to RMS 1).
  model = Transformer(T5Config(vocab_size=8, emb_dim=4, num_heads=2, num_encoder_layers=1,
                               num_decoder_layers=1, head_dim=2, mlp_dim=4))
  tx = optimizers.adafactor(optimizers.rsqrt_schedule())
  trainer = trainer_lib.Trainer(model, tx, partitioning.Partitioner(num_partitions=1))
  state = trainer.init_state(seed=0, step=1_000_000)
  grads = jax.tree.map(lambda p: jnp.where(jnp.arange(p.size).reshape(p.shape) % 2, 1., -1.),
                       state.params)
  updates, _ = tx.update(grads, state.opt_state, state.params)
  scale = state.params['decoder']['decoder_norm']['scale']  # ones: rms 1
  np.testing.assert_allclose(updates['decoder']['decoder_norm']['scale'],
                             -1e-3 * np.sign(grads['decoder']['decoder_norm']['scale']) *
                             np.sqrt(np.mean(np.square(scale))), rtol=1e-4)


def _train(tmp_path_factory, model_dir, **macros):
  """One gin-configured training run in this process (8 CPU devices from conftest)."""
  cache = str(tmp_path_factory.getbasetemp() / 'cache')
  os.environ['GQA_T5X_CACHE_DIR'] = os.path.join(cache, 'vocab')
  jax.config.update('jax_compilation_cache_dir', os.path.join(cache, 'xla'))
  jax.config.update('jax_persistent_cache_min_compile_time_secs', 0)
  gin_files, bindings = [], []
  for flag in gin_utils.rewrite_gin_args(helpers.tiny_train_flags(model_dir, **macros)):
    name, value = flag[2:].split('=', 1)
    (gin_files if name == 'gin_file' else bindings).append(value)
  gin_utils.parse_gin(gin_files, bindings, gin_utils.DEFAULT_SEARCH_PATHS)
  return gin.get_configurable(runs.train)()


def _metrics(model_dir):
  with open(os.path.join(model_dir, 'train', 'metrics.jsonl')) as f:
    return [json.loads(line) for line in f]


@pytest.fixture(scope='module')
def uninterrupted(tmp_path_factory):
  model_dir = str(tmp_path_factory.mktemp('uninterrupted'))
  state = _train(tmp_path_factory, model_dir, TRAIN_STEPS=12, SAVING_PERIOD=4,
                 NUM_PARTITIONS=4)
  return model_dir, state


def test_tiny_model_trains_on_2x4_mesh_and_loss_drops(uninterrupted):
  model_dir, state = uninterrupted
  assert jax.device_count() == 8
  # kv heads (2) do not divide the 4-way model axis: key kernels replicated, queries sharded.
  query = state.params['decoder']['layers_0']['self_attention']['query']['kernel']
  key = state.params['decoder']['layers_0']['self_attention']['key']['kernel']
  assert query.sharding.mesh.shape == {'data': 2, 'model': 4}
  assert query.sharding.spec == P(None, 'model') and key.sharding.is_fully_replicated
  rows = _metrics(model_dir)
  assert [r['step'] for r in rows] == [2, 4, 6, 8, 10, 12]
  assert rows[-1]['loss'] < 0.8 * rows[0]['loss'], rows
  for name in ('timing/steps_per_second', 'timing/target_tokens_per_second',
               'timing/eta_seconds', 'learning_rate', 'z_loss', 'accuracy'):
    assert name in rows[-1]
  assert rows[0]['learning_rate'] == pytest.approx(0.1)  # 1 / sqrt(WARMUP_STEPS=100)
  assert sorted(os.listdir(model_dir)) == ['checkpoint_1', 'checkpoint_12', 'checkpoint_4',
                                           'checkpoint_8', 'train']


def _committed_steps(model_dir):
  return sorted(int(name.split('_')[1]) for name in os.listdir(model_dir)
                if name.startswith('checkpoint_') and name.split('_')[1].isdigit())


def test_killed_run_resumes_from_its_saved_data_position_to_the_same_parameters(
    uninterrupted, tmp_path_factory):
  """SIGKILL as soon as the first periodic checkpoint is committed (mid-training), then the same
  command: the run continues from the newest checkpoint with its input pipeline state read from
  that checkpoint (not replayed) and ends at the uninterrupted run's parameters."""
  model_dir = str(tmp_path_factory.mktemp('resumed'))
  environment = helpers.env(str(tmp_path_factory.getbasetemp() / 'cache'), num_devices=8)
  flags = helpers.tiny_train_flags(model_dir, TRAIN_STEPS=12, SAVING_PERIOD=4, NUM_PARTITIONS=4)
  log = os.path.join(model_dir, 'killed.log')
  process = helpers.start('gqa_t5x.train', flags, environment, log)
  while not [s for s in _committed_steps(model_dir) if s >= 4] and process.poll() is None:
    time.sleep(0.02)
  process.send_signal(signal.SIGKILL)
  assert process.wait(timeout=60) == -signal.SIGKILL, open(log).read()[-3000:]
  resumed_at = max(_committed_steps(model_dir))
  assert 4 <= resumed_at < 12
  # What a kill during an asynchronous save leaves behind: an uncommitted temporary directory.
  os.makedirs(os.path.join(model_dir, f'checkpoint_{resumed_at + 1}.orbax-checkpoint-tmp',
                           'state'), exist_ok=True)
  log = os.path.join(model_dir, 'resumed.log')
  helpers.wait(helpers.start('gqa_t5x.train', flags, environment, log), log)
  output = open(log).read()
  assert f'Resumed from {model_dir} at step {resumed_at}' in output
  # The position comes from the checkpoint's iterator state, whose counter only ever advances
  # by batches drawn (a replay to the position would have to draw them again).
  assert (f'Input pipeline of process 0 restored at batch {resumed_at} of data shard 0/1'
          in output)
  stored = tf.train.load_checkpoint(os.path.join(
      model_dir, 'checkpoint_12', 'dataset', 'process_0-of-1', 'iterator'))
  assert stored.get_tensor('position/.ATTRIBUTES/VARIABLE_VALUE') == 12
  expected = helpers.read_params(os.path.join(uninterrupted[0], 'checkpoint_12'))
  got = helpers.read_params(os.path.join(model_dir, 'checkpoint_12'))
  assert expected.keys() == got.keys()
  for name in expected:
    np.testing.assert_allclose(got[name], expected[name], rtol=2e-4, atol=1e-5, err_msg=name)


def test_pipeline_state_of_another_data_shard_is_a_clear_error(tmp_path_factory, tmp_path):
  os.environ['GQA_T5X_CACHE_DIR'] = str(tmp_path_factory.getbasetemp() / 'cache' / 'vocab')
  cfg = data.DatasetConfig('gqa_embedded_span_corruption', {'inputs': 32, 'targets': 16},
                           split='train', batch_size=8, seed=0, module='gqa_t5x.tasks')
  saved = data.train_batches(cfg, seqio.ShardInfo(0, 2))
  next(saved)
  saved.save(str(tmp_path / 'iterator'))
  with pytest.raises(errors.ConfigError, match=(
      r'belongs to data shard 0 of 2, but this process feeds shard 1 of 2: resume with the mesh '
      r'\(NUM_PARTITIONS\) and number of processes the run was started with')):
    data.train_batches(cfg, seqio.ShardInfo(1, 2)).restore(str(tmp_path / 'iterator'))


def test_checkpoint_with_other_kv_heads_names_the_parameter(uninterrupted, tmp_path_factory):
  """GQA-2 run checkpoint into an MHA model, and an MHA (converter-layout) one into GQA-2."""
  with pytest.raises(errors.ConfigError, match=(
      r'stores target/decoder/layers_0/encoder_decoder_attention/key/kernel with shape '
      r'\(128, 32\) but the configured model expects \(128, 128\): convert it first with '
      r'gqa-t5x-convert')):
    _train(tmp_path_factory, str(tmp_path_factory.mktemp('mha')), TRAIN_STEPS=2, NUM_KV_HEADS=8,
           INITIAL_CHECKPOINT_PATH=f'"{uninterrupted[0]}/checkpoint_12"')
  mha_checkpoint = str(tmp_path_factory.mktemp('mha_ckpt') / 'checkpoint_0')
  helpers.save_params_checkpoint(mha_checkpoint, helpers.tiny_params(num_kv_heads=8))
  with pytest.raises(errors.ConfigError, match=r'with shape \(128, 128\) but the configured model '
                     r'expects \(128, 32\): convert it first with gqa-t5x-convert'):
    _train(tmp_path_factory, str(tmp_path_factory.mktemp('gqa')), TRAIN_STEPS=2,
           INITIAL_CHECKPOINT_PATH=f'"{mha_checkpoint}"')


def test_missing_initial_checkpoint_is_a_clear_error(tmp_path_factory, tmp_path):
  with pytest.raises(errors.ConfigError, match=r"INITIAL_CHECKPOINT_PATH='/nonexistent/ckpt' is "
                     r'not an Orbax checkpoint.*gqa-t5x-convert'):
    _train(tmp_path_factory, str(tmp_path), TRAIN_STEPS=2,
           INITIAL_CHECKPOINT_PATH='"/nonexistent/ckpt"')


def test_unknown_macro_is_a_clear_error(tmp_path):
  flags = helpers.tiny_train_flags(str(tmp_path), TRAIN_STEPS=2, TRAIN_STESP=3)
  bindings = [f[len('--gin_bindings='):] for f in gin_utils.rewrite_gin_args(flags)
              if f.startswith('--gin_bindings')]
  with pytest.raises(errors.ConfigError, match=r'Unknown gin macro TRAIN_STESP.*TRAIN_STEPS'):
    gin_utils.parse_gin(['models/t5_1_1/tiny.gin', 'runs/pretrain.gin'], bindings)


def test_missing_required_macro_fails_in_one_line_from_the_command_line(tmp_path):
  flags = [f for f in helpers.tiny_train_flags(str(tmp_path)) if 'MODEL_DIR' not in f]
  result = subprocess.run([sys.executable, '-m', 'gqa_t5x.train', *flags, '--gin.TRAIN_STEPS=2'],
                          cwd=helpers.REPO, capture_output=True, text=True, timeout=120,
                          env=dict(os.environ, JAX_PLATFORMS='cpu'))
  assert result.returncode == 1
  assert result.stderr.strip().splitlines()[-1] == (
      'Error: Missing required gin macro MODEL_DIR: pass --gin.MODEL_DIR=... '
      '(strings need quotes, e.g. --gin.MODEL_DIR=\\"/tmp/run\\").')
  assert 'Traceback' not in result.stderr
