"""The three jobs the drivers run: train, evaluate, infer. Gin configures every argument."""
import json
import os
from typing import Any, Callable, Collection, Optional, Sequence

from absl import logging
from flax import linen as nn
import jax
import optax

from gqa_t5x import checkpointing, data, files, summaries
from gqa_t5x.evaluation import Evaluation
from gqa_t5x.partitioning import Partitioner
from gqa_t5x.predicting import Predictor
from gqa_t5x.train_eval import TrainEvaluation
from gqa_t5x.trainer import Progress, Trainer, TrainState, abstract_params, format_eta, to_host

PyTree = Any


def _partitioner(factory: Callable[..., Partitioner], model: nn.Module) -> Partitioner:
  partitioner = factory(kv_head_counts=model.config.kv_head_counts)
  logging.info('Mesh %s over %d devices in %d processes', dict(partitioner.mesh.shape),
               jax.device_count(), jax.process_count())
  return partitioner


def train(*, model: nn.Module, train_dataset_cfg: data.DatasetConfig, train_steps: int,
          model_dir: str, learning_rate: optax.Schedule,
          optimizer: Callable[[optax.Schedule], optax.GradientTransformation],
          partitioner: Callable[..., Partitioner] = Partitioner,
          checkpoint_cfg: checkpointing.CheckpointConfig = checkpointing.CheckpointConfig(),
          initial_checkpoint_path: Optional[str] = None, random_seed: int = 0,
          z_loss: float = 1e-4, label_smoothing: float = 0.0,
          loss_normalizing_factor: Optional[float] = None,
          num_microbatches: Optional[int] = None, step_offset_fresh_slots: bool = True,
          log_period: int = 100,
          eval_period: Optional[int] = None,
          infer_eval_dataset_cfg: Optional[data.DatasetConfig] = None,
          train_eval_dataset_cfg: Optional[data.DatasetConfig] = None) -> TrainState:
  """Trains to `train_steps` total steps, resuming from MODEL_DIR's newest checkpoint if any.

  Without a checkpoint in MODEL_DIR it starts from INITIAL_CHECKPOINT_PATH's parameters (and its
  step, as T5X does: TRAIN_STEPS counts the steps already taken) or from random ones. Every
  EVAL_PERIOD steps it scores the model as T5X does: greedy decoding on the infer-eval task's
  metrics, and teacher-forced loss and accuracy on the train-eval task.
  """
  mesh_partitioner = _partitioner(partitioner, model)
  trainer = Trainer(model, optimizer(learning_rate), mesh_partitioner, z_loss=z_loss,
                    label_smoothing=label_smoothing,
                    loss_normalizing_factor=loss_normalizing_factor,
                    num_microbatches=num_microbatches,
                    step_offset_fresh_slots=step_offset_fresh_slots)
  evaluators = []
  if eval_period and infer_eval_dataset_cfg and data.has_metrics(infer_eval_dataset_cfg):
    evaluators.append(Evaluation(model, infer_eval_dataset_cfg, mesh_partitioner,
                                 os.path.join(model_dir, 'inference_eval')))
  if eval_period and train_eval_dataset_cfg:
    evaluators.append(TrainEvaluation(trainer, train_eval_dataset_cfg))
  state, _ = fit(trainer, train_dataset_cfg, train_steps, model_dir, learning_rate,
                 checkpoint_cfg=checkpoint_cfg, initial_checkpoint_path=initial_checkpoint_path,
                 random_seed=random_seed, log_period=log_period, eval_period=eval_period,
                 evaluators=evaluators)
  return state


