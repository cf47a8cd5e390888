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
import optax
import orbax.checkpoint as ocp
import pytest
import seqio
import tensorflow as tf

from gqa_t5x import convert, data, errors, gin_utils, losses, optimizers, partitioning, runs
from gqa_t5x import trainer as trainer_lib
from gqa_t5x.network import T5Config, Transformer
from tests import runner_helpers as helpers
from tests.t5x_layout import write_legacy_checkpoint


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


def test_adafactor_is_optax_adafactor_and_a_fresh_slot_decays_as_from_step_0():
  # optax.adafactor (line for line T5X's) is the reference; each parameter here keeps its own
  # step count, so one whose slots start fresh at step 1M runs as optax's would from step 0.
  rng = np.random.default_rng(0)
  params = {'kernel': jnp.asarray(rng.normal(size=(128, 160)), jnp.float32),
            'scale': jnp.asarray(rng.normal(size=(16,)), jnp.float32)}
  grads = [jax.tree.map(lambda p: jnp.asarray(rng.normal(size=p.shape), jnp.float32), params)
           for _ in range(3)]
  ours, reference = optimizers.adafactor(0.01), optax.adafactor(0.01)
  ours_state, reference_state = ours.init(params), reference.init(params)
  ours_state = optax.tree_utils.tree_set(ours_state, count=jnp.asarray(1_000_000))
  reference_state = optax.tree_utils.tree_set(reference_state, count=jnp.asarray(1_000_000))
  fresh = optax.adafactor(0.01)  # the scale's statistics alone, from step 0
  fresh_state = fresh.init({'scale': params['scale']})
  slots = optimizers.slot_states(ours_state)
  assert slots['kernel'].v_row.shape == (128,) and slots['scale'].v.shape == (16,)
  ours_state = optimizers.with_slot_states(
      ours_state, {'scale': slots['scale']._replace(count=jnp.asarray(0))})
  for g in grads:
    ours_update, ours_state = ours.update(g, ours_state, params)
    reference_update, reference_state = reference.update(g, reference_state, params)
    fresh_update, fresh_state = fresh.update({'scale': g['scale']}, fresh_state,
                                             {'scale': params['scale']})
    np.testing.assert_allclose(ours_update['kernel'], reference_update['kernel'], rtol=1e-6)
    np.testing.assert_allclose(ours_update['scale'], fresh_update['scale'], rtol=1e-6)
  # At step 1M the same statistics would barely move from zero: not what was applied.
  assert not np.allclose(ours_update['scale'], reference_update['scale'], rtol=1e-2)


def _packed_batch(rows, seed=0, vocab=64, inputs=8, targets=6):
  """Random packed rows: two segments per row, padding (weight 0) at the end of the targets."""
  rng = np.random.default_rng(seed)
  def segments(length, cut):
    ids = np.where(np.arange(length) < cut, 1, 2)
    positions = np.where(ids == 1, np.arange(length), np.arange(length) - cut)
    return np.tile(ids, (rows, 1)).astype(np.int32), np.tile(positions, (rows, 1)).astype(np.int32)
  targets_ids, target_positions = segments(targets, 3)
  weights = np.ones((rows, targets), np.float32)
  weights[:, -1] = rng.random(rows) < 0.5
  inputs_ids, input_positions = segments(inputs, 5)
  return {'encoder_input_tokens': rng.integers(1, vocab, (rows, inputs), dtype=np.int32),
          'decoder_input_tokens': rng.integers(1, vocab, (rows, targets), dtype=np.int32),
          'decoder_target_tokens': rng.integers(1, vocab, (rows, targets), dtype=np.int32),
          'decoder_loss_weights': weights, 'encoder_segment_ids': inputs_ids,
          'decoder_segment_ids': targets_ids, 'encoder_positions': input_positions,
          'decoder_positions': target_positions}


MICRO_MODEL = T5Config(vocab_size=64, emb_dim=16, num_heads=4, num_encoder_layers=1,
                       num_decoder_layers=1, head_dim=8, mlp_dim=32, dropout_rate=0.0,
                       num_decoder_self_kv_heads=2, num_decoder_cross_kv_heads=2)


