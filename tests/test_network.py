"""The T5.1.1 network: T5X's parameter tree, cached decoding, packing, sharding, configs."""
import flax
from flax.linen import partitioning
import gin
import jax
import jax.numpy as jnp
from jax.sharding import Mesh, NamedSharding
import numpy as np
import pytest

import gqa_t5x
from gqa_t5x import axes
from gqa_t5x import decoding
from gqa_t5x.decoding import greedy_decode
from gqa_t5x.network import T5Config, Transformer

TINY = dict(vocab_size=40, emb_dim=32, num_heads=8, num_encoder_layers=2, num_decoder_layers=2,
            head_dim=4, mlp_dim=48, dropout_rate=0.0)


def tiny(self_kv=None, cross_kv=None, **overrides):
  return T5Config(**{**TINY, **overrides}, num_decoder_self_kv_heads=self_kv,
                  num_decoder_cross_kv_heads=cross_kv)


def batch(seed=0, b=2, s=9, t=6, vocab=40):
  rng = np.random.default_rng(seed)
  enc = rng.integers(2, vocab, size=(b, s)).astype(np.int32)
  enc[0, -3:] = 0  # padding in one row
  targets = rng.integers(2, vocab, size=(b, t)).astype(np.int32)
  dec_in = np.concatenate([np.zeros((b, 1), np.int32), targets[:, :-1]], axis=1)
  return enc, dec_in, targets


def init(cfg, enc, dec_in, targets, seed=0):
  return jax.jit(Transformer(cfg).init)(jax.random.PRNGKey(seed), enc, dec_in, targets)


def forward(cfg, params, *inputs, **kwargs):
  """Jitted teacher-forced logits (op-by-op dispatch would dominate the suite's time)."""
  apply = lambda p, *x: Transformer(cfg).apply({'params': p}, *x, enable_dropout=False, **kwargs)
  return jax.jit(apply)(params, *inputs)


def flat(tree):
  return {'/'.join(k): v for k, v in flax.traverse_util.flatten_dict(tree).items()}


def t5x_t5_1_1_tree(emb, heads, layers, mlp, vocab=32128, head_dim=64):
  """T5X's T5.1.1 parameter paths and shapes, written out from t5x/examples/t5/network.py."""
  joined = heads * head_dim
  tree = {'token_embedder/embedding': (vocab, emb),
          'encoder/relpos_bias/rel_embedding': (heads, 32),
          'decoder/relpos_bias/rel_embedding': (heads, 32),
          'encoder/encoder_norm/scale': (emb,), 'decoder/decoder_norm/scale': (emb,),
          'decoder/logits_dense/kernel': (emb, vocab)}
  for i in range(layers):
    for stack, attentions, norms in (
        ('encoder', ['attention'], ['pre_attention_layer_norm', 'pre_mlp_layer_norm']),
        ('decoder', ['self_attention', 'encoder_decoder_attention'],
         ['pre_self_attention_layer_norm', 'pre_cross_attention_layer_norm',
          'pre_mlp_layer_norm'])):
      layer = f'{stack}/layers_{i}'
      for att in attentions:
        for proj in ('query', 'key', 'value'):
          tree[f'{layer}/{att}/{proj}/kernel'] = (emb, joined)
        tree[f'{layer}/{att}/out/kernel'] = (joined, emb)
      for norm in norms:
        tree[f'{layer}/{norm}/scale'] = (emb,)
      tree[f'{layer}/mlp/wi_0/kernel'] = (emb, mlp)
      tree[f'{layer}/mlp/wi_1/kernel'] = (emb, mlp)
      tree[f'{layer}/mlp/wo/kernel'] = (mlp, emb)
  return tree


