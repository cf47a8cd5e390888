"""Shared by the runner tests: the tiny run's command line, subprocess launch, checkpoint reads."""
import os
import subprocess
import sys

import numpy as np
import orbax.checkpoint as ocp

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY_LENGTHS = "{'inputs': 32, 'targets': 16}"


def tiny_train_flags(model_dir: str, task: str = 'gqa_embedded_span_corruption', **macros) -> list:
  """gin flags of a tiny GQA (2 kv heads for 8 query heads) model on an embedded task."""
  settings = dict(MIXTURE_OR_TASK_NAME=f'"{task}"', TASK_FEATURE_LENGTHS=TINY_LENGTHS,
                  MODEL_DIR=f'"{model_dir}"', BATCH_SIZE=8, VOCAB_SIZE=1152, NUM_KV_HEADS=2,
                  WARMUP_STEPS=100, LOG_PERIOD=2)
  settings.update(macros)
  return (['--gin_file=models/t5_1_1/tiny.gin', '--gin_file=runs/pretrain.gin']
          + [f'--gin.{k}={v}' for k, v in settings.items()])


def env(cache_dir: str, num_devices: int) -> dict:
  """A subprocess environment with `num_devices` CPU devices and shared caches."""
  return dict(os.environ, XLA_FLAGS=f'--xla_force_host_platform_device_count={num_devices}',
              GQA_T5X_CACHE_DIR=os.path.join(cache_dir, 'vocab'),
              JAX_COMPILATION_CACHE_DIR=os.path.join(cache_dir, 'xla'),
              JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS='0', TF_CPP_MIN_LOG_LEVEL='2',
              JAX_PLATFORMS='cpu')


def start(module: str, flags: list, environment: dict, log_path: str) -> subprocess.Popen:
  log = open(log_path, 'w')
  return subprocess.Popen([sys.executable, '-m', module, *flags], cwd=REPO, env=environment,
                          stdout=log, stderr=subprocess.STDOUT)


def wait(process: subprocess.Popen, log_path: str, timeout: float = 300) -> None:
  if process.wait(timeout=timeout) != 0:
    raise AssertionError(f'{process.args} failed:\n' + open(log_path).read()[-5000:])


def read_params(checkpoint_dir: str) -> dict:
  """'target/...' arrays of a checkpoint_<step>/state/ as numpy, whatever mesh wrote them."""
  directory = os.path.join(checkpoint_dir, 'state')
  checkpointer = ocp.PyTreeCheckpointer()
  tree = checkpointer.metadata(directory).item_metadata.tree
  restore_args = jax_tree_map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), tree)
  restored = checkpointer.restore(directory, args=ocp.args.PyTreeRestore(
      item=None, restore_args=restore_args))
  return flatten(restored['target'])


def tiny_params(num_kv_heads: int, seed: int = 0) -> dict:
  """Random parameters of models/t5_1_1/tiny.gin with VOCAB_SIZE 1152 and G = num_kv_heads."""
  import jax
  from gqa_t5x.network import T5Config, Transformer
  config = T5Config(vocab_size=1152, emb_dim=128, num_heads=8, num_encoder_layers=2,
                    num_decoder_layers=2, head_dim=16, mlp_dim=256, dropout_rate=0.0,
                    num_decoder_self_kv_heads=num_kv_heads,
                    num_decoder_cross_kv_heads=num_kv_heads)
  tokens = np.ones((1, 1), np.int32)
  return Transformer(config).init(jax.random.key(seed), tokens, tokens, tokens,
                                  enable_dropout=False)['params']


def save_params_checkpoint(path: str, params: dict, step: int = 0) -> None:
  """The converter's layout: checkpoint_<step>/state/ = {'target': params, 'state': {'step'}}."""
  ocp.PyTreeCheckpointer().save(os.path.join(path, 'state'),
                                {'target': params, 'state': {'step': np.int32(step)}})


def jax_tree_map(fn, tree):
  import jax
  return jax.tree.map(fn, tree, is_leaf=lambda x: hasattr(x, 'shape'))


def flatten(tree, prefix=''):
  out = {}
  for key, value in tree.items():
    name = f'{prefix}/{key}' if prefix else key
    out.update(flatten(value, name) if isinstance(value, dict) else {name: np.asarray(value)})
  return out