def fit(trainer: Trainer, dataset: data.DatasetConfig | data.Batches, train_steps: int,
        model_dir: str, learning_rate: optax.Schedule, *,
        checkpoint_cfg: checkpointing.CheckpointConfig = checkpointing.CheckpointConfig(),
        initial_checkpoint_path: Optional[str] = None,
        initial_params: Optional[tuple[PyTree, int]] = None, random_seed: int = 0,
        log_period: int = 100, eval_period: Optional[int] = None,
        eval_steps: Collection[int] = (),
        evaluators: Sequence = ()) -> tuple[TrainState, dict[int, dict[str, float]]]:
  """The training loop of `train`, on a Trainer built once and reused across runs.

  `dataset` is a DatasetConfig, whose pipeline is built here, or process-local Batches at the
  data's first batch (e.g. the reproduction's runs that read the same data replay one made-once
  sequence instead of each building and filling the same pipeline). The run starts from
  MODEL_DIR's newest checkpoint, else from `initial_params` (parameters and their step, already
  in memory), else from `initial_checkpoint_path`, else from random parameters. From a
  checkpoint path, the Adafactor slots stored for parameters of the same shapes are restored
  too (T5X's fine-tuning restores them); the others start fresh (see Trainer's
  step_offset_fresh_slots). `evaluators` (objects with `run(params, step) -> scores`) run every
  `eval_period` steps and at `eval_steps`; returns the final state and {step: scores} of this
  call's evaluations.
  """
  manager = checkpointing.manager(model_dir, checkpoint_cfg)
  restored = checkpointing.restore_latest(manager, trainer.abstract_state.to_checkpoint())
  if restored is not None:
    state = TrainState.from_checkpoint(restored)
    logging.info('Resumed from %s at step %d', model_dir, int(state.step))
  elif initial_params is not None:
    state = trainer.init_state(random_seed, *initial_params)
  elif initial_checkpoint_path:
    params, step = checkpointing.load_params(
        initial_checkpoint_path, trainer.abstract_state.params, 'INITIAL_CHECKPOINT_PATH')
    slots = checkpointing.load_slots(initial_checkpoint_path, trainer.slot_shapes,
                                     'INITIAL_CHECKPOINT_PATH')
    state = trainer.init_state(random_seed, params=params, step=step or 0, slots=slots)
    logging.info('Initialised from %s (step %d); Adafactor slots restored for %d of %d '
                 'parameters, the others start fresh', initial_checkpoint_path, int(state.step),
                 len(slots), len(trainer.slot_shapes))
  else:
    state = trainer.init_state(random_seed)
  step, scores = int(state.step), {}
  if step >= train_steps:
    logging.info('Step %d already reaches TRAIN_STEPS=%d; nothing to train.', step, train_steps)
    manager.close()
    return state, scores

  partitioner = trainer.partitioner
  if isinstance(dataset, data.DatasetConfig):
    batches = data.train_batches(dataset, data.process_shard(partitioner.mesh))
  else:
    batches = dataset
  if restored is not None:
    checkpointing.restore_dataset(manager, manager.latest_step(), batches)
    logging.info('Input pipeline of process %d restored at batch %d of data shard %d/%d',
                 jax.process_index(), batches.position, batches.shard.index,
                 batches.shard.num_shards)
  writer = summaries.create_writer(os.path.join(model_dir, 'train'), 'metrics.jsonl')
  progress, window = Progress(step, train_steps), None
  while step < train_steps:
    state, metrics = trainer.train_step(state, partitioner.shard_batch(next(batches)),
                                        random_seed)
    step += 1
    window = metrics if window is None else jax.tree.map(lambda a, b: a + b, window, metrics)
    if step % log_period == 0 or step == train_steps:
      report = _window_report(to_host(window), step, learning_rate, progress)
      writer.write_scalars(step, report)
      logging.info('step %d/%d  loss %.4f  %.2f steps/s  %.0f tokens/s  ETA %s', step,
                   train_steps, report['loss'], report['timing/steps_per_second'],
                   report['timing/target_tokens_per_second'],
                   format_eta(report['timing/eta_seconds']))
      window = None
    checkpointing.save(manager, step, state.to_checkpoint(), batches, force=step == train_steps)
    if evaluators and (step in eval_steps or eval_period and step % eval_period == 0):
      scores[step] = {k: v for e in evaluators for k, v in e.run(state.params, step).items()}
      writer.write_scalars(step, scores[step])
  manager.wait_until_finished()
  manager.close()
  writer.close()
  return state, scores