def test_mha_parameter_tree_is_t5x_t5_1_1_small():
  cfg = T5Config(vocab_size=32128, emb_dim=512, num_heads=6, num_encoder_layers=8,
                 num_decoder_layers=8, head_dim=64, mlp_dim=1024)
  tokens = jnp.ones((1, 4), jnp.int32)
  shapes = jax.eval_shape(lambda: Transformer(cfg).init(jax.random.PRNGKey(0), tokens, tokens,
                                                        tokens))
  got = {k: tuple(v.shape) for k, v in flat(shapes['params']).items()}
  assert got == t5x_t5_1_1_tree(emb=512, heads=6, layers=8, mlp=1024)
  # T5X's train state needs logical axis names for every parameter.
  named = {k.replace('_axes', '') for k in flat(shapes['params_axes'])}
  assert named == set(got)


def test_gqa_shrinks_only_decoder_key_value_kernels():
  enc, dec_in, targets = batch()
  shapes = lambda cfg: flat(jax.eval_shape(lambda: init(cfg, enc, dec_in, targets))['params'])
  params, mha = shapes(tiny(self_kv=2, cross_kv=1)), shapes(tiny())
  changed = {k for k in mha if params[k].shape != mha[k].shape}
  assert changed == {f'decoder/layers_{i}/{att}/{p}/kernel' for i in range(2) for p in ('key', 'value')
                     for att in ('self_attention', 'encoder_decoder_attention')}
  assert params['decoder/layers_0/self_attention/key/kernel'].shape == (32, 2 * 4)
  assert params['decoder/layers_0/encoder_decoder_attention/value/kernel'].shape == (32, 1 * 4)


def cached_step_logits(cfg, params, enc, dec_in):
  model = Transformer(cfg)
  b, t = dec_in.shape
  _, state = model.apply({'params': params}, enc, dec_in, dec_in, decode=True,
                         enable_dropout=False, mutable=['cache'])
  cache = jax.tree.map(jnp.zeros_like, state['cache'])
  encoded = model.apply({'params': params}, enc, enable_dropout=False, method=Transformer.encode)
  step = jax.jit(lambda cache, token: model.apply(
      {'params': params, 'cache': cache}, encoded, enc, token, token, enable_dropout=False,
      decode=True, max_decode_length=t, mutable=['cache'], method=Transformer.decode))
  steps = []
  for i in range(t):
    logits, state = step(cache, dec_in[:, i:i + 1])
    cache = state['cache']
    steps.append(logits)
  return jnp.concatenate(steps, axis=1), cache


@pytest.mark.parametrize('self_kv,cross_kv', [(None, None), (2, 2), (1, 1), (4, 1)],
                         ids=['mha', 'gqa2', 'mqa', 'gqa4-self_mqa-cross'])
def test_cached_decoding_matches_teacher_forcing(self_kv, cross_kv):
  cfg = tiny(self_kv, cross_kv)
  enc, dec_in, targets = batch(seed=1)
  params = init(cfg, enc, dec_in, targets)['params']
  forced = forward(cfg, params, enc, dec_in, targets)
  stepped, cache = cached_step_logits(cfg, params, enc, dec_in)
  np.testing.assert_allclose(stepped, forced, rtol=1e-4, atol=1e-4)
  layer = cache['decoder']['layers_0']
  g_self, g_cross = cfg.decoder_self_kv_heads, cfg.decoder_cross_kv_heads
  assert layer['self_attention']['cached_key'].shape == (2, g_self, 4, 6)
  assert layer['encoder_decoder_attention']['cached_value'].shape == (2, g_cross, 4, 9)


def naive_greedy(cfg, params, enc, length):
  """Greedy decoding without a cache: re-run the whole decoder on the prefix every step.

  The decoder input has the full length (later positions 0); causal masking hides them.
  """
  out = np.zeros((enc.shape[0], length), np.int32)
  run = jax.jit(lambda dec_in: Transformer(cfg).apply(
      {'params': params}, enc, dec_in, jnp.ones_like(dec_in), enable_dropout=False))
  for i in range(length):
    dec_in = np.concatenate([np.zeros((enc.shape[0], 1), np.int32), out[:, :-1]], axis=1)
    out[:, i] = np.argmax(run(dec_in)[:, i], axis=-1)
  return out


