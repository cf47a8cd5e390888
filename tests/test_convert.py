"""gqa-t5x-convert: pooled values, identity at G = H, function preservation, formats, bad input.

Fixtures are written here: T5X's legacy layout by tests/t5x_layout.py (msgpack + tensorstore
zarr, no T5X import) and Orbax checkpoints with stock Orbax. Outputs are read back with stock
Orbax only, and expected values come from plain loops, never from the code under test.
"""
import asyncio
import hashlib
import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import orbax.checkpoint as ocp
import pytest
from absl import flags
from flax import traverse_util

from gqa_t5x import convert
from gqa_t5x.checkpoints import orbax_format
from gqa_t5x.checkpoints.base import CheckpointError, LazyTensor
from gqa_t5x.checkpoints.orbax_format import _ByteBudget
from gqa_t5x.decoding import greedy_decode, init_cache
from gqa_t5x.network import T5Config, Transformer
from tests.t5x_layout import chunk_shape as t5x_chunk_shape, write_legacy_checkpoint

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
E, H, D = 6, 4, 2  # hand-made checkpoint: embed, heads, head dim


def handmade_params(emb=E, heads=H, head_dim=D, kv_heads=None, layers=2, vocab=10,
                    dtype=np.float32, drop=()):
  """A T5.1.1-shaped tree whose key/value kernels hold distinct small integers (exact in bf16)."""
  kv_heads = kv_heads or {}
  rng = np.random.default_rng(0)
  params, counter = {}, 0

  def add(name, shape, integers=False):
    nonlocal counter
    if name in drop:
      return
    size = int(np.prod(shape))
    values = (np.arange(counter, counter + size) % 251 if integers
              else rng.standard_normal(size))
    counter += size
    params[name] = values.reshape(shape).astype(dtype)

  add('token_embedder/embedding', (vocab, emb))
  for stack, modules in (('encoder', {'attention': 'encoder'}),
                         ('decoder', {'self_attention': 'decoder_self',
                                      'encoder_decoder_attention': 'decoder_cross'})):
    add(f'{stack}/relpos_bias/rel_embedding', (heads, 32))
    for i in range(layers):
      for module, kind in modules.items():
        kv = kv_heads.get(kind, heads) * head_dim
        prefix = f'{stack}/layers_{i}/{module}'
        add(f'{prefix}/query/kernel', (emb, heads * head_dim))
        add(f'{prefix}/key/kernel', (emb, kv), integers=True)
        add(f'{prefix}/value/kernel', (emb, kv), integers=True)
        add(f'{prefix}/out/kernel', (heads * head_dim, emb))
      add(f'{stack}/layers_{i}/pre_mlp_layer_norm/scale', (emb,))
      add(f'{stack}/layers_{i}/mlp/wi_0/kernel', (emb, 8))
      add(f'{stack}/layers_{i}/mlp/wo/kernel', (8, emb))
  add('decoder/logits_dense/kernel', (emb, vocab))
  return params


def read_output(path):
  """Stock Orbax restore of the converted checkpoint: (flat 'a/b/c' params, step)."""
  restored = ocp.PyTreeCheckpointer().restore(os.path.join(path, 'state'))
  flat = {'/'.join(k): v for k, v in traverse_util.flatten_dict(restored['target']).items()}
  return flat, restored['state']['step']


def tree_digest(root):
  """A hash of every file name and byte under root: proves the input was left alone."""
  digest = hashlib.sha256()
  for directory, _, files in sorted(os.walk(root)):
    for name in sorted(files):
      path = os.path.join(directory, name)
      digest.update(path.encode())
      with open(path, 'rb') as f:
        digest.update(f.read())
  return digest.hexdigest()


def expected_pool(kernel, groups, method):
  """Plain loops: column g*D + d of the result from the heads of group g."""
  kernel = kernel.astype(np.float64)
  per_group = kernel.shape[1] // D // groups
  out = np.zeros((kernel.shape[0], groups * D))
  for e in range(kernel.shape[0]):
    for g in range(groups):
      for d in range(D):
        heads = range(g * per_group, (g + 1) * per_group) if method == 'mean' else [g * per_group]
        out[e, g * D + d] = sum(kernel[e, h * D + d] for h in heads) / len(heads)
  return out


