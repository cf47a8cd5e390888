"""gqa-t5x-convert on HuggingFace T5 directories, with transformers as the reference.

Small random T5s are built and saved by transformers itself (save_pretrained; pytorch_model.bin
by torch.save of the state dict, as transformers wrote it before v5), converted, and run by this
project's network built from the model gin the converter wrote: its logits must be
transformers' on the same tokens.
"""
import functools
import json
import os

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
import torch
import transformers
from flax import traverse_util

from gqa_t5x import convert, gin_utils
from gqa_t5x.network import Transformer
from tests.test_convert import read_output, run_cli, tree_digest  # pylint: disable=unused-import

# (transformers.T5Config fields, own lm_head?, how saved). The last one is original T5's tied,
# scaled head with a separate lm_head.weight: the converter must fold the scale into the kernel.
CONFIGS = {
    't5_1_1': (dict(feed_forward_proj='gated-gelu', tie_word_embeddings=False), True,
               'safetensors'),
    'flan_sharded': (dict(feed_forward_proj='gated-gelu', tie_word_embeddings=False, d_kv=6,
                          num_decoder_layers=3, relative_attention_num_buckets=8,
                          relative_attention_max_distance=12), True, 'sharded'),
    'original_t5_bin': (dict(feed_forward_proj='relu'), False, 'bin'),
    'scaled_own_lm_head': (dict(feed_forward_proj='gated-silu'), True, 'safetensors'),
}
VOCAB, LENGTH = 40, 14
transformers.utils.logging.disable_progress_bar()  # keeps stderr to the converter's one line


def hf_model(config_fields, own_lm_head=False, dtype=torch.float32, seed=0):
  torch.manual_seed(seed)
  config = transformers.T5Config(**{**dict(vocab_size=VOCAB, d_model=16, d_kv=4, d_ff=24,
                                             num_layers=2, num_heads=4, dropout_rate=0.0),
                                    **config_fields})
  model = transformers.T5ForConditionalGeneration(config).eval()
  if own_lm_head:  # transformers 5 ties lm_head to shared at creation; real T5.1.1 ones are not
    model.lm_head.weight = torch.nn.Parameter(torch.randn(VOCAB, 16))
  return model.to(dtype)


def save(model, directory, how='safetensors'):
  if how == 'bin':
    model.config.save_pretrained(directory)
    torch.save(model.state_dict(), os.path.join(directory, 'pytorch_model.bin'))
  else:
    model.save_pretrained(directory, max_shard_size='8KB' if how == 'sharded' else '5GB')
  return directory


def tokens():
  rng = np.random.default_rng(5)
  enc = rng.integers(2, VOCAB, (2, LENGTH))
  enc[1, 9:] = 0  # padding
  dec_in = rng.integers(2, VOCAB, (2, LENGTH - 2))
  dec_in[:, 0] = 0  # T5's decoder start token
  return enc, dec_in


def hf_logits(model, enc, dec_in):
  with torch.no_grad():
    return model(input_ids=torch.tensor(enc), attention_mask=torch.tensor(enc > 0),
                 decoder_input_ids=torch.tensor(dec_in)).logits.numpy()


def converted_network(output):
  """(T5Config from the written model gin, params) of a conversion's output."""
  config = gin_utils.model_config([os.path.join(output, convert.MODEL_GIN_FILE)],
                                  ["ACTIVATION_DTYPE = 'float32'"])
  flat, _ = read_output(output)
  return config, flat


def network_logits(config, flat, enc, dec_in):
  params = traverse_util.unflatten_dict({tuple(k.split('/')): jnp.asarray(v)
                                         for k, v in flat.items()})
  apply = jax.jit(functools.partial(Transformer(config).apply, enable_dropout=False))
  return np.asarray(apply({'params': params}, enc, dec_in, np.ones_like(dec_in)))


@pytest.mark.parametrize('case', CONFIGS)
def test_converted_network_gives_transformers_logits(tmp_path, case):
  fields, own_lm_head, how = CONFIGS[case]
  model = hf_model(fields, own_lm_head)
  source = save(model, str(tmp_path / 'hf'), how)
  output = str(tmp_path / 'out' / 'checkpoint_0')
  record = convert.convert(source, output, {'decoder_self': 4, 'decoder_cross': 4})
  config, flat = converted_network(output)
  assert (config.emb_dim, config.num_heads, config.head_dim, config.mlp_dim) == (
      16, 4, fields.get('d_kv', 4), 24)
  assert config.num_decoder_layers == fields.get('num_decoder_layers', 2)
  assert config.logits_via_embedding == (case == 'original_t5_bin')
  with open(os.path.join(source, 'config.json')) as f:
    assert record['source_config'] == json.load(f)
  assert record['source_format'] == ('HuggingFace T5 (PyTorch)' if how == 'bin'
                                     else 'HuggingFace T5 (safetensors)')
  enc, dec_in = tokens()
  expected = hf_logits(model, enc, dec_in)
  np.testing.assert_allclose(network_logits(config, flat, enc, dec_in), expected,
                             rtol=1e-5, atol=2e-5)


