"""Teacher-forced held-out scoring against numpy; one Trainer reused across runs equals a fresh
Trainer per run (the reproduction's shared compiled steps change no number)."""
import json

import gin
import jax
import numpy as np
import pytest
import seqio

from gqa_t5x import checkpointing, data, gin_utils, optimizers, partitioning, runs
from gqa_t5x.network import T5Config, Transformer
from gqa_t5x.train_eval import TrainEvaluation
from gqa_t5x.trainer import Trainer
from tests import runner_helpers as helpers

TASK = 'gqa_embedded_span_corruption'
LENGTHS = {'inputs': 32, 'targets': 8}


def _trainer(kv_heads=2):
  config = T5Config(vocab_size=1152, emb_dim=32, num_heads=4, num_encoder_layers=1,
                    num_decoder_layers=1, head_dim=8, mlp_dim=32, dropout_rate=0.0,
                    num_decoder_self_kv_heads=kv_heads, num_decoder_cross_kv_heads=kv_heads)
  model = Transformer(config)
  return Trainer(model, optimizers.adafactor(optimizers.rsqrt_schedule(1.0, 10)),
                 partitioning.Partitioner(1, kv_head_counts=config.kv_head_counts))


def _numpy_scores(model, params, examples):
  """Cross entropy and accuracy over every non-padding target token, example by example."""
  loss = correct = tokens = 0.0
  for ex in examples:
    batch = {k: v[None] for k, v in ex.items()}
    logits = np.asarray(model.apply(
        {'params': params}, batch['encoder_input_tokens'], batch['decoder_input_tokens'],
        batch['decoder_target_tokens'], encoder_segment_ids=batch['encoder_segment_ids'],
        decoder_segment_ids=batch['decoder_segment_ids'],
        encoder_positions=batch['encoder_positions'],
        decoder_positions=batch['decoder_positions'], enable_dropout=False), np.float64)[0]
    targets, weights = ex['decoder_target_tokens'], ex['decoder_loss_weights'].astype(float)
    log_probs = logits - np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1,
                                keepdims=True)) - logits.max(-1, keepdims=True)
    loss -= (np.take_along_axis(log_probs, targets[:, None], -1)[:, 0] * weights).sum()
    correct += ((logits.argmax(-1) == targets) * weights).sum()
    tokens += weights.sum()
  return loss / tokens, correct / tokens


def test_held_out_scores_equal_numpy_over_every_example_with_a_padded_last_batch():
  trainer = _trainer()
  # 16 rows per batch over the 8 CPU devices of conftest; the last batch is padded.
  cfg = data.DatasetConfig(TASK, LENGTHS, 'validation', batch_size=16, shuffle=False, pack=True,
                           module='gqa_t5x.tasks')
  scorer = TrainEvaluation(trainer, cfg)
  assert scorer.num_examples % 16
  params = trainer.init_state(seed=3).params
  got = scorer.run(params, step=0)
  converted = seqio.EncDecFeatureConverter(pack=True)(
      data.get_task(cfg).get_dataset(LENGTHS, split='validation', shuffle=False, num_epochs=1,
                                     seed=cfg.seed),  # span corruption's masks follow the seed
      LENGTHS)
  examples = list(converted.as_numpy_iterator())
  assert len(examples) == scorer.num_examples
  loss, accuracy = _numpy_scores(trainer.model, params, examples)
  assert got[f'train_eval/{TASK}/cross_entropy'] == pytest.approx(loss, rel=1e-5)
  assert got[f'train_eval/{TASK}/accuracy'] == pytest.approx(accuracy, abs=1e-9)
  assert got[f'train_eval/{TASK}/num_tokens'] == sum(
      ex['decoder_loss_weights'].sum() for ex in examples)


def _fit(trainer, model_dir, seed, initial):
  cfg = data.DatasetConfig(TASK, LENGTHS, 'train', batch_size=8, seed=seed, pack=True,
                           module='gqa_t5x.tasks')
  state, _ = runs.fit(trainer, cfg, initial[1] + 3, model_dir, optimizers.rsqrt_schedule(1.0, 10),
                      checkpoint_cfg=checkpointing.CheckpointConfig(save_period=100),
                      initial_params=initial, random_seed=seed, log_period=3)
  return jax.tree.map(np.asarray, state.params)


def test_one_trainer_reused_across_seeds_equals_a_fresh_trainer_per_run(tmp_path):
  start = _trainer().init_state(seed=0, step=5)
  initial = (jax.tree.map(np.asarray, start.params), 5)
  shared = _trainer()
  reused = [_fit(shared, str(tmp_path / f'shared{s}'), s, initial) for s in (1, 2)]
  fresh = [_fit(_trainer(), str(tmp_path / f'fresh{s}'), s, initial) for s in (1, 2)]
  for a, b in zip(reused, fresh):
    jax.tree.map(np.testing.assert_array_equal, a, b)
  with pytest.raises(AssertionError):  # the seed does change the run (data order)
    jax.tree.map(np.testing.assert_array_equal, reused[0], reused[1])


def test_eval_period_scores_held_out_loss_and_skips_decoding_for_a_task_without_metrics(
    tmp_path):
  flags = helpers.tiny_train_flags(str(tmp_path), TRAIN_STEPS=4, EVAL_PERIOD=2,
                                   EVAL_BATCH_SIZE=16)
  files, bindings = [], []
  for flag in gin_utils.rewrite_gin_args(flags):
    name, value = flag[2:].split('=', 1)
    (files if name == 'gin_file' else bindings).append(value)
  gin_utils.parse_gin(files, bindings, gin_utils.DEFAULT_SEARCH_PATHS)
  gin.get_configurable(runs.train)()
  rows = [json.loads(line) for line in open(tmp_path / 'train' / 'metrics.jsonl')]
  scored = [r for r in rows if f'train_eval/{TASK}/cross_entropy' in r]
  assert [r['step'] for r in scored] == [2, 4]
  assert all(0 < r[f'train_eval/{TASK}/cross_entropy'] < 10 for r in scored)
  assert not (tmp_path / 'inference_eval').exists()  # span corruption has no metrics to decode