@pytest.mark.parametrize('method', ['mean', 'first'])
@pytest.mark.parametrize('dtype', [np.float32, ml_dtypes.bfloat16])
def test_pooled_values_are_exact(tmp_path, method, dtype):
  params = handmade_params(dtype=dtype)
  source = str(tmp_path / 'in' / 'checkpoint_3')
  write_legacy_checkpoint(source, params.items(), step=3)
  output = str(tmp_path / 'out' / 'checkpoint_3')
  record = convert.convert(source, output, {'decoder_self': 2, 'decoder_cross': 1},
                           head_dim=D, method=method)
  converted, step = read_output(output)
  assert int(step) == 3
  assert set(converted) == set(params)
  for name, value in converted.items():
    assert value.dtype == np.dtype(dtype), name
    groups = (2 if '/self_attention/' in name else 1 if '/encoder_decoder_attention/' in name
              else None)
    if groups and name.endswith(('key/kernel', 'value/kernel')):
      np.testing.assert_array_equal(value.astype(np.float64),
                                    expected_pool(params[name], groups, method), err_msg=name)
    else:
      np.testing.assert_array_equal(value, params[name], err_msg=name)
  with open(os.path.join(output, convert.RECORD_FILE)) as f:
    assert json.load(f) == record
  assert record['attention']['decoder_self']['kv_heads_after'] == 2
  assert record['attention']['encoder']['kv_heads_after'] == H  # encoder untouched by default
  # 2 layers x (self: 2 of 4 heads, cross: 1 of 4) x key+value x D x E values removed.
  removed = 2 * ((H - 2) + (H - 1)) * 2 * D * E
  assert record['param_count']['before'] - record['param_count']['after'] == removed
  # Cache per token: layers x (key + value) x kv heads x D x 2 bytes.
  assert record['kv_cache_bytes_per_token_bfloat16']['decoder_cross'] == {
      'before': 2 * 2 * H * D * 2, 'after': 2 * 2 * 1 * D * 2}


def test_random_is_a_fresh_fan_in_initialisation(tmp_path):
  emb, heads, head_dim = 256, 8, 8
  params = handmade_params(emb=emb, heads=heads, head_dim=head_dim, layers=1)
  source = str(tmp_path / 'in')
  write_legacy_checkpoint(source, params.items(), step=0)
  convert.convert(source, str(tmp_path / 'out'), {'decoder_self': 2, 'encoder': 4},
                  head_dim=head_dim, method='random', seed=7)
  converted, _ = read_output(str(tmp_path / 'out'))
  key = converted['decoder/layers_0/self_attention/key/kernel']
  value = converted['decoder/layers_0/self_attention/value/kernel']
  assert key.shape == (emb, 2 * head_dim) and key.dtype == np.float32
  assert converted['encoder/layers_0/attention/key/kernel'].shape == (emb, 4 * head_dim)
  for kernel in (key, value):
    assert abs(kernel.mean()) < 0.1 / np.sqrt(emb)
    assert abs(kernel.std() * np.sqrt(emb) - 1) < 0.05  # variance_scaling(1, fan_in)
  assert not np.allclose(key, value)  # every tensor gets its own draw
  np.testing.assert_array_equal(converted['decoder/layers_0/encoder_decoder_attention/key/kernel'],
                                params['decoder/layers_0/encoder_decoder_attention/key/kernel'])


def test_g_equal_h_is_bit_identical(tmp_path):
  params = handmade_params(dtype=ml_dtypes.bfloat16)
  params['encoder/layers_0/pre_mlp_layer_norm/scale'] = np.arange(E, dtype=np.float32)
  source = str(tmp_path / 'in')
  write_legacy_checkpoint(source, params.items(), step=11,
                          inline=['encoder/layers_0/pre_mlp_layer_norm/scale'])
  convert.convert(source, str(tmp_path / 'out'),
                  {'encoder': H, 'decoder_self': H, 'decoder_cross': H}, head_dim=D)
  converted, step = read_output(str(tmp_path / 'out'))
  assert int(step) == 11
  assert converted.keys() == params.keys()
  for name, value in params.items():
    assert converted[name].dtype == value.dtype and converted[name].tobytes() == value.tobytes()


