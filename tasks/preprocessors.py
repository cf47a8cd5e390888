"""Text preprocessors of the downstream tasks: raw TFDS features -> {'inputs', 'targets'} text.

The formats follow T5's (`summarize: ...`, `translate English to German: ...`,
`question: ... context: ...`), so T5.1.1 checkpoints see the prompts they were fine-tuned with.
"""
from typing import Mapping

import seqio
import tensorflow as tf


def summarize(article_key: str, summary_key: str):
  """'summarize: <article>' -> summary."""

  @seqio.map_over_dataset
  def to_text(x):
    return {"inputs": tf.strings.join(["summarize:", x[article_key]], separator=" "),
            "targets": x[summary_key]}

  return to_text


@seqio.map_over_dataset
def summarize_interview(x):
  """MediaSum: 'summarize: SPEAKER: utterance SPEAKER: utterance ...' -> summary."""
  turns = tf.strings.join([x["speaker"], x["utt"]], separator=": ")
  transcript = tf.strings.reduce_join(turns, separator=" ")
  return {"inputs": tf.strings.join(["summarize:", transcript], separator=" "),
          "targets": x["summary"]}


def translate(source_key: str, target_key: str, source_name: str, target_name: str):
  """'translate <Source> to <Target>: <source text>' -> target text."""
  prefix = f"translate {source_name} to {target_name}: "

  @seqio.map_over_dataset
  def to_text(x):
    return {"inputs": tf.strings.join([prefix, x[source_key]]), "targets": x[target_key]}

  return to_text


def _pad_punctuation(text):
  """T5's TriviaQA text form: spaces around punctuation, runs of whitespace collapsed to one."""
  text = tf.strings.regex_replace(text, r"([[:punct:]])", r" \1 ")
  return tf.strings.regex_replace(text, r"\s+", " ")


def _contains(texts, substrings):
  """[C, A] bool: does texts[c] contain substrings[a] (literally)? Empty substrings never match."""
  pairs_c = tf.repeat(texts, tf.size(substrings))
  pairs_a = tf.tile(substrings, [tf.size(texts)])
  found = tf.map_fn(
      lambda ca: tf.logical_and(tf.strings.length(ca[1]) > 0,
                                tf.size(tf.strings.split(ca[0], sep=ca[1])) > 1),
      (pairs_c, pairs_a), fn_output_signature=tf.bool)
  return tf.reshape(found, [tf.size(texts), tf.size(substrings)])


def trivia_qa(dataset: tf.data.Dataset) -> tf.data.Dataset:
  """T5's TriviaQA examples: one per (evidence document, normalized alias) pair that matches.

  inputs 'question: <q> context: <document>', targets the normalized (lower-case) alias, both in
  T5's padded-punctuation form; a document matches an alias if its lower-cased text contains it.
  T5 matches the alias as a regular expression; TFDS's normalized aliases hold no punctuation, so
  a literal match is the same and cannot fail on a stray metacharacter. 'answers' keeps all the
  question's normalized aliases, the gold answers of the F1/EM metric.
  """

  def examples(x):
    contexts = _pad_punctuation(tf.concat([x["entity_pages"]["wiki_context"],
                                           x["search_results"]["search_context"]], axis=0))
    aliases = _pad_punctuation(x["answer"]["normalized_aliases"])
    found = tf.reshape(_contains(tf.strings.lower(contexts), tf.strings.lower(aliases)), [-1])
    inputs = tf.strings.regex_replace(tf.strings.join(
        ["question:", _pad_punctuation(x["question"]), "context:", contexts], separator=" "),
        r"\s+", " ")
    return tf.data.Dataset.from_tensor_slices({  # context-major, as T5 orders the pairs
        "inputs": tf.boolean_mask(tf.repeat(inputs, tf.size(aliases)), found),
        "targets": tf.boolean_mask(tf.tile(aliases, [tf.size(contexts)]), found),
    }).map(lambda ex: {**ex, "answers": x["answer"]["normalized_aliases"]})

  return dataset.flat_map(examples)


def trivia_qa_truncate_inputs(dataset: tf.data.Dataset,
                              sequence_length: Mapping[str, int]) -> tf.data.Dataset:
  """Cuts long tokenized inputs to a random window that still holds the answer (T5's recipe).

  The window leaves one token for EOS. Long examples whose answer tokens do not occur in the
  inputs are dropped, since a cut could not keep them answerable.
  """
  window = sequence_length["inputs"] - 1

  @seqio.map_over_dataset(num_seeds=1)
  def truncate(x, seed):
    inputs, answer = x["inputs"], x["targets"]
    num_inputs, answer_len = tf.size(inputs), tf.size(answer)
    if num_inputs <= window:
      return x
    # [positions, answer_len] windows of the inputs, compared with the answer.
    frames = tf.signal.frame(inputs, tf.maximum(answer_len, 1), 1)
    starts = tf.where(tf.reduce_all(frames == answer[None, :], axis=1))[:, 0]
    if tf.size(starts) == 0 or answer_len == 0:
      return {**x, "inputs": inputs[:0]}
    answer_start = tf.cast(starts[0], tf.int32)
    lowest = tf.maximum(0, answer_start - (window - answer_len))
    highest = tf.minimum(answer_start, num_inputs - window)
    start = tf.random.stateless_uniform([], seed=seed, minval=lowest, maxval=highest + 1,
                                        dtype=tf.int32)
    return {**x, "inputs": inputs[start:start + window]}

  return truncate(dataset).filter(lambda x: tf.size(x["inputs"]) > 0)


def trivia_qa_postprocess(output: str, example=None, is_target: bool = False):
  """Predictions stay strings; a target becomes the list of the question's gold aliases."""
  if is_target and example is not None:
    return [a.decode("utf-8") if isinstance(a, bytes) else str(a) for a in example["answers"]]
  return output


def add_text_to_text_task(name, source, output_features, metric_fn, text_preprocessors=(),
                          token_preprocessors=(), postprocess_fn=None):
  """Registers a task whose examples become 'inputs' and 'targets' text (after
  text_preprocessors), with the chain T5's text-to-text tasks share: tokenize, cache, EOS."""
  seqio.TaskRegistry.add(
      name,
      source=source,
      preprocessors=[
          *text_preprocessors,
          seqio.preprocessors.tokenize,
          seqio.CacheDatasetPlaceholder(),
          *token_preprocessors,
          seqio.preprocessors.append_eos_after_trim,
      ],
      output_features=output_features,
      postprocess_fn=postprocess_fn,
      metric_fns=[metric_fn])