@pytest.fixture(scope='module')
def micro_trainer():
  """4 microbatches on the 2x4 mesh, SGD at rate 1: the new parameters are params - gradient."""
  return trainer_lib.Trainer(
      Transformer(MICRO_MODEL), optax.sgd(optax.constant_schedule(1.0)),
      partitioning.Partitioner(num_partitions=4, kv_head_counts=MICRO_MODEL.kv_head_counts),
      loss_normalizing_factor=7.0, num_microbatches=4)


def test_microbatches_on_2x4_mesh_give_the_full_batch_update(micro_trainer):
  trainer, model, batch = micro_trainer, micro_trainer.model, _packed_batch(rows=16)
  state = trainer.init_state(seed=0)
  params = jax.device_get(state.params)  # before train_step donates the state
  new_state, metrics = trainer.train_step(state, trainer.partitioner.shard_batch(batch))

  # Reference: one plain full-batch gradient on one device, SGD with rate 1.
  def loss_fn(p):
    logits = model.apply({'params': p}, batch['encoder_input_tokens'],
                         batch['decoder_input_tokens'], batch['decoder_target_tokens'],
                         encoder_segment_ids=batch['encoder_segment_ids'],
                         decoder_segment_ids=batch['decoder_segment_ids'],
                         encoder_positions=batch['encoder_positions'],
                         decoder_positions=batch['decoder_positions'], enable_dropout=False)
    token_loss, _ = losses.cross_entropy_with_z_loss(logits, batch['decoder_target_tokens'])
    correct = logits.argmax(-1) == batch['decoder_target_tokens']
    weights = batch['decoder_loss_weights']
    return (token_loss * weights).sum() / 7.0, (correct * weights).sum() / weights.sum()

  (want_loss, want_accuracy), grads = jax.jit(jax.value_and_grad(loss_fn, has_aux=True))(params)
  assert trainer.num_microbatches == 4 and trainer.partitioner.data_parallel_size == 2
  np.testing.assert_allclose(metrics['loss'], want_loss, rtol=1e-5)
  np.testing.assert_allclose(metrics['accuracy'], want_accuracy, rtol=1e-6)
  assert metrics['num_tokens'] == batch['decoder_loss_weights'].sum()
  got = jax.device_get(new_state.params)
  flat_got = dict(jax.tree_util.tree_flatten_with_path(got)[0])
  for path, want in jax.tree_util.tree_flatten_with_path(
      jax.tree.map(lambda p, g: p - g, params, grads))[0]:
    np.testing.assert_allclose(flat_got[path], want, rtol=1e-5, atol=1e-6,
                               err_msg=jax.tree_util.keystr(path))
  # The step moved every parameter by far more than the tolerance: a wrong sum would show.
  moved = min(float(np.abs(g).max()) for g in jax.tree.leaves(grads))
  assert moved > 1e-3


def test_batch_that_microbatches_cannot_split_evenly_is_a_clear_error(micro_trainer):
  state = micro_trainer.init_state(seed=0)
  with pytest.raises(errors.ConfigError, match=r'BATCH_SIZE=12 must be a multiple of '
                     r'num_microbatches=4 times the 2 data-parallel shards'):
    micro_trainer.train_step(state, micro_trainer.partitioner.shard_batch(_packed_batch(rows=12)))


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
  assert sorted(os.listdir(model_dir)) == ['checkpoint_12', 'checkpoint_4', 'checkpoint_8',
                                           'train']


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


def _stored_tree(checkpoint_dir):
  """Every array of checkpoint_<step>/state/ by 'a/b/c' name, by stock Orbax restore."""
  directory = os.path.join(checkpoint_dir, 'state')
  checkpointer = ocp.PyTreeCheckpointer()
  tree = checkpointer.metadata(directory).item_metadata.tree
  restored = checkpointer.restore(directory, args=ocp.args.PyTreeRestore(
      item=None, restore_args=helpers.jax_tree_map(
          lambda _: ocp.RestoreArgs(restore_type=np.ndarray), tree)))
  return {'/'.join(str(getattr(k, 'key', getattr(k, 'idx', k))) for k in path): leaf
          for path, leaf in jax.tree_util.tree_flatten_with_path(restored)[0]}