@pytest.mark.parametrize('self_kv,cross_kv', [(None, None), (2, 2), (1, 1)])
def test_greedy_decode_equals_uncached_argmax_loop_and_stops_at_eos(self_kv, cross_kv):
  cfg = tiny(self_kv, cross_kv)
  enc, dec_in, targets = batch(seed=2, b=3)
  params = init(cfg, enc, dec_in, targets, seed=3)['params']
  want = naive_greedy(cfg, params, enc, 7)
  np.testing.assert_array_equal(greedy_decode(Transformer(cfg), params, enc, 7, eos_id=-1), want)

  eos = int(want[0, 2])  # pretend row 0's third token is EOS: it must end there, padded with 0
  got = np.asarray(greedy_decode(Transformer(cfg), params, enc, 7, eos_id=eos))
  for row, ref in zip(got, want):
    stop = list(ref).index(eos) + 1 if eos in ref else len(ref)
    np.testing.assert_array_equal(row[:stop], ref[:stop])
    assert not row[stop:].any()


def test_greedy_decode_prefilling_in_chunks_equals_uncached_argmax_loop(monkeypatch):
  monkeypatch.setattr(decoding, 'PREFILL_CHUNK_BYTES', 2 * 9 * 32 * 4)  # two [9, 32] samples
  jax.clear_caches()  # greedy_decode is traced anew, with the patched budget
  cfg = tiny(2, 1)
  enc, dec_in, targets = batch(seed=6, b=4)
  params = init(cfg, enc, dec_in, targets, seed=4)['params']
  loops = lambda: greedy_decode.lower(Transformer(cfg), params, enc, 7, eos_id=-1).as_text().count(
      'stablehlo.while')
  assert loops() == 2  # the prefill's chunks, then the steps
  np.testing.assert_array_equal(greedy_decode(Transformer(cfg), params, enc, 7, eos_id=-1),
                                naive_greedy(cfg, params, enc, 7))
  # Under a mesh of several devices the batch's shards stay whole: one prefill, no chunks.
  jax.clear_caches()
  with jax.set_mesh(Mesh(np.asarray(jax.devices()), ('data',))):
    assert loops() == 1


@pytest.mark.parametrize('batch_size,length,emb,itemsize,want', [
    (16, 2048, 512, 4, 2),  # 4 MiB per sample: two fit in 8 MiB
    (8, 256, 128, 4, 8),  # the whole batch fits
    (10, 2048, 256, 4, 2),  # 2 MiB per sample: 4 would fit, but neither 4 nor 3 divides 10
    (16, 2048, 4096, 4, 16),  # 32 MiB per sample: not one at a time, the whole batch
    (13, 2048, 512, 4, 13),  # a prime batch: no chunk but 1, so the whole batch
])
def test_prefill_chunk_is_the_largest_divisor_of_the_batch_within_the_byte_budget(
    batch_size, length, emb, itemsize, want):
  assert decoding.PREFILL_CHUNK_BYTES == 8 << 20
  assert decoding.prefill_chunk(batch_size, length, emb, itemsize) == want


def test_packed_examples_equal_separate_examples():
  cfg = tiny(2, 1)
  enc, dec_in, targets = batch(seed=4, b=2, s=5, t=4)
  enc[0, -3:] = 7  # no padding: rows are packed whole
  params = init(cfg, enc, dec_in, targets)['params']
  separate = forward(cfg, params, enc, dec_in, targets)
  packed = forward(cfg, params, enc.reshape(1, -1), dec_in.reshape(1, -1), targets.reshape(1, -1),
                   np.repeat([[1, 2]], 5, axis=1), np.repeat([[1, 2]], 4, axis=1),
                   np.tile(np.arange(5), 2)[None], np.tile(np.arange(4), 2)[None])
  np.testing.assert_allclose(packed.reshape(separate.shape), separate, rtol=1e-4, atol=1e-4)