def test_dtypes_kept_and_kernels_transposed(tmp_path):
  model = hf_model(CONFIGS['t5_1_1'][0], own_lm_head=True, dtype=torch.bfloat16)
  source = save(model, str(tmp_path / 'hf'))
  output = str(tmp_path / 'out')
  convert.convert(source, output, {'decoder_self': 2, 'decoder_cross': 2})
  flat, step = read_output(output)
  assert int(step) == 0
  assert {v.dtype for v in flat.values()} == {np.dtype(ml_dtypes.bfloat16)}
  state = {k: v.float().numpy() for k, v in model.state_dict().items()}
  for t5x, hf in (('decoder/layers_1/encoder_decoder_attention/query/kernel',
                   'decoder.block.1.layer.1.EncDecAttention.q.weight'),
                  ('encoder/layers_0/mlp/wi_1/kernel',
                   'encoder.block.0.layer.1.DenseReluDense.wi_1.weight'),
                  ('encoder/relpos_bias/rel_embedding',
                   'encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight'),
                  ('decoder/logits_dense/kernel', 'lm_head.weight')):
    np.testing.assert_array_equal(flat[t5x].astype(np.float32), state[hf].T, err_msg=t5x)
  np.testing.assert_array_equal(flat['token_embedder/embedding'].astype(np.float32),
                                state['shared.weight'])
  np.testing.assert_array_equal(
      flat['decoder/layers_1/pre_cross_attention_layer_norm/scale'].astype(np.float32),
      state['decoder.block.1.layer.1.layer_norm.weight'])


def test_gqa_conversion_preserves_the_function(tmp_path):
  """kv heads duplicated within groups of 2 in transformers' model: GQA-2 computes the same."""
  model = hf_model(CONFIGS['t5_1_1'][0], own_lm_head=True)
  d = model.config.d_kv
  with torch.no_grad():
    for name, weight in model.named_parameters():
      if 'Attention.k.' in name or 'Attention.v.' in name:  # rows: head * d_kv + dim
        for head in (1, 3):
          weight[head * d:(head + 1) * d] = weight[(head - 1) * d:head * d]
  source = save(model, str(tmp_path / 'hf'))
  mha, gqa = str(tmp_path / 'mha'), str(tmp_path / 'gqa')
  convert.convert(source, mha, {'decoder_self': 4, 'decoder_cross': 4})
  record = convert.convert(source, gqa, {'decoder_self': 2, 'decoder_cross': 2})
  assert {k: v['kv_heads_after'] for k, v in record['attention'].items()} == {
      'encoder': 4, 'decoder_self': 2, 'decoder_cross': 2}
  config, flat = converted_network(gqa)
  assert config.kv_head_counts == (4, 2, 2)
  assert flat['decoder/layers_0/self_attention/key/kernel'].shape == (16, 2 * d)
  enc, dec_in = tokens()
  expected = hf_logits(model, enc, dec_in)
  for path in (mha, gqa):
    np.testing.assert_allclose(network_logits(*converted_network(path), enc, dec_in), expected,
                               rtol=1e-5, atol=2e-5, err_msg=path)


# --- bad input: one line, exit status 2, input untouched, nothing written ----------------------

def first_shard_removed(directory):
  save(hf_model({}), directory, 'sharded')
  with open(os.path.join(directory, 'model.safetensors.index.json')) as f:
    os.remove(os.path.join(directory, min(json.load(f)['weight_map'].values())))


def untied_encoder_embedding():
  model = hf_model({})
  model.encoder.embed_tokens = torch.nn.Embedding(VOCAB, 16)
  return model


BAD_INPUTS = {
    'decoder-only config': (
        lambda d: transformers.GPT2Config(n_layer=1, n_embd=8, n_head=2).save_pretrained(d),
        'only T5 encoder-decoders are supported'),
    'encoder-only T5': (
        lambda d: transformers.T5EncoderModel(hf_model({}).config).save_pretrained(d),
        "architectures ['T5EncoderModel']); only T5 encoder-decoders are supported"),
    'missing weight files': (lambda d: hf_model({}).config.save_pretrained(d), 'but no weights'),
    'index names a missing shard': (first_shard_removed,
                                    'names shard model-00001-of-'),
    'exact-gelu MLP': (lambda d: save(hf_model({'feed_forward_proj': 'gelu'}), d),
                       "feed_forward_proj 'gelu' is not supported"),
    'an encoder embedding of its own': (lambda d: save(untied_encoder_embedding(), d),
                                        'encoder.embed_tokens.weight differs from shared.weight'),
    'weights of another config': (
        lambda d: (save(hf_model({'num_layers': 3}), d), hf_model({}).config.save_pretrained(d)),
        'has tensor decoder.block.2.layer.0.SelfAttention.k.weight (and 20 more)'),
}


@pytest.mark.parametrize('case', BAD_INPUTS)
def test_bad_hf_input_is_one_line_exit_2_and_nothing_written(tmp_path, run_cli, case):
  make, message = BAD_INPUTS[case]
  source, output = str(tmp_path / 'hf'), str(tmp_path / 'out' / 'checkpoint_0')
  make(source)
  before = tree_digest(tmp_path)
  code, err = run_cli(f'--input={source}', f'--output={output}', '--num_kv_heads=2')
  assert code == 2
  assert err.count('\n') == 1 and message in err, err
  assert tree_digest(tmp_path) == before
  assert not os.path.exists(tmp_path / 'out')


def test_head_dim_contradicting_the_hf_config_is_refused(tmp_path, run_cli):
  source = save(hf_model({}), str(tmp_path / 'hf'))
  code, err = run_cli(f'--input={source}', f'--output={tmp_path / "out"}', '--num_kv_heads=2',
                      '--head_dim=8')
  assert code == 2 and "head_dim 8 (--head_dim or --gin_file) contradicts" in err, err
  assert not os.path.exists(tmp_path / 'out')
