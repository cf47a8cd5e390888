"""gqa-t5x-convert --method=aligned: rotations keep the function, exact rotations pool exactly,
and the record's distances are what the output holds, never worse than mean pooling.

The MHA model's own logits are the reference for function preservation; the record's distances
are recomputed here with plain numpy from the input and output kernels, the rotations read back
from the output query and out kernels.
"""
import functools
import json
import os

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from flax import traverse_util

from gqa_t5x import convert
from gqa_t5x.checkpoints import alignment
from gqa_t5x.network import Transformer
from tests.t5x_layout import write_legacy_checkpoint
from tests.test_convert import (handmade_params, logits_and_decode, read_output,  # noqa: F401
                                run_cli, tiny_config)

MODULES = {'encoder': 'attention', 'decoder_self': 'self_attention',
           'decoder_cross': 'encoder_decoder_attention'}
D = 4  # tiny_config's head_dim; 4 heads, embed 16
GQA = {'num_decoder_self_kv_heads': 2, 'num_decoder_cross_kv_heads': 2}  # one compile for both


def init_params(config):
  """A fresh dict of a freshly initialised model's flat params (initialised once per config)."""
  return dict(_init_params(config))


@functools.cache
def _init_params(config):
  tokens = jnp.ones((1, 4), jnp.int32)
  params = jax.jit(Transformer(config).init)(jax.random.PRNGKey(1), tokens, tokens, tokens)
  return {'/'.join(k): np.asarray(v)
          for k, v in traverse_util.flatten_dict(params['params']).items()}


def attention_prefixes(flat, kind):
  return sorted({n.rsplit('/', 2)[0] for n in flat if f'/{MODULES[kind]}/' in n})


def test_rotations_alone_keep_the_function_including_cached_decoding():
  """Every attention layer turned by its fitted rotations, nothing pooled; decoder attention has
  2 kv heads for 4 query heads, so each key rotation there also turns two query heads."""
  config = tiny_config(**GQA)
  flat = init_params(config)
  rotated = dict(flat)
  for kind in MODULES:
    for prefix in attention_prefixes(flat, kind):
      for projection, partner in (('key', 'query'), ('value', 'out')):
        kernel = flat[f'{prefix}/{projection}/kernel']
        rotations, _ = alignment.fit(kernel, num_kv_heads=1, head_dim=D)
        assert np.abs(rotations - np.eye(D)).max() > 0.5  # far from the identity
        rotated[f'{prefix}/{projection}/kernel'] = alignment.rotate(kernel, rotations, head_dim=D)
        rotated[f'{prefix}/{partner}/kernel'] = alignment.rotate(
            flat[f'{prefix}/{partner}/kernel'], rotations, head_dim=D, rows=partner == 'out')
        assert np.abs(rotated[f'{prefix}/{partner}/kernel']
                      - flat[f'{prefix}/{partner}/kernel']).max() > 0.1
  before, after = logits_and_decode(config, flat), logits_and_decode(config, rotated)
  np.testing.assert_allclose(after[0], before[0], rtol=1e-5, atol=1e-5)  # teacher-forced
  np.testing.assert_allclose(after[1], before[1], rtol=1e-5, atol=1e-5)  # cached steps
  np.testing.assert_array_equal(after[2], before[2])  # greedy decode


def random_rotation(rng):
  q, r = np.linalg.qr(rng.standard_normal((D, D)))
  return q * np.sign(np.diag(r))


