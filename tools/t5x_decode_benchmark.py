#!/usr/bin/env python3
"""Greedy decode through T5X against gqa_t5x's own greedy_decode, on the same model and inputs.

  python tools/t5x_decode_benchmark.py [--kv_heads=6] [--batch=8] [--inputs=512] [--targets=64]

Needs T5X (tools/install_t5x.sh). Decodes with T5X's `EncoderDecoderModel.predict_batch` and
`t5x.decoding.temperature_sample` at temperature 0 (what gin_configs/t5x binds), once with
gqa_t5x.t5x_models.EncoderDecoderModel (cross-attention caches filled before the loop) and once
with T5X's stock model (filled at the first step behind a lax.cond), and with
gqa_t5x.decoding.greedy_decode. Random T5.1.1-Small-shaped parameters by default. The three are
compiled first, then timed interleaved, `--repeats` times each; medians and ratios to
greedy_decode are printed (and written as JSON with --output). All three must agree token for
token.
"""
import argparse
import functools
import json
import os
import statistics
import sys
import time

import jax
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# pylint: disable=wrong-import-position
import seqio
from t5x import decoding as t5x_decoding
from t5x import models as t5x_models_lib

from gqa_t5x import decoding, t5x_models
from gqa_t5x.network import T5Config, Transformer


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
  for name, default in (('emb_dim', 512), ('num_heads', 6), ('kv_heads', 6), ('layers', 8),
                        ('mlp_dim', 1024), ('head_dim', 64), ('vocab', 32128), ('batch', 8),
                        ('inputs', 512), ('targets', 64), ('repeats', 5)):
    parser.add_argument(f'--{name}', type=int, default=default)
  parser.add_argument('--output', default=None, help='also write the figures as JSON here')
  args = parser.parse_args()

  module = Transformer(T5Config(
      vocab_size=args.vocab, emb_dim=args.emb_dim, num_heads=args.num_heads,
      num_encoder_layers=args.layers, num_decoder_layers=args.layers, head_dim=args.head_dim,
      mlp_dim=args.mlp_dim, dropout_rate=0.0, num_decoder_self_kv_heads=args.kv_heads,
      num_decoder_cross_kv_heads=args.kv_heads))
  rng = np.random.default_rng(0)
  inputs = rng.integers(2, args.vocab, (args.batch, args.inputs)).astype(np.int32)
  batch = {'encoder_input_tokens': inputs,
           'decoder_input_tokens': np.zeros((args.batch, args.targets), np.int32)}
  params = jax.jit(lambda: module.init(jax.random.key(0), inputs[:1, :1], inputs[:1, :1],
                                       inputs[:1, :1], enable_dropout=False)['params'])()
  vocabulary = seqio.PassThroughVocabulary(args.vocab, eos_id=1)
  greedy = functools.partial(t5x_decoding.temperature_sample, temperature=0.0)

  def t5x_path(model_class):
    model = model_class(module, vocabulary, vocabulary, optimizer_def=None, decode_fn=greedy)
    return jax.jit(model.predict_batch).lower(params, batch).compile()

  decoders = {
      'greedy_decode': functools.partial(decoding.greedy_decode.lower(
          module, params, inputs, args.targets).compile(), params, inputs),
      'gqa_t5x.t5x_models': functools.partial(
          t5x_path(t5x_models.EncoderDecoderModel), params, batch),
      't5x.models (stock)': functools.partial(
          t5x_path(t5x_models_lib.EncoderDecoderModel), params, batch),
  }
  tokens = {name: np.asarray(decode()) for name, decode in decoders.items()}
  for name, value in tokens.items():
    np.testing.assert_array_equal(value, tokens['greedy_decode'], err_msg=name)
  seconds = {name: [] for name in decoders}
  for _ in range(args.repeats):
    for name, decode in decoders.items():
      begin = time.perf_counter()
      jax.block_until_ready(decode())
      seconds[name].append(time.perf_counter() - begin)
  base = statistics.median(seconds['greedy_decode'])
  rows = {}
  for name, times in seconds.items():
    median = statistics.median(times)
    rows[name] = {'median_s': round(median, 4), 'ratio': round(median / base, 3)}
    print(f'{name:>20}: {1000 * median:8.1f} ms per batch  ({median / base:.3f}x greedy_decode)')
  if args.output:
    with open(args.output, 'w') as f:
      json.dump({'config': vars(args), 'results': rows}, f, indent=1)


if __name__ == '__main__':
  main()
