"""Teacher-forced loss and token accuracy on a held-out split (T5X's `train_eval`).

Greedy decoding scores a model only through the tokens it emits, which at small scale can hide
large differences (two models collapsing to the same output score the same). The per-token
cross entropy of the reference targets moves with every change of the model, so it is the
sensitive measure of what a conversion costs and what uptraining recovers (the GQA paper's
Figures 4 and 5 at a scale where downstream scores are coarse).
"""
from typing import Any

from flax import linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import seqio

from gqa_t5x import data, losses
from gqa_t5x.trainer import Trainer

PyTree = Any
_FEATURES = ('encoder_input_tokens', 'decoder_input_tokens', 'decoder_target_tokens',
             'decoder_loss_weights', 'encoder_segment_ids', 'decoder_segment_ids',
             'encoder_positions', 'decoder_positions')


class TrainEvaluation:
  """Scores parameters on every example of `cfg.split`, read once and kept in memory.

  Every process reads the whole split and feeds the same global batches, so the number of
  batches agrees across processes; the last batch is padded with zero-weight rows.
  """

  def __init__(self, trainer: Trainer, cfg: data.DatasetConfig):
    task = data.get_task(cfg)
    self.prefix = f'train_eval/{cfg.mixture_or_task_name}'
    converter = seqio.EncDecFeatureConverter(pack=cfg.pack)
    ds = converter(task.get_dataset(dict(cfg.task_feature_lengths), split=cfg.split,
                                    shuffle=False, num_epochs=1, use_cached=cfg.use_cached,
                                    seed=cfg.seed), dict(cfg.task_feature_lengths))
    examples = list(ds.as_numpy_iterator())
    if not examples:
      raise ValueError(f'{cfg.mixture_or_task_name} has no {cfg.split} examples to score')
    self.num_examples = len(examples)
    self._batches = [_stack(examples[i:i + cfg.batch_size], cfg.batch_size)
                     for i in range(0, len(examples), cfg.batch_size)]
    self._partitioner = trainer.partitioner
    self._model = trainer.model
    self._sums = jax.jit(self._batch_sums, in_shardings=(
        trainer.state_shardings.params, trainer.partitioner.batch_sharding),
                         out_shardings=trainer.partitioner.replicated)

  def _batch_sums(self, params: PyTree, batch: dict) -> jax.Array:
    logits = self._model.apply(
        {'params': params}, batch['encoder_input_tokens'], batch['decoder_input_tokens'],
        batch['decoder_target_tokens'], encoder_segment_ids=batch.get('encoder_segment_ids'),
        decoder_segment_ids=batch.get('decoder_segment_ids'),
        encoder_positions=batch.get('encoder_positions'),
        decoder_positions=batch.get('decoder_positions'), enable_dropout=False)
    targets, weights = batch['decoder_target_tokens'], batch['decoder_loss_weights']
    token_loss, token_z_loss = losses.cross_entropy_with_z_loss(logits, targets, z_loss=0.0)
    correct = (jnp.argmax(logits, axis=-1) == targets).astype(jnp.float32)
    weights = weights.astype(jnp.float32)
    return jnp.stack([jnp.sum((token_loss - token_z_loss) * weights),
                      jnp.sum(correct * weights), jnp.sum(weights)])

  def run(self, params: PyTree, step: int) -> dict[str, float]:
    """{'train_eval/<task>/cross_entropy': nats per target token, '.../accuracy': 0..1}."""
    del step  # the scores depend on the parameters only
    total = np.zeros(3, np.float64)
    sharding = self._partitioner.batch_sharding
    with jax.set_mesh(self._partitioner.mesh), nn.logical_axis_rules(self._partitioner.rules):
      for batch in self._batches:
        arrays = {k: jax.make_array_from_callback(v.shape, sharding, lambda i, v=v: v[i])
                  for k, v in batch.items()}
        total += np.asarray(self._sums(params, arrays), np.float64)
    loss, correct, tokens = total
    return {f'{self.prefix}/cross_entropy': loss / tokens,
            f'{self.prefix}/accuracy': correct / tokens,
            f'{self.prefix}/num_tokens': tokens}


def _stack(examples: list[dict], batch_size: int) -> dict[str, np.ndarray]:
  """Stacks feature dicts into [batch_size, ...] arrays, padding missing rows with zeros."""
  out = {}
  for name in _FEATURES:
    if name in examples[0]:
      rows = np.stack([ex[name] for ex in examples]).astype(np.int32)
      padded = np.zeros((batch_size,) + rows.shape[1:], np.int32)
      padded[:len(rows)] = rows
      out[name] = padded
  return out