def mha_params_with_rotated_groups(groups):
  """MHA params in which every head of a contiguous group is the group's first head turned by its
  own random rotations: q, k by Q_h; v by P_h, out rows by P_h^T. Each head of a group then
  computes what the first does (but for its relative position bias)."""
  flat, rng = init_params(tiny_config()), np.random.default_rng(5)
  for kind, g in groups.items():
    for prefix in attention_prefixes(flat, kind):
      q, k, v, o = (flat[f'{prefix}/{p}/kernel'].copy() for p in ('query', 'key', 'value', 'out'))
      for h in range(4):
        first, cols = (h // (4 // g)) * (4 // g) * D, slice(h * D, (h + 1) * D)
        rotation_qk, rotation_vo = random_rotation(rng), random_rotation(rng)
        for kernel, source in ((q, flat[f'{prefix}/query/kernel']),
                               (k, flat[f'{prefix}/key/kernel'])):
          kernel[:, cols] = source[:, first:first + D] @ rotation_qk
        v[:, cols] = flat[f'{prefix}/value/kernel'][:, first:first + D] @ rotation_vo
        o[cols] = rotation_vo.T @ flat[f'{prefix}/out/kernel'][first:first + D]
      flat.update({f'{prefix}/{p}/kernel': x for p, x in zip(('query', 'key', 'value', 'out'),
                                                              (q, k, v, o))})
  return flat


def test_exact_rotations_pool_to_the_same_function_under_aligned_not_mean(tmp_path, run_cli):
  flat = mha_params_with_rotated_groups({'decoder_self': 2, 'decoder_cross': 2})
  source = str(tmp_path / 'in')
  write_legacy_checkpoint(source, flat.items(), step=2)
  gqa = tiny_config(**GQA)
  before, outputs = logits_and_decode(tiny_config(), flat), {}
  for method in ('aligned', 'mean'):
    outputs[method] = str(tmp_path / method)
    code, err = run_cli(f'--input={source}', f'--output={outputs[method]}', f'--head_dim={D}',
                        f'--method={method}', '--num_kv_heads=2')
    assert code in (0, None), err
  aligned = logits_and_decode(gqa, read_output(outputs['aligned'])[0])
  np.testing.assert_allclose(aligned[0], before[0], rtol=1e-4, atol=1e-4)
  np.testing.assert_allclose(aligned[1], before[1], rtol=1e-4, atol=1e-4)
  np.testing.assert_array_equal(aligned[2], before[2])
  mean = logits_and_decode(gqa, read_output(outputs['mean'])[0])
  assert np.abs(mean[0] - before[0]).max() > 0.1  # mean pooling mixes the rotated heads
  with open(os.path.join(outputs['aligned'], convert.RECORD_FILE)) as f:
    record = json.load(f)
  assert record['method'] == 'aligned'
  for kind in ('decoder_self', 'decoder_cross'):
    for layer in record['alignment'][kind]:
      for projection in ('key', 'value'):
        assert layer[projection]['aligned'] < 1e-5 < 0.3 < layer[projection]['mean'], layer
  with open(os.path.join(outputs['mean'], convert.RECORD_FILE)) as f:
    assert 'alignment' not in json.load(f)


def distance(heads, pooled):
  """sqrt(sum_i ||W_i - M||^2 / sum_i ||W_i||^2) over every head i of every group."""
  residual = sum(((head - pooled[i // (len(heads) // len(pooled))]) ** 2).sum()
                 for i, head in enumerate(heads))
  return np.sqrt(residual / sum((head ** 2).sum() for head in heads))


CHECKPOINTS = {
    'random init': lambda: init_params(tiny_config()),
    'integers': lambda: handmade_params(emb=8, heads=4, head_dim=D),
    'integers bfloat16, 2 kv heads': lambda: handmade_params(
        emb=8, heads=4, head_dim=D, kv_heads={'decoder_self': 2}, dtype=ml_dtypes.bfloat16),
}


@pytest.mark.parametrize('checkpoint', CHECKPOINTS)
def test_recorded_distances_hold_and_aligned_is_never_farther_than_mean(tmp_path, checkpoint):
  flat = CHECKPOINTS[checkpoint]()
  source, output = str(tmp_path / 'in'), str(tmp_path / 'out')
  write_legacy_checkpoint(source, flat.items(), step=0)
  record = convert.convert(source, output, {'decoder_self': 1, 'decoder_cross': 2}, head_dim=D,
                           method='aligned')
  converted, _ = read_output(output)
  tolerance = 1e-4 if flat['decoder/layers_0/self_attention/query/kernel'].dtype == np.float32 \
      else 5e-2
  for kind, groups in (('decoder_self', 1), ('decoder_cross', 2)):
    for prefix, recorded in zip(attention_prefixes(flat, kind), record['alignment'][kind]):
      for projection, partner in (('key', 'query'), ('value', 'out')):
        name = f'{prefix}/{projection}/kernel'
        assert converted[name].dtype == flat[name].dtype
        before, after = flat[name].astype(np.float64), converted[name].astype(np.float64)
        turned_in = flat[f'{prefix}/{partner}/kernel'].astype(np.float64)
        turned_out = converted[f'{prefix}/{partner}/kernel'].astype(np.float64)
        k, heads_per_kv = before.shape[1] // D, 4 // (before.shape[1] // D)
        heads, unrotated = [], []
        for i in range(k):
          block = slice(i * heads_per_kv * D, (i * heads_per_kv + 1) * D)  # its first query head
          if partner == 'query':  # W_q' = W_q R
            rotation = np.linalg.lstsq(turned_in[:, block], turned_out[:, block], rcond=None)[0]
          else:  # W_o' = R^T W_o
            rotation = np.linalg.lstsq(turned_in[block].T, turned_out[block].T, rcond=None)[0]
          np.testing.assert_allclose(rotation.T @ rotation, np.eye(D), atol=tolerance)
          unrotated.append(before[:, i * D:(i + 1) * D])
          heads.append(unrotated[-1] @ rotation)
        pooled = [after[:, j * D:(j + 1) * D] for j in range(groups)]
        mean = [np.mean(unrotated[j * k // groups:(j + 1) * k // groups], axis=0)
                for j in range(groups)]
        np.testing.assert_allclose(recorded[projection]['aligned'], distance(heads, pooled),
                                   rtol=tolerance, atol=tolerance)
        np.testing.assert_allclose(recorded[projection]['mean'], distance(unrotated, mean),
                                   rtol=1e-6)
        assert recorded[projection]['aligned'] <= recorded[projection]['mean']