def test_finetune_from_a_run_checkpoint_restores_every_slot_bit_identically(
    uninterrupted, tmp_path_factory):
  checkpoint = os.path.join(uninterrupted[0], 'checkpoint_12')
  # TRAIN_STEPS = the checkpoint's step: the run stops right after building its first state.
  state = _train(tmp_path_factory, str(tmp_path_factory.mktemp('finetune')), TRAIN_STEPS=12,
                 INITIAL_CHECKPOINT_PATH=f'"{checkpoint}"')
  stored = _stored_tree(checkpoint)
  slots = optimizers.slot_states(state.opt_state)
  assert len(slots) == len(jax.tree.leaves(state.params))
  compared = 0
  for name, slot_state in slots.items():
    for field in ('v_row', 'v_col', 'v', 'count'):
      np.testing.assert_array_equal(np.asarray(getattr(slot_state, field)),
                                    stored[f'state/param_states/0/{name}/{field}'],
                                    err_msg=f'{name}/{field}')
      compared += int(np.count_nonzero(getattr(slot_state, field)))
  assert compared > 40_000  # trained statistics, factored and not, of every parameter
  assert int(state.step) == 12


def test_finetune_from_a_converted_checkpoint_starts_fresh_slots_only_for_pooled_kernels(
    tmp_path_factory):
  # An MHA checkpoint in T5X's legacy layout with Adafactor slots of optax's (T5X's) shapes.
  mha = helpers.flatten(helpers.tiny_params(num_kv_heads=8))
  reference_state = optax.adafactor(1.0).init(mha)[0]
  rng = np.random.default_rng(0)
  source_slots = {name: {field: rng.random(getattr(reference_state, field)[name].shape,
                                           dtype=np.float32) for field in ('v_row', 'v_col', 'v')}
                  for name in mha}
  work = tmp_path_factory.mktemp('converted')
  source = str(work / 'mha' / 'checkpoint_1000')
  write_legacy_checkpoint(source, mha.items(), step=1000, slots=source_slots)
  output = str(work / 'gqa' / 'checkpoint_1000')
  record = convert.convert(source, output, {'decoder_self': 2, 'decoder_cross': 2}, head_dim=16)
  pooled = {f'decoder/layers_{i}/{module}/{projection}/kernel' for i in range(2)
            for module in ('self_attention', 'encoder_decoder_attention')
            for projection in ('key', 'value')}
  assert record['optimizer_slots'] == {'carried_for': len(mha) - 8, 'fresh_for': sorted(pooled)}

  state = _train(tmp_path_factory, str(work / 'run'), TRAIN_STEPS=1000,
                 INITIAL_CHECKPOINT_PATH=f'"{output}"')
  slots = optimizers.slot_states(state.opt_state)
  assert slots.keys() == mha.keys()
  for name, slot_state in slots.items():
    for field in ('v_row', 'v_col', 'v'):
      got = np.asarray(getattr(slot_state, field))
      if name in pooled:  # fresh, and decaying as from step 0 (T5X's step_offset)
        assert not got.any(), name
      elif got.shape != (1,):
        np.testing.assert_array_equal(got, source_slots[name][field], err_msg=name)
    assert int(slot_state.count) == (0 if name in pooled else 1000), name


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
  assert result.returncode == 2
  assert result.stderr.strip().splitlines()[-1] == (
      'gqa-t5x-train: error: Missing required gin macro MODEL_DIR: pass --gin.MODEL_DIR=... '
      '(strings need quotes, e.g. --gin.MODEL_DIR=\\"/tmp/run\\").')
  assert 'Traceback' not in result.stderr