def test_bfloat16_activations_track_float32():
  enc, dec_in, targets = batch(seed=5)
  params = init(tiny(2, 2), enc, dec_in, targets)['params']
  f32 = forward(tiny(2, 2), params, enc, dec_in, targets)
  bf16 = forward(tiny(2, 2, dtype=jnp.bfloat16), params, enc, dec_in, targets)
  assert bf16.dtype == jnp.float32  # logits stay float32, as in T5X
  assert np.abs(np.asarray(bf16) - np.asarray(f32)).max() < 0.1 * np.abs(np.asarray(f32)).max()


def test_dropout_is_active_only_when_enabled():
  cfg = tiny(2, 2, dropout_rate=0.5)
  enc, dec_in, targets = batch(seed=6)
  params = init(cfg, enc, dec_in, targets)['params']
  run = jax.jit(lambda key, on: Transformer(cfg).apply(
      {'params': params}, enc, dec_in, targets, enable_dropout=on, rngs={'dropout': key}),
                static_argnums=1)
  np.testing.assert_array_equal(run(jax.random.PRNGKey(0), False), run(jax.random.PRNGKey(1), False))
  assert not np.allclose(run(jax.random.PRNGKey(0), True), run(jax.random.PRNGKey(1), True))


@pytest.mark.parametrize('field', ['num_encoder_kv_heads', 'num_decoder_self_kv_heads',
                                   'num_decoder_cross_kv_heads'])
def test_config_rejects_kv_heads_that_do_not_divide_heads(field):
  with pytest.raises(ValueError, match=rf'T5Config.{field}=3 .* valid values: 1, 2, 4, 8'):
    T5Config(**TINY, **{field: 3})


def test_decode_step_without_max_decode_length_is_a_clear_error():
  cfg = tiny(2, 2)
  enc, dec_in, targets = batch()
  params = init(cfg, enc, dec_in, targets)['params']
  model = Transformer(cfg)
  _, state = model.apply({'params': params}, enc, dec_in, dec_in, decode=True,
                         enable_dropout=False, mutable=['cache'])
  encoded = model.apply({'params': params}, enc, enable_dropout=False, method=Transformer.encode)
  with pytest.raises(ValueError, match='max_decode_length'):
    model.apply({'params': params, 'cache': state['cache']}, encoded, enc, dec_in[:, :1],
                dec_in[:, :1], enable_dropout=False, decode=True, mutable=['cache'],
                method=Transformer.decode)


def loss_fn(model, params, enc, dec_in, targets):
  logits = model.apply({'params': params}, enc, dec_in, targets, enable_dropout=False)
  logp = jax.nn.log_softmax(logits)
  return -jnp.mean(jnp.take_along_axis(logp, targets[..., None], axis=-1))


