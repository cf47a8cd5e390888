"""T5's span-corruption objective (Raffel et al. 2020), as T5.1.1 was pre-trained and GQA uptrained.

A re-implementation of `t5.data.preprocessors.span_corruption` (the `t5` package is not a
dependency) with T5's random draws: given the same per-example seed, the same chunk is chosen
and the same spans are masked.

  tokens:   The  quick brown fox jumps over the lazy dog
  mask:      .     X     X    .    .    .    .   X    .
  inputs:   The <X> fox jumps over the <Y> dog            (<X> = vocab_size-1, <Y> = vocab_size-2)
  targets:  <X> quick brown <Y> lazy <Z>                  (<Z> = vocab_size-3)

Pipeline: pick a random chunk of each document, concatenate documents, split into pieces of
the raw length whose corrupted inputs fill `sequence_length['inputs']` exactly, then mask.
"""
from typing import Mapping, Tuple

import seqio
import tensorflow as tf

NOISE_DENSITY = 0.15
MEAN_NOISE_SPAN_LENGTH = 3.0
_MAX_CHUNK_LENGTH = 65536
_DOCUMENTS_PER_CONCATENATION = 128


def _span_counts(tokens_length: int, noise_density: float, mean_noise_span_length: float):
  num_noise_tokens = int(round(tokens_length * noise_density))
  num_noise_spans = int(round(num_noise_tokens / mean_noise_span_length))
  return num_noise_tokens, num_noise_spans


def random_spans_helper(inputs_length: int,
                        noise_density: float = NOISE_DENSITY,
                        mean_noise_span_length: float = MEAN_NOISE_SPAN_LENGTH) -> Tuple[int, int]:
  """(raw tokens per example, targets length) for corrupted inputs of `inputs_length` tokens.

  Each noise span becomes one sentinel in the inputs, each non-noise span one sentinel in the
  targets, and both get an EOS: the largest raw length whose inputs fit is chosen.
  """
  def corrupted_lengths(tokens_length):
    num_noise, num_spans = _span_counts(tokens_length, noise_density, mean_noise_span_length)
    return tokens_length - num_noise + num_spans + 1, num_noise + num_spans + 1

  tokens_length = inputs_length - 1
  while corrupted_lengths(tokens_length + 1)[0] <= inputs_length:
    tokens_length += 1
  return tokens_length, corrupted_lengths(tokens_length)[1]


def _random_segmentation(num_items, num_segments, seed):
  """Random positive lengths, `num_segments` of them, summing to `num_items` (all equally likely)."""
  is_boundary = tf.cast(tf.range(num_items - 1) < num_segments - 1, tf.int32)
  first_in_segment = tf.pad(seqio.utils.stateless_shuffle(is_boundary, seed), [[1, 0]])
  segment_id = tf.cumsum(first_in_segment)
  return tf.math.segment_sum(tf.ones_like(segment_id), segment_id)


def random_spans_noise_mask(length, seeds, noise_density: float = NOISE_DENSITY,
                            mean_noise_span_length: float = MEAN_NOISE_SPAN_LENGTH):
  """Boolean [length] mask of round(length * density) noise tokens in spans of mean length 3.

  Non-noise and noise spans alternate, starting with non-noise; `seeds` ([2, 2]) draw the
  noise and non-noise span lengths.
  """
  orig_length = length
  length = tf.maximum(length, 2)  # a one-token document still gets one noise token
  num_noise = tf.cast(tf.round(tf.cast(length, tf.float32) * noise_density), tf.int32)
  num_noise = tf.clip_by_value(num_noise, 1, length - 1)
  num_spans = tf.cast(tf.round(tf.cast(num_noise, tf.float32) / mean_noise_span_length), tf.int32)
  num_spans = tf.maximum(num_spans, 1)
  noise_lengths = _random_segmentation(num_noise, num_spans, seeds[0])
  nonnoise_lengths = _random_segmentation(length - num_noise, num_spans, seeds[1])
  span_lengths = tf.reshape(tf.stack([nonnoise_lengths, noise_lengths], axis=1), [-1])
  span_is_noise = tf.tile([False, True], [num_spans])
  return tf.repeat(span_is_noise, span_lengths)[:orig_length]


def noise_span_to_unique_sentinel(tokens, noise_mask, vocab_size: int):
  """Replaces each noise span by one sentinel, counting down from vocab_size - 1."""
  previous_is_noise = tf.pad(noise_mask[:-1], [[1, 0]])
  first_noise = tf.logical_and(noise_mask, tf.logical_not(previous_is_noise))
  later_noise = tf.logical_and(noise_mask, previous_is_noise)
  sentinels = vocab_size - tf.cumsum(tf.cast(first_noise, tokens.dtype))
  tokens = tf.where(first_noise, sentinels, tokens)
  return tf.boolean_mask(tokens, tf.logical_not(later_noise))