def test_tensors_stored_in_chunks_are_copied_chunk_by_chunk(tmp_path):
  """T5X stores arrays over 64 MiB (T5.1.1-Large's embedding) in chunks: the output is chunked
  alike, so the converter holds one chunk of them at a time; the values are unchanged."""
  params = handmade_params(vocab=40)
  source = str(tmp_path / 'in')
  write_legacy_checkpoint(source, params.items(), step=2, chunk_bytes=200)
  convert.convert(source, str(tmp_path / 'out'), {'decoder_self': 2}, head_dim=D)
  converted, _ = read_output(str(tmp_path / 'out'))
  for name, value in params.items():
    if '/self_attention/' in name and name.endswith(('key/kernel', 'value/kernel')):
      np.testing.assert_allclose(converted[name], expected_pool(value, 2, 'mean'), rtol=1e-6)
    else:
      np.testing.assert_array_equal(converted[name], value)
  metadata = ocp.PyTreeCheckpointHandler().metadata(tmp_path / 'out' / 'state').tree['target']
  for name in ('token_embedder/embedding', 'decoder/logits_dense/kernel'):
    stored = metadata
    for key in name.split('/'):
      stored = stored[key]
    expected = t5x_chunk_shape(params[name].shape, 4, 200)  # T5X's chunks of the source
    assert np.prod(expected) < params[name].size
    assert tuple(stored.storage.chunk_shape) == tuple(expected)


def test_a_chunk_read_with_the_wrong_shape_is_refused(tmp_path):
  bad = LazyTensor.chunked((4, 2), np.float32, (2, 2), lambda region: np.zeros((1, 2), np.float32))
  with pytest.raises(CheckpointError,
                     match=r'bad .*read float32\[1, 2\], expected float32\[2, 2\]'):
    orbax_format.write(tmp_path / 'out', {'bad': bad}, np.asarray(0))


# --- function preservation: MHA with duplicated kv heads == GQA after mean pooling -------------

def tiny_config(**kv_heads):
  return T5Config(vocab_size=17, emb_dim=16, num_heads=4, num_encoder_layers=2,
                  num_decoder_layers=2, head_dim=4, mlp_dim=32, dropout_rate=0.0, **kv_heads)


