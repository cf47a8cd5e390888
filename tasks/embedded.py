"""Embedded tasks that need no download (corpus.py): for CPU runs, tests and the README demo.

They use `vocab.embedded_vocabulary` (by default a small SentencePiece model trained on the
corpus and cached), so a tiny model can run them on a CPU.
"""
import logging

import seqio
import tensorflow as tf

from gqa_t5x import metrics
from gqa_t5x.tasks import corpus
from gqa_t5x.tasks import preprocessors
from gqa_t5x.tasks import span_corruption
from gqa_t5x.tasks import vocab


class _ReplayedShufflingFilter(logging.Filter):
  """Drops seqio's warning that an uncached FunctionDataset shuffles differently after a restart:
  these tasks are small and in memory, and a resumed run replays its data position exactly."""

  def filter(self, record: logging.LogRecord) -> bool:
    return not str(record.msg).startswith("Using an uncached FunctionDataset for training")


logging.getLogger("absl").addFilter(_ReplayedShufflingFilter())  # seqio logs through absl's

VOCABULARY = vocab.DeferredVocabulary(vocab.embedded_vocabulary)
OUTPUT_FEATURES = {
    "inputs": seqio.Feature(VOCABULARY, add_eos=True, required=False),
    "targets": seqio.Feature(VOCABULARY, add_eos=True),
}


def _documents(split, shuffle_files, seed=None):
  del shuffle_files, seed  # one in-memory source; the task shuffles examples
  return tf.data.Dataset.from_tensor_slices({"targets": corpus.documents(split)})


def _module_questions(split, shuffle_files, seed=None):
  del shuffle_files, seed
  questions, modules = zip(*corpus.module_qa_examples(split))
  return tf.data.Dataset.from_tensor_slices({
      "inputs": list(questions), "targets": list(modules), "answers": [[m] for m in modules]})


def _lead_summaries(split, shuffle_files, seed=None):
  del shuffle_files, seed
  paragraphs, first_sentences = zip(*corpus.lead_summary_pairs(split))
  return tf.data.Dataset.from_tensor_slices({
      "inputs": ["summarize: " + p for p in paragraphs], "targets": list(first_sentences)})


seqio.TaskRegistry.add(
    "gqa_embedded_span_corruption",
    source=seqio.FunctionDataSource(_documents, splits=corpus.SPLITS),
    preprocessors=span_corruption.token_preprocessors(),
    output_features=OUTPUT_FEATURES,
    metric_fns=[])


def _add_text_task(name, source, metric_fn, postprocess_fn=None):
  """A task whose in-memory source already holds 'inputs' and 'targets' text."""
  preprocessors.add_text_to_text_task(
      name, seqio.FunctionDataSource(source, splits=corpus.SPLITS), OUTPUT_FEATURES, metric_fn,
      postprocess_fn=postprocess_fn)


_add_text_task("gqa_embedded_module_qa", _module_questions, metrics.trivia_qa,
               postprocess_fn=preprocessors.trivia_qa_postprocess)
_add_text_task("gqa_embedded_lead_summary", _lead_summaries, metrics.rouge)

# T5's multi-task pre-training (Raffel et al. 2020, section 3.7): span corruption and the
# downstream task, sampled equally. A tiny model given minutes learns no task from scratch in a
# short fine-tuning (it collapses to one answer), so the CPU reproduction builds the skill in
# the one shared pre-training run and fine-tunes from there.
seqio.MixtureRegistry.add(
    "gqa_embedded_multitask",
    [("gqa_embedded_span_corruption", 1.0), ("gqa_embedded_module_qa", 1.0)])