def select_random_chunk(dataset: tf.data.Dataset, max_length: int = _MAX_CHUNK_LENGTH):
  """Keeps one random aligned chunk of at most `max_length` tokens of each non-empty document."""

  @seqio.map_over_dataset(num_seeds=1)
  def chunk(features, seed):
    tokens = features["targets"]
    num_chunks = (tf.size(tokens) + max_length - 1) // max_length
    start = max_length * tf.random.stateless_uniform([], seed=_split_seeds(seed, 2)[1],
                                                     maxval=num_chunks, dtype=tf.int32)
    return {"targets": tokens[start:start + max_length]}

  return chunk(dataset.filter(lambda x: tf.size(x["targets"]) > 0))


def concatenate_documents(dataset: tf.data.Dataset,
                          batch_size: int = _DOCUMENTS_PER_CONCATENATION):
  """Concatenates the tokens of `batch_size` consecutive documents, so pieces waste no padding."""
  dataset = dataset.map(lambda x: {"targets": x["targets"]})
  dataset = dataset.padded_batch(batch_size, padded_shapes={"targets": [-1]})

  def join(batch):
    tokens = tf.reshape(batch["targets"], [-1])
    return {"targets": tf.boolean_mask(tokens, tokens != 0)}  # drop the padding

  return dataset.map(join, num_parallel_calls=tf.data.AUTOTUNE)


def split_into_pieces(dataset: tf.data.Dataset, piece_length: int):
  """Splits each token sequence into pieces of `piece_length` (the last may be shorter)."""

  def pieces(features):
    tokens = features["targets"]
    length = tf.size(tokens)
    row_limits = tf.minimum(tf.range(piece_length, length + piece_length, piece_length), length)
    return tf.data.Dataset.from_tensor_slices(tf.RaggedTensor.from_row_limits(tokens, row_limits))

  dataset = dataset.filter(lambda x: tf.size(x["targets"]) > 0)
  return dataset.flat_map(pieces).map(lambda t: {"targets": t})


def _split_seeds(seed, n):
  return tf.unstack(tf.random.experimental.stateless_split(seed, n))


def denoise_with_sentinels(dataset: tf.data.Dataset, vocabulary: seqio.Vocabulary,
                           noise_density: float = NOISE_DENSITY,
                           mean_noise_span_length: float = MEAN_NOISE_SPAN_LENGTH):
  """inputs: the tokens with noise spans replaced by sentinels; targets: the noise spans."""
  vocab_size = vocabulary.vocab_size

  @seqio.map_over_dataset(num_seeds=1)
  def corrupt(features, seed):
    tokens = features["targets"]
    # T5 splits the example seed six ways and draws the mask from the first two.
    mask = random_spans_noise_mask(tf.size(tokens), _split_seeds(seed, 6)[:2], noise_density,
                                   mean_noise_span_length)
    return {"inputs": noise_span_to_unique_sentinel(tokens, mask, vocab_size),
            "targets": noise_span_to_unique_sentinel(tokens, tf.logical_not(mask), vocab_size)}

  return corrupt(dataset)


def span_corruption(dataset: tf.data.Dataset, sequence_length: Mapping[str, int],
                    output_features: Mapping[str, seqio.Feature],
                    noise_density: float = NOISE_DENSITY,
                    mean_noise_span_length: float = MEAN_NOISE_SPAN_LENGTH) -> tf.data.Dataset:
  """SeqIO preprocessor: tokenized 'targets' documents -> span-corrupted (inputs, targets)."""
  tokens_length, targets_length = random_spans_helper(
      sequence_length["inputs"], noise_density, mean_noise_span_length)
  if sequence_length["targets"] < targets_length:
    raise ValueError(
        f"span corruption of {sequence_length['inputs']} input tokens makes up to "
        f"{targets_length} target tokens, but the targets length is "
        f"{sequence_length['targets']}; set it to at least {targets_length}")
  dataset = select_random_chunk(dataset)
  dataset = concatenate_documents(dataset)
  dataset = split_into_pieces(dataset, tokens_length)
  return denoise_with_sentinels(dataset, output_features["targets"].vocabulary, noise_density,
                                mean_noise_span_length)


def token_preprocessors() -> list:
  """tokenize -> cache -> span corruption -> EOS: the token pipeline of every span-corruption task."""
  return [seqio.preprocessors.tokenize, seqio.CacheDatasetPlaceholder(), span_corruption,
          seqio.preprocessors.append_eos_after_trim]
