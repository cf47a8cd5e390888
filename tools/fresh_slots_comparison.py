r"""Uptraining loss with and without T5X's step_offset for the Adafactor slots that start fresh.

After a conversion the pooled key/value kernels have no Adafactor statistics; the others keep the
checkpoint's. At step 1M a fresh slot under the checkpoint step's decay (1 - t^-0.8) mixes in
only 1.6e-5 of each new squared gradient, so its estimate stays near zero and every update of
those kernels is clipped; with step_offset it decays as from step 0. This tool measures both on
the tiny model:
  1. pre-train an MHA model on the embedded span-corruption task from step 998,000 to 1,000,000
     (so the checkpoint, like T5.1.1's, sits at step 1M with trained slots);
  2. convert it to MQA with gqa-t5x-convert (slots carried for every unchanged parameter);
  3. uptrain the converted checkpoint for --steps steps twice, STEP_OFFSET_FRESH_SLOTS True and
     False, same seed and data, and write both loss curves (markdown table and PNG).

  .venv/bin/python tools/fresh_slots_comparison.py --work_dir=/tmp/fresh_slots \
      --output=docs/fresh_slots.md
"""
import argparse
import json
import os

import gin
import jax
import numpy as np
import orbax.checkpoint as ocp

from gqa_t5x import convert, gin_utils, runs
from gqa_t5x.network import T5Config, Transformer

START, CHECKPOINT = 998_000, 1_000_000
LENGTHS = "{'inputs': 64, 'targets': 16}"


def train(model_dir: str, **macros) -> None:
  settings = dict(MIXTURE_OR_TASK_NAME='"gqa_embedded_span_corruption"',
                  TASK_FEATURE_LENGTHS=LENGTHS, MODEL_DIR=f'"{model_dir}"', BATCH_SIZE=16,
                  BASE_LEARNING_RATE=10.0,  # 10 / sqrt(1M) = 0.01 around step 1M
                  LOG_PERIOD=10, SAVING_PERIOD=100_000, **macros)
  gin_utils.parse_gin(['models/t5_1_1/tiny.gin', 'runs/pretrain.gin'],
                      [f'{name} = {value}' for name, value in settings.items()])
  try:
    gin.get_configurable(runs.train)()
  finally:
    gin.clear_config()


def losses(model_dir: str) -> dict[int, float]:
  with open(os.path.join(model_dir, 'train', 'metrics.jsonl')) as f:
    return {row['step']: row['loss'] for row in map(json.loads, f)}


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--work_dir', required=True)
  parser.add_argument('--output', required=True, help='markdown file to write (PNG beside it)')
  parser.add_argument('--steps', type=int, default=300, help='uptraining steps per run')
  parser.add_argument('--kv_heads', type=int, default=1, help='G of the converted model')
  args = parser.parse_args()

  random_start = os.path.join(args.work_dir, f'random/checkpoint_{START}')
  if not os.path.exists(random_start):
    config = T5Config(vocab_size=1152, emb_dim=128, num_heads=8, num_encoder_layers=2,
                      num_decoder_layers=2, head_dim=16, mlp_dim=256)
    tokens = np.ones((1, 1), np.int32)
    params = Transformer(config).init(jax.random.key(0), tokens, tokens, tokens,
                                      enable_dropout=False)['params']
    ocp.PyTreeCheckpointer().save(os.path.join(random_start, 'state'),
                                  {'target': params, 'state': {'step': np.int32(START)}})
  mha_dir = os.path.join(args.work_dir, 'mha')
  print(f'1/3 pre-training MHA, steps {START}..{CHECKPOINT}', flush=True)
  train(mha_dir, NUM_KV_HEADS=8, TRAIN_STEPS=CHECKPOINT,
        INITIAL_CHECKPOINT_PATH=f'"{random_start}"')
  converted = os.path.join(args.work_dir, f'converted/checkpoint_{CHECKPOINT}')
  if not os.path.exists(converted):
    print(f'2/3 converting to {args.kv_heads} kv heads', flush=True)
    record = convert.convert(os.path.join(mha_dir, f'checkpoint_{CHECKPOINT}'), converted,
                             {'decoder_self': args.kv_heads, 'decoder_cross': args.kv_heads},
                             head_dim=16)
    print(f"   slots carried for {record['optimizer_slots']['carried_for']} parameters, fresh "
          f"for {len(record['optimizer_slots']['fresh_for'])}", flush=True)
  curves = {}
  for offset in (True, False):
    print(f'3/3 uptraining {args.steps} steps, STEP_OFFSET_FRESH_SLOTS={offset}', flush=True)
    run_dir = os.path.join(args.work_dir, f'uptrain_offset_{offset}')
    train(run_dir, NUM_KV_HEADS=args.kv_heads, TRAIN_STEPS=CHECKPOINT + args.steps,
          INITIAL_CHECKPOINT_PATH=f'"{converted}"', STEP_OFFSET_FRESH_SLOTS=offset)
    curves[offset] = losses(run_dir)
  write_report(args, curves)


def write_report(args, curves: dict[bool, dict[int, float]]) -> None:
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  steps = sorted(curves[True])
  figure, axis = plt.subplots(figsize=(6, 3.5))
  for offset, label in ((True, 'fresh slots with step_offset (default)'),
                        (False, 'fresh slots at the step-1M decay')):
    axis.plot([s - CHECKPOINT for s in steps], [curves[offset][s] for s in steps], label=label)
  axis.set(xlabel=f'uptraining step (after step {CHECKPOINT:,})',
           ylabel='training loss (sum over tokens)',
           title=f'Tiny T5.1.1, MHA -> {args.kv_heads} kv heads, uptraining')
  axis.legend()
  png = os.path.splitext(args.output)[0] + '.png'
  figure.savefig(png, bbox_inches='tight', dpi=120)

  def window(offset, last):
    values = [curves[offset][s] for s in steps if s > CHECKPOINT + args.steps - last]
    return sum(values) / len(values)

  rows = [f'| {s - CHECKPOINT} | {curves[True][s]:.2f} | {curves[False][s]:.2f} |'
          for s in steps if (s - CHECKPOINT) % 50 == 0 or s == steps[0]]
  text = '\n'.join([
      '# Fresh Adafactor slots after a conversion: with and without step_offset',
      '',
      f'Measured by `tools/fresh_slots_comparison.py --steps={args.steps} '
      f'--kv_heads={args.kv_heads}`: the tiny model (d_model 128, 8 heads, 2+2 layers),',
      f'pre-trained as MHA on the embedded span-corruption task to step {CHECKPOINT:,},',
      f'converted to {args.kv_heads} kv heads (slots carried for every unchanged parameter),',
      f'then uptrained {args.steps} steps (batch 16, learning rate 0.01) twice from the same',
      'checkpoint with the same data and seed. Loss per step, mean over each 10-step window:',
      '',
      '| uptraining step | step_offset for fresh slots | step-1M decay for fresh slots |',
      '|---|---|---|',
      *rows,
      '',
      f'Mean over the last 100 steps: {window(True, 100):.3f} (step_offset) vs '
      f'{window(False, 100):.3f} (step-1M decay).',
      '',
      f'![loss curves]({os.path.basename(png)})',
      ''])
  os.makedirs(os.path.dirname(args.output) or '.', exist_ok=True)
  with open(args.output + '.tmp', 'w') as f:
    f.write(text)
  os.replace(args.output + '.tmp', args.output)
  print(text)


if __name__ == '__main__':
  main()
