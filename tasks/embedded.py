"""Embedded tasks that need no download (corpus.py): for CPU runs, tests and the README demo.

They use `vocab.embedded_vocabulary` (by default a small SentencePiece model trained on the
corpus and cached), so a tiny model can run them on a CPU.
"""
import seqio
import tensorflow as tf

from gqa_t5x import metrics
from gqa_t5x.tasks import corpus
from gqa_t5x.tasks import preprocessors
from gqa_t5x.tasks import span_corruption
from gqa_t5x.tasks import vocab

VOCABULARY = vocab.DeferredVocabulary(vocab.embedded_vocabulary)
OUTPUT_FEATURES = {
    "inputs": seqio.Feature(VOCABULARY, add_eos=True, required=False),
    "targets": seqio.Feature(VOCABULARY, add_eos=True),
}


def _documents(split, shuffle_files, seed=None):
  del shuffle_files, seed  # one in-memory source; the task shuffles examples
  return tf.data.Dataset.from_tensor_slices({"targets": corpus.documents(split)})


def _cloze_questions(split, shuffle_files, seed=None):
  del shuffle_files, seed
  questions, answers = zip(*corpus.cloze_qa_examples(split))
  return tf.data.Dataset.from_tensor_slices({
      "inputs": list(questions), "targets": [corpus.CLOZE_ANSWER.format(a) for a in answers],
      "answers": [[a] for a in answers]})


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

seqio.TaskRegistry.add(
    "gqa_embedded_cloze_qa",
    source=seqio.FunctionDataSource(_cloze_questions, splits=corpus.SPLITS),
    preprocessors=[
        seqio.preprocessors.tokenize,
        seqio.CacheDatasetPlaceholder(),
        seqio.preprocessors.append_eos_after_trim,
    ],
    postprocess_fn=preprocessors.cloze_qa_postprocess,
    output_features=OUTPUT_FEATURES,
    metric_fns=[metrics.trivia_qa])

seqio.TaskRegistry.add(
    "gqa_embedded_lead_summary",
    source=seqio.FunctionDataSource(_lead_summaries, splits=corpus.SPLITS),
    preprocessors=[
        seqio.preprocessors.tokenize,
        seqio.CacheDatasetPlaceholder(),
        seqio.preprocessors.append_eos_after_trim,
    ],
    output_features=OUTPUT_FEATURES,
    metric_fns=[metrics.rouge])