def mha_params_with_duplicate_groups(groups):
  """MHA params where the heads of each contiguous group share key/value kernels."""
  model = Transformer(tiny_config())
  tokens = jnp.ones((1, 4), jnp.int32)
  params = model.init(jax.random.PRNGKey(1), tokens, tokens, tokens)['params']
  flat = {'/'.join(k): np.asarray(v) for k, v in traverse_util.flatten_dict(params).items()}
  for name in flat:
    for module, g in groups.items():
      if f'/{module}/' in name and name.endswith(('key/kernel', 'value/kernel')):
        per_head = flat[name].reshape(16, 4, 4)  # [e, heads, d]
        first = per_head[:, [(h // (4 // g)) * (4 // g) for h in range(4)], :]
        flat[name] = np.ascontiguousarray(first.reshape(16, 16))
  return flat


def logits_and_decode(config, flat_params):
  model = Transformer(config)
  params = traverse_util.unflatten_dict({tuple(k.split('/')): jnp.asarray(v)
                                         for k, v in flat_params.items()})
  rng = np.random.default_rng(3)
  enc = jnp.asarray(rng.integers(2, 17, (2, 6)), jnp.int32)
  dec_in = jnp.asarray(rng.integers(2, 17, (2, 5)), jnp.int32).at[:, 0].set(0)
  logits = model.apply({'params': params}, enc, dec_in, dec_in, enable_dropout=False)
  encoded = model.apply({'params': params}, enc, enable_dropout=False, method=Transformer.encode)
  cache, steps = init_cache(model, params, enc, 5), []
  for t in range(3):  # cached decoding, one token at a time
    step_logits, variables = model.apply(
        {'params': params, 'cache': cache}, encoded, enc, dec_in[:, t:t + 1], dec_in[:, t:t + 1],
        decode=True, max_decode_length=5, enable_dropout=False, mutable=['cache'],
        method=Transformer.decode)
    cache = variables['cache']
    steps.append(step_logits[:, 0])
  return logits, jnp.stack(steps, 1), greedy_decode(model, params, enc, max_decode_length=5)


@pytest.mark.parametrize('source_format', ['legacy', 'orbax'])
def test_mean_pooling_preserves_the_function(tmp_path, source_format):
  flat = mha_params_with_duplicate_groups({'self_attention': 2, 'encoder_decoder_attention': 1})
  source = str(tmp_path / 'in' / 'checkpoint_9')
  if source_format == 'legacy':
    write_legacy_checkpoint(source, flat.items(), step=9)
  else:  # T5X's Orbax layout: checkpoint_N/state/ = {'target': ..., 'state': {'step': ...}}
    tree = {'target': traverse_util.unflatten_dict({tuple(k.split('/')): v
                                                    for k, v in flat.items()}),
            'state': {'step': np.asarray(9, np.int32)}}
    ocp.PyTreeCheckpointer().save(os.path.join(source, 'state'), tree)
  output = str(tmp_path / 'out' / 'checkpoint_9')
  convert.convert(source, output, {'decoder_self': 2, 'decoder_cross': 1}, head_dim=4)
  converted, step = read_output(output)
  assert int(step) == 9
  gqa = tiny_config(num_decoder_self_kv_heads=2, num_decoder_cross_kv_heads=1)
  expected_shapes = jax.tree.map(lambda x: x.shape, Transformer(gqa).init(
      jax.random.PRNGKey(0), *[jnp.ones((1, 4), jnp.int32)] * 3)['params'])
  assert traverse_util.unflatten_dict(
      {tuple(k.split('/')): v.shape for k, v in converted.items()}) == expected_shapes
  before = logits_and_decode(tiny_config(), flat)
  after = logits_and_decode(gqa, converted)
  np.testing.assert_allclose(after[0], before[0], rtol=1e-5, atol=1e-5)  # teacher-forced
  np.testing.assert_allclose(after[1], before[1], rtol=1e-5, atol=1e-5)  # cached steps
  np.testing.assert_array_equal(after[2], before[2])  # greedy decode


# --- bad input: one line, exit status 2, input untouched, nothing written ----------------------

@pytest.fixture
def run_cli(capsys):
  def run(*args):
    flags.FLAGS.unparse_flags()
    with pytest.raises(SystemExit) as exit_info:
      convert.main(['gqa-t5x-convert', *args])
    return exit_info.value.code, capsys.readouterr().err
  yield run
  flags.FLAGS.unparse_flags()


def make_file(directory, name, text=''):
  os.makedirs(directory)
  with open(os.path.join(directory, name), 'w') as f:
    f.write(text)


BAD_INPUTS = {
    'missing path': (lambda d: None, ['--num_kv_heads=2'], 'does not exist'),
    'unrecognised format': (lambda d: make_file(d, 'x'), ['--num_kv_heads=2'],
                            'unrecognised checkpoint format'),
    'not msgpack': (lambda d: make_file(d, 'checkpoint', 'model_checkpoint_path'),
                    ['--num_kv_heads=2'], 'not a T5X msgpack checkpoint'),
    'missing attention': (
        lambda d: write_legacy_checkpoint(d, handmade_params(
            drop=['decoder/layers_1/encoder_decoder_attention/key/kernel']).items(), 0),
        ['--num_kv_heads=2'], 'missing attention parameter decoder/layers_1/encoder_decoder_'),
    'width vs head_dim': (lambda d: write_legacy_checkpoint(d, handmade_params().items(), 0),
                          ['--num_kv_heads=1', '--head_dim=3'], 'not a multiple of head_dim 3'),
    'heads vs relpos': (lambda d: write_legacy_checkpoint(d, handmade_params().items(), 0),
                        ['--num_kv_heads=1', '--head_dim=4'], 'inconsistent with heads*head_dim'),
    'G does not divide H': (lambda d: write_legacy_checkpoint(d, handmade_params().items(), 0),
                            ['--num_kv_heads=3'], 'valid: 1, 2, 4'),
    'already at G': (lambda d: write_legacy_checkpoint(d, handmade_params(
        kv_heads={'decoder_self': 2, 'decoder_cross': 2}).items(), 0),
                     ['--num_kv_heads=2'], 'already has the requested kv heads'),
    'no G requested': (lambda d: write_legacy_checkpoint(d, handmade_params().items(), 0),
                       [], 'no kv-head count requested'),
}


@pytest.mark.parametrize('case', BAD_INPUTS)
def test_bad_input_is_one_line_exit_2_and_nothing_written(tmp_path, run_cli, case):
  make, args, message = BAD_INPUTS[case]
  source, output = str(tmp_path / 'in' / 'checkpoint_1'), str(tmp_path / 'out' / 'checkpoint_1')
  make(source)
  before = tree_digest(tmp_path)
  code, err = run_cli(f'--input={source}', f'--output={output}', '--head_dim=2', *args)
  assert code == 2
  assert err.count('\n') == 1 and message in err, err
  assert tree_digest(tmp_path) == before
  assert not os.path.exists(tmp_path / 'out')


def test_existing_output_is_refused_then_replaced_with_overwrite(tmp_path, run_cli):
  source, output = str(tmp_path / 'in'), str(tmp_path / 'out')
  write_legacy_checkpoint(source, handmade_params().items(), 0)
  os.makedirs(output)
  open(os.path.join(output, 'keep'), 'w').close()
  before = tree_digest(tmp_path)
  code, err = run_cli(f'--input={source}', f'--output={output}', '--head_dim=2',
                      '--num_kv_heads=2')
  assert code == 2 and 'pass --overwrite' in err
  assert tree_digest(tmp_path) == before
  code, err = run_cli(f'--input={source}', f'--output={output}', '--head_dim=2',
                      '--num_kv_heads=2', '--overwrite')
  assert code in (0, None), err
  assert sorted(os.listdir(tmp_path)) == ['in', 'out']  # no temporary or old copy left over
  assert not os.path.exists(os.path.join(output, 'keep'))
  assert read_output(output)[0]['decoder/layers_0/self_attention/key/kernel'].shape == (E, 2 * D)


def test_a_failure_mid_write_leaves_nothing(tmp_path):
  source = str(tmp_path / 'in')
  write_legacy_checkpoint(source, handmade_params().items(), 0)
  before = tree_digest(source)

  class Crash:  # stands in for a crash (or Ctrl-C) after a few tensors were written
    def __init__(self):
      self.calls = 0

    def update(self, name, nbytes):
      self.calls += 1
      if self.calls == 3:
        raise RuntimeError('crash')

  # The crash itself reaches the caller, not an error from cleaning up after it.
  with pytest.raises(RuntimeError, match='crash'):
    convert.convert(source, str(tmp_path / 'out' / 'checkpoint_0'), {'decoder_self': 2},
                    head_dim=D, progress=Crash())
  assert os.listdir(tmp_path / 'out') == []
  assert tree_digest(source) == before


def test_cli_reads_head_dim_and_kv_heads_from_gin(tmp_path):
  """tiny.gin: 8 heads x head_dim 16; NUM_KV_HEADS=2 from a binding; run as `python -m`."""
  params = handmade_params(emb=128, heads=8, head_dim=16, layers=2, vocab=32)
  source, output = str(tmp_path / 'in'), str(tmp_path / 'out')
  write_legacy_checkpoint(source, params.items(), 4)
  result = subprocess.run(
      [sys.executable, '-m', 'gqa_t5x.convert', f'--input={source}', f'--output={output}',
       '--gin_file=models/t5_1_1/tiny.gin', '--gin_bindings=NUM_KV_HEADS=2'],
      capture_output=True, text=True, cwd=REPO, check=False)
  assert result.returncode == 0, result.stderr
  assert '[' in result.stderr and 'MB/s' in result.stderr  # progress lines
  record = json.loads(result.stdout)
  assert record['head_dim'] == 16
  assert {k: v['kv_heads_after'] for k, v in record['attention'].items()} == {
      'encoder': 8, 'decoder_self': 2, 'decoder_cross': 2}
  assert read_output(output)[0]['decoder/layers_1/self_attention/key/kernel'].shape == (128, 32)


def test_streaming_save_overlaps_leaves_within_the_largest():
  """The writer's byte budget: arrival order, several small leaves at once, one oversized alone."""
  held, peaks, order = [], [], []

  async def leaf(name, nbytes, budget):
    async with budget.hold(nbytes):
      order.append(name)
      held.append(nbytes)
      peaks.append((len(held), sum(held)))
      await asyncio.sleep(0.01)
      held.remove(nbytes)

  async def run(sizes, limit):
    budget = _ByteBudget(limit)
    await asyncio.gather(*(leaf(i, n, budget) for i, n in enumerate(sizes)))

  asyncio.run(run([6, 6, 12, 3, 3, 4], limit=10))
  assert order == [0, 1, 2, 3, 4, 5]
  assert max(peaks) == (3, 10)  # leaves 3, 4 and 5 held together, exactly at the limit
  assert (1, 12) in peaks and all(total <= 10 for count, total in peaks if count > 1)