@pytest.mark.parametrize('kv_heads', [8, 2, 1], ids=['mha', 'gqa2', 'mqa'])
def test_sharded_forward_backward_on_2x4_mesh_matches_one_device(kv_heads):
  assert jax.device_count() >= 8, 'tests/conftest.py sets 8 host devices'
  cfg = tiny(kv_heads, kv_heads)
  enc, dec_in, targets = batch(seed=7, b=4)
  variables = init(cfg, enc, dec_in, targets)
  params = variables['params']
  model = Transformer(cfg)
  want_loss, want_grads = jax.jit(jax.value_and_grad(
      lambda p: loss_fn(model, p, enc, dec_in, targets)))(params)

  mesh = Mesh(np.array(jax.devices()[:8]).reshape(2, 4), (axes.DATA_AXIS, axes.MODEL_AXIS))
  rules = axes.logical_axis_rules(4, cfg.kv_head_counts)
  logical = flax.core.unfreeze(partitioning.get_axis_names(variables["params_axes"]))
  param_shardings = flax.linen.logical_to_mesh_sharding(logical, mesh, rules)
  batch_sharding = NamedSharding(mesh, jax.sharding.PartitionSpec(axes.DATA_AXIS))
  sharded_params = jax.device_put(params, param_shardings)
  sharded_batch = [jax.device_put(x, batch_sharding) for x in (enc, dec_in, targets)]

  kv_spec = param_shardings['decoder']['layers_0']['self_attention']['key']['kernel'].spec
  assert tuple(kv_spec) == ((None, axes.MODEL_AXIS) if kv_heads % 4 == 0 else (None, None))
  q_spec = param_shardings['decoder']['layers_0']['self_attention']['query']['kernel'].spec
  assert tuple(q_spec) == (None, axes.MODEL_AXIS)  # query heads stay sharded

  with jax.set_mesh(mesh), flax.linen.logical_axis_rules(rules):
    step = jax.jit(jax.value_and_grad(lambda p, *b: loss_fn(model, p, *b)),
                   in_shardings=(param_shardings, batch_sharding, batch_sharding, batch_sharding),
                   out_shardings=(None, param_shardings))
    loss, grads = step(sharded_params, *sharded_batch)
  np.testing.assert_allclose(loss, want_loss, rtol=1e-5)
  jax.tree.map(lambda g, w: np.testing.assert_allclose(g, w, rtol=1e-4, atol=1e-6),
               grads, want_grads)


SIZES = {  # d_model, heads, layers per stack, mlp (T5.1.1, t5x.md)
    'small': (512, 6, 8, 1024), 'base': (768, 12, 12, 2048), 'large': (1024, 16, 24, 2816),
    'xl': (2048, 32, 24, 5120), 'xxl': (4096, 64, 24, 10240), 'tiny': (128, 8, 2, 256)}


def parse_model_gin(*files, bindings=()):
  gin.clear_config()
  gin.add_config_file_search_path(str(gqa_t5x.GIN_CONFIGS_DIR))
  gin.parse_config_files_and_bindings(list(files), list(bindings))
  try:
    return gin.get_configurable('gqa_t5x.network.Transformer')().config
  finally:
    gin.clear_config()


@pytest.mark.parametrize('size', sorted(SIZES))
def test_model_gins_give_t5_1_1_sizes_with_mha_encoder_and_kv_heads_macro(size):
  emb, heads, layers, mlp = SIZES[size]
  cfg = parse_model_gin(f'models/t5_1_1/{size}.gin')
  assert (cfg.emb_dim, cfg.num_heads, cfg.num_encoder_layers, cfg.num_decoder_layers,
          cfg.mlp_dim) == (emb, heads, layers, layers, mlp)
  assert cfg.kv_head_counts == (heads, heads, heads)  # MHA unless told otherwise
  mqa = parse_model_gin(f'models/t5_1_1/{size}.gin', 'models/attention/mqa.gin')
  assert mqa.kv_head_counts == (heads, 1, 1)
  gqa = parse_model_gin(f'models/t5_1_1/{size}.gin', bindings=['NUM_KV_HEADS = 2'])
  assert gqa.kv_head_counts == (heads, 2, 2)


def test_xxl_gqa8_gin_parameter_count():
  cfg = parse_model_gin('models/t5_1_1/xxl.gin', 'models/attention/gqa8.gin')
  tokens = jnp.ones((1, 2), jnp.int32)
  shapes = jax.eval_shape(lambda: Transformer(cfg).init(jax.random.PRNGKey(0), tokens, tokens,
                                                        tokens)['params'])
  count = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(shapes))
  e, j, m, v, layers = 4096, 4096, 10240, 32128, 24
  mha = 2 * v * e + 2 * 64 * 32 + 2 * e + layers * (4 * e * j + 3 * e * m + 2 * e) + layers * (
      8 * e * j + 3 * e * m + 3 * e)
  saved_per_layer = 4 * e * (j - 8 * 64)  # decoder self + cross key/value kernels shrink to G=8
  assert count == mha - layers * saved_per_layer