def _window_report(window: dict, step: int, learning_rate: optax.Schedule,
                   progress: Progress) -> dict[str, float]:
  """Per-step means over the reporting window, plus the learning rate and timing."""
  progress.add_tokens(window.pop('num_tokens'))
  steps = step - progress.last_step
  report = {name: value / steps for name, value in window.items()}
  report['learning_rate'] = float(learning_rate(step - 1))
  report.update(progress.report(step))
  return report


def evaluate(*, model: nn.Module, dataset_cfg: data.DatasetConfig, checkpoint_path: str,
             output_dir: str, partitioner: Callable[..., Partitioner] = Partitioner
             ) -> dict[int, dict[str, float]]:
  """Scores every checkpoint under CHECKPOINT_PATH (or the one it names) on the task's metrics."""
  checkpoints = checkpointing.list_checkpoints(checkpoint_path)
  mesh_partitioner = _partitioner(partitioner, model)
  params_abstract, _ = abstract_params(model, mesh_partitioner)
  evaluation = Evaluation(model, dataset_cfg, mesh_partitioner, output_dir)
  writer = summaries.create_writer(output_dir, 'eval_metrics.jsonl')
  scores = {}
  for path in checkpoints:
    params, step = checkpointing.load_params(path, params_abstract, 'CHECKPOINT_PATH')
    scores[step] = evaluation.run(params, step or 0)
    writer.write_scalars(step or 0, scores[step])
  writer.close()
  return scores


def infer(*, model: nn.Module, dataset_cfg: data.DatasetConfig, checkpoint_path: str,
          output_dir: str, partitioner: Callable[..., Partitioner] = Partitioner) -> str:
  """Writes one JSON line per input of the split: inputs, targets, prediction. Returns the path."""
  mesh_partitioner = _partitioner(partitioner, model)
  params_abstract, _ = abstract_params(model, mesh_partitioner)
  params, step = checkpointing.load_params(checkpoint_path, params_abstract, 'CHECKPOINT_PATH')
  task = data.get_task(dataset_cfg)
  examples = data.model_inputs(task, dataset_cfg)
  lengths = dict(dataset_cfg.task_feature_lengths)
  predictor = Predictor(model, mesh_partitioner, dataset_cfg.batch_size,
                        max_decode_length=lengths['targets'])
  tokens, timing = predictor.predict(
      params, data.pad_rows([ex['inputs'] for ex in examples], lengths['inputs']))
  logging.info('T_infer: %.3f ms per sample (%d samples, greedy, compile excluded)',
               timing.ms_per_sample, timing.num_samples)
  path = os.path.join(output_dir, f'{dataset_cfg.mixture_or_task_name}-{dataset_cfg.split}-'
                      f'{step or 0}.jsonl')
  if jax.process_index() == 0:
    vocab = task.output_features['targets'].vocabulary
    rows = [{'inputs': _text(ex, 'inputs', task), 'targets': _text(ex, 'targets', task),
             'prediction': vocab.decode(row.tolist())} for ex, row in zip(examples, tokens)]
    files.write_text(path, ''.join(json.dumps(r) + '\n' for r in rows))
    writer = summaries.create_writer(output_dir, 'infer_metrics.jsonl')
    writer.write_scalars(step or 0, {'timing/decode_ms_per_sample': timing.ms_per_sample})
    writer.close()
  return path


def _text(example: dict, feature: str, task) -> str:
  """The example's original text if the task kept it, else its tokens decoded."""
  if f'{feature}_pretokenized' in example:
    return example[f'{feature}_pretokenized'].decode('utf-8')
  return task.output_features[feature].vocabulary.decode(example[feature].tolist())
