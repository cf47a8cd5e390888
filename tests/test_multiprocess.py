"""Two processes on localhost (jax.distributed over gloo) train one model through the real
driver, each feeding its own seqio shard, and agree with one process fed the same global batch;
each saves its own input pipeline state with the checkpoint."""
import os
import socket

import numpy as np
import seqio
import tensorflow as tf

from gqa_t5x import data, optimizers
from gqa_t5x.network import T5Config, Transformer
from gqa_t5x.partitioning import Partitioner
from gqa_t5x.trainer import Trainer
from tests import runner_helpers as helpers

STEPS = 3


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    return s.getsockname()[1]


def _single_process_reference(cache_dir: str) -> dict:
  """The same run in this process: the two shards' batches stacked into one global batch."""
  os.environ['GQA_T5X_CACHE_DIR'] = os.path.join(cache_dir, 'vocab')
  config = T5Config(vocab_size=1152, emb_dim=128, num_heads=8, num_encoder_layers=2,
                    num_decoder_layers=2, head_dim=16, mlp_dim=256, dropout_rate=0.0,
                    num_decoder_self_kv_heads=2, num_decoder_cross_kv_heads=2)
  partitioner = Partitioner(num_partitions=1, kv_head_counts=config.kv_head_counts)
  trainer = Trainer(Transformer(config), optimizers.adafactor(optimizers.rsqrt_schedule(1.0, 100)),
                    partitioner, z_loss=1e-4)
  cfg = data.DatasetConfig('gqa_embedded_span_corruption', {'inputs': 32, 'targets': 16},
                           split='train', batch_size=8, seed=0, module='gqa_t5x.tasks')
  shards = [data.train_batches(cfg, seqio.ShardInfo(i, 2)) for i in range(2)]
  state = trainer.init_state(seed=0)
  for _ in range(STEPS):
    halves = [next(shard) for shard in shards]
    batch = {k: np.concatenate([h[k] for h in halves]) for k in halves[0]}
    state, _ = trainer.train_step(state, partitioner.shard_batch(batch))
  return helpers.flatten(state.params)


def test_two_processes_agree_with_one_process_on_the_same_global_batch(tmp_path):
  cache = str(tmp_path / 'cache')
  model_dir = str(tmp_path / 'run')
  port = _free_port()
  flags = helpers.tiny_train_flags(model_dir, TRAIN_STEPS=STEPS, NUM_PARTITIONS=2,
                                   RANDOM_SEED=0, SAVING_PERIOD=100)
  processes = []
  for i in range(2):
    log = str(tmp_path / f'process_{i}.log')
    processes.append((helpers.start('gqa_t5x.train', flags + [
        f'--coordinator_address=127.0.0.1:{port}', '--process_count=2', f'--process_index={i}'],
        helpers.env(cache, num_devices=2), log), log))
  expected = _single_process_reference(cache)
  for process, log in processes:
    helpers.wait(process, log, timeout=400)
  assert 'Mesh {\'data\': 2, \'model\': 2} over 4 devices in 2 processes' in open(
      processes[0][1]).read()
  for i in range(2):
    stored = tf.train.load_checkpoint(os.path.join(
        model_dir, f'checkpoint_{STEPS}', 'dataset', f'process_{i}-of-2', 'iterator'))
    assert stored.get_tensor('position/.ATTRIBUTES/VARIABLE_VALUE') == STEPS
    assert list(stored.get_tensor('shard/.ATTRIBUTES/VARIABLE_VALUE')) == [i, 2]
  got = helpers.read_params(os.path.join(model_dir, f'checkpoint_{STEPS}'))
  assert got.keys() == expected.keys()
  for name in expected:
    np.testing.assert_allclose(got[name], expected[name], rtol=2e-4, atol=1e-5, err_msg=name)
