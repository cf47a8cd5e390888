"""SeqIO tasks: span corruption by hand, every paper task end to end offline, embedded tasks."""
import json

import gin
import numpy as np
import pytest
import sentencepiece
import seqio
import tensorflow as tf
import tensorflow_datasets as tfds

import gqa_t5x.tasks  # registers the tasks  # pylint: disable=unused-import
from gqa_t5x.tasks import corpus
from gqa_t5x.tasks import lengths
from gqa_t5x.tasks import media_sum
from gqa_t5x.tasks import paper
from gqa_t5x.tasks import preprocessors
from gqa_t5x.tasks import span_corruption
from gqa_t5x.tasks import vocab
from gqa_t5x.tasks.sources import DatasetNotPreparedError

PIECES = 1000  # the small embedded vocabulary, plus 100 extra ids


@pytest.fixture(scope="module")
def spm_path(tmp_path_factory):
  return vocab.embedded_sentencepiece_model(PIECES, str(tmp_path_factory.mktemp("vocab")))


@pytest.fixture(autouse=True)
def small_vocabulary(spm_path):
  """Every task on the small vocabulary, bound after import as a user's gin file would."""
  gin.bind_parameter("get_vocabulary.sentencepiece_model_file", spm_path)
  gin.bind_parameter("embedded_vocabulary.sentencepiece_model_file", spm_path)
  yield
  gin.clear_config()


def _examples(task_name, split="validation", **kwargs):
  task = seqio.get_mixture_or_task(task_name)
  ds = task.get_dataset(lengths.TASK_FEATURE_LENGTHS[task_name], split=split, shuffle=False,
                        seed=0, **kwargs)
  return list(ds.as_numpy_iterator())


# ----------------------------------------------------------------------------- span corruption

def test_random_spans_helper_gives_t5_pretraining_lengths():
  # 568 raw tokens: round(85.2) = 85 noise tokens in round(85/3) = 28 spans
  # -> inputs 483 + 28 sentinels + EOS = 512, targets 85 + 28 + EOS = 114 (T5X's pretrain lengths).
  assert span_corruption.random_spans_helper(512) == (568, 114)
  # 141 raw tokens: 21 noise tokens in 7 spans -> inputs 120 + 7 + 1 = 128, targets 29.
  assert span_corruption.random_spans_helper(128) == (141, 29)
  assert lengths.UPTRAINING_FEATURE_LENGTHS == {"inputs": 512, "targets": 114}


def test_sentinels_replace_spans_counting_down_from_the_vocabulary_end():
  tokens = tf.constant([10, 11, 12, 13, 14, 15, 16, 17, 18])
  mask = tf.constant([0, 1, 1, 0, 0, 0, 0, 1, 0]) == 1
  inputs = span_corruption.noise_span_to_unique_sentinel(tokens, mask, vocab_size=100)
  targets = span_corruption.noise_span_to_unique_sentinel(tokens, ~mask, vocab_size=100)
  assert inputs.numpy().tolist() == [10, 99, 13, 14, 15, 16, 98, 18]
  assert targets.numpy().tolist() == [99, 11, 12, 98, 17, 97]


def _spans(mask):
  """Lengths of the runs of equal values in a boolean list, and the first value."""
  runs = [1]
  for previous, current in zip(mask, mask[1:]):
    if current == previous:
      runs[-1] += 1
    else:
      runs.append(1)
  return mask[0], runs


def test_noise_mask_has_t5s_counts_and_is_fixed_by_its_seed():
  seeds = [tf.constant([1, 2]), tf.constant([3, 4])]
  mask = span_corruption.random_spans_noise_mask(141, seeds).numpy().tolist()
  first, runs = _spans(mask)
  assert sum(mask) == 21                      # round(141 * 0.15)
  assert first is False and len(runs) == 14   # 7 non-noise spans alternating with 7 noise spans
  assert mask == span_corruption.random_spans_noise_mask(141, seeds).numpy().tolist()
  other = span_corruption.random_spans_noise_mask(141, [seeds[1], seeds[0]]).numpy().tolist()
  assert other != mask


def _uncorrupt(inputs, targets, vocab_size):
  """Rebuilds the original tokens: each input sentinel takes the target span after it."""
  spans, current = {}, None
  for t in targets:
    if t >= vocab_size - 100:
      current = spans.setdefault(t, [])
    elif t != 1:
      current.append(t)
  return [tok for t in inputs if t != 1 for tok in (spans[t] if t in spans else [t])]


def test_embedded_span_corruption_loses_no_token_and_fills_its_length():
  examples = _examples("gqa_embedded_span_corruption")
  vocabulary = vocab.embedded_vocabulary()
  original = [t for doc in corpus.documents("validation")
              for t in vocabulary.encode_tf(doc).numpy().tolist()]  # seqio tokenizes in TF
  rebuilt = [t for ex in examples
             for t in _uncorrupt(ex["inputs"].tolist(), ex["targets"].tolist(), 1100)]
  assert rebuilt == original  # no chunking below 65536 tokens; pieces in document order
  # Every piece fills 128 inputs / 29 targets, except one remainder per 128 concatenated
  # documents (the validation split has 235 documents).
  short = [ex for ex in examples if len(ex["inputs"]) != 128]
  assert len(short) <= 2 and all(len(ex["inputs"]) < 128 for ex in short)
  assert {len(ex["targets"]) for ex in examples if len(ex["inputs"]) == 128} == {29}
  assert all(ex["inputs"][-1] == 1 and ex["targets"][0] == 1099 for ex in examples)


# ------------------------------------------------------------------- the paper's tasks, offline

def _mock_examples(examples):
  """A tfds.testing.mock_data `as_dataset_fn` that yields `examples` (nested dicts of str/lists)."""

  def spec(value):
    if isinstance(value, dict):
      return {k: spec(v) for k, v in value.items()}
    if isinstance(value, list):
      return tf.TensorSpec([None], tf.int32 if value and isinstance(value[0], int) else tf.string)
    return tf.TensorSpec([], tf.string)

  def as_dataset(self, split, **unused_kwargs):
    del self, split
    return tf.data.Dataset.from_generator(lambda: iter(examples), output_signature=spec(examples[0]))

  return as_dataset


def _trivia_qa_example(question, answers, wiki, search):
  """A TriviaQA rc example in TFDS's feature layout."""
  return {
      "question": question, "question_id": "q", "question_source": "s",
      "entity_pages": {"doc_source": ["w"] * len(wiki), "filename": ["f"] * len(wiki),
                       "title": ["t"] * len(wiki), "wiki_context": wiki},
      "search_results": {"description": ["d"] * len(search), "filename": ["f"] * len(search),
                         "rank": [0] * len(search), "title": ["t"] * len(search),
                         "url": ["u"] * len(search), "search_context": search},
      "answer": {"aliases": answers, "matched_wiki_entity_name": "",
                 "normalized_aliases": [a.lower() for a in answers],
                 "normalized_matched_wiki_entity_name": "", "normalized_value": answers[0].lower(),
                 "type": "", "value": answers[0]},
  }


# The answer in lower case: T5 targets the normalized alias and keeps a long document only where
# the target's tokens occur in it.
_LONG_CONTEXT = " ".join(["filler words here."] * 700) + " The capital is paris , France ."
TRIVIA_QA_EXAMPLES = [  # one answerable question (in two documents), one not
    _trivia_qa_example("What is the capital of France?", ["Paris", "City of Light"],
                       [_LONG_CONTEXT], ["Nothing relevant.", "They call it the City of Light."]),
    _trivia_qa_example("Who?", ["Nobody"], ["No answer in here."], []),
]


def test_trivia_qa_builds_one_example_per_matching_document_and_normalized_alias():
  # T5's trivia_qa: every (document, normalized alias) pair whose lower-cased padded document
  # contains the padded alias, document-major; the target is that alias.
  examples = [
      _trivia_qa_example("Where's the Eiffel Tower?", ["Paris", "Paris France", "City of Light"],
                         ["It stands in PARIS, France."],
                         ["The City of Light.", "Nothing.", "Visit paris france today."]),
      _trivia_qa_example("Who?", ["Nobody"], ["No answer in here."], []),
  ]
  dataset = _mock_examples(examples)(None, "train")
  got = [(ex["inputs"].decode(), ex["targets"].decode(), list(ex["answers"]))
         for ex in preprocessors.trivia_qa(dataset).as_numpy_iterator()]
  question = "question: Where ' s the Eiffel Tower ? context: "
  aliases = [b"paris", b"paris france", b"city of light"]
  assert got == [
      (question + "It stands in PARIS , France . ", "paris", aliases),  # not "paris france": ","
      (question + "The City of Light . ", "city of light", aliases),
      (question + "Visit paris france today . ", "paris", aliases),
      (question + "Visit paris france today . ", "paris france", aliases),
  ]


def _evaluate_with_perfect_predictions(task_name):
  """seqio.Evaluator on converted features at the paper's lengths; predictions = targets."""
  feature_lengths = lengths.TASK_FEATURE_LENGTHS[task_name]
  evaluator = seqio.Evaluator(task_name, seqio.EncDecFeatureConverter(pack=False),
                              sequence_length=feature_lengths, use_memory_cache=False,
                              async_compute_metrics=False)
  converted = list(evaluator.cached_model_datasets[task_name].as_numpy_iterator())
  assert converted, f"{task_name}: no examples"
  for _, ex in converted:
    assert ex["encoder_input_tokens"].shape == (feature_lengths["inputs"],)
    assert ex["decoder_target_tokens"].shape == (feature_lengths["targets"],)
  metrics_by_task, _ = evaluator.evaluate(
      compute_metrics=True,
      predict_fn=lambda ds: [(i, ex["decoder_target_tokens"]) for i, ex in ds.as_numpy_iterator()])
  return metrics_by_task.result()[task_name], converted


@pytest.mark.parametrize("task_name, metric, expected", [
    ("gqa_cnn_dailymail", "rouge1", 100.0),
    ("gqa_arxiv", "rouge1", 100.0),
    ("gqa_pubmed", "rouge1", 100.0),
    ("gqa_multi_news", "rouge1", 100.0),
])
def test_paper_task_end_to_end_on_mock_data(task_name, metric, expected):
  with tfds.testing.mock_data(num_examples=3, policy=tfds.testing.MockPolicy.USE_CODE):
    scores, converted = _evaluate_with_perfect_predictions(task_name)
  assert len(converted) == 3
  assert scores[metric] == pytest.approx(expected)


def test_wmt_end_to_end_on_mock_data():
  # TFDS's generated text is too short for 4-grams (BLEU 0 by definition); use real sentences.
  sentences = [{"de": "Das ist ein kleines Haus am See .", "en": "This is a small house by the lake ."},
               {"de": "Wir sehen uns morgen wieder am See .", "en": "We will meet again tomorrow at the lake ."}]
  with tfds.testing.mock_data(policy=tfds.testing.MockPolicy.USE_CODE,
                              as_dataset_fn=_mock_examples(sentences)):
    scores, converted = _evaluate_with_perfect_predictions("gqa_wmt14_ende")
    examples = _examples("gqa_wmt14_ende")
  assert examples[0]["inputs_pretokenized"] == (
      b"translate English to German: This is a small house by the lake .")
  assert len(converted) == 2 and scores["bleu"] == pytest.approx(100.0)


def test_trivia_qa_end_to_end_keeps_the_answer_in_the_window():
  with tfds.testing.mock_data(policy=tfds.testing.MockPolicy.USE_CODE,
                              as_dataset_fn=_mock_examples(TRIVIA_QA_EXAMPLES)):
    scores, converted = _evaluate_with_perfect_predictions("gqa_trivia_qa")
    examples = _examples("gqa_trivia_qa")
  vocabulary = paper.VOCABULARY
  # Two documents of question 1 hold an alias; question 2's document holds none.
  assert [vocabulary.decode(ex["targets"].tolist()) for ex in examples] == ["paris", "city of light"]
  assert [list(ex["answers"]) for ex in examples] == [[b"paris", b"city of light"]] * 2
  long_inputs = examples[0]["inputs"].tolist()
  assert len(long_inputs) == 2048 and long_inputs[-1] == 1  # cut from ~2800 tokens
  answer = examples[0]["targets"].tolist()[:-1]
  assert any(long_inputs[i:i + len(answer)] == answer for i in range(len(long_inputs)))
  assert scores == {"em": 100.0, "f1": 100.0}


def test_c4_span_corruption_on_mock_data_converts_to_uptraining_lengths():
  with tfds.testing.mock_data(num_examples=3, policy=tfds.testing.MockPolicy.USE_CODE):
    task = seqio.get_mixture_or_task("gqa_c4_span_corruption")
    assert task.source.tfds_dataset.name == "c4/en:2.2.0"  # T5.1.1's (c4_v220_span_corruption)
    ds = task.get_dataset(lengths.UPTRAINING_FEATURE_LENGTHS, split="train", shuffle=False, seed=0)
    converted = list(seqio.EncDecFeatureConverter(pack=True)(
        ds, lengths.UPTRAINING_FEATURE_LENGTHS).as_numpy_iterator())
  assert converted[0]["encoder_input_tokens"].shape == (512,)
  assert converted[0]["decoder_target_tokens"].shape == (114,)
  assert converted[0]["decoder_target_tokens"][0] == PIECES + 100 - 1  # first sentinel


def _use_tfds_data_dir(task_name, data_dir):
  # As seqio.set_tfds_data_dir_override does, but per task: seqio keeps the first override.
  seqio.get_mixture_or_task(task_name).source.tfds_dataset.override_data_dir(str(data_dir))


def _write_mediasum_release(release_dir):
  interviews = [
      {"id": f"NPR-{i}", "program": "Day to Day", "date": "2008-06-10", "url": "u",
       "title": "t", "summary": f"Summary number {i}.",
       "utt": [f"Hello {i}.", "Hi there."], "speaker": ["HOST", "GUEST"]} for i in range(4)]
  (release_dir / "news_dialogue.json").write_text(json.dumps(interviews))
  (release_dir / "train_val_test_split.json").write_text(
      json.dumps({"train": ["NPR-0", "NPR-1"], "val": ["NPR-2"], "test": ["NPR-3"]}))


def test_mediasum_from_release_files_end_to_end(tmp_path):
  release, data_dir = tmp_path / "release", tmp_path / "tfds"
  release.mkdir()
  _write_mediasum_release(release)
  media_sum.prepare(str(release), str(data_dir))
  _use_tfds_data_dir("gqa_mediasum", data_dir)
  examples = _examples("gqa_mediasum")
  scores, _ = _evaluate_with_perfect_predictions("gqa_mediasum")
  assert [ex["inputs_pretokenized"] for ex in examples] == [
      b"summarize: HOST: Hello 2. GUEST: Hi there."]
  assert [ex["targets_pretokenized"] for ex in examples] == [b"Summary number 2."]
  assert scores["rouge1"] == pytest.approx(100.0)


@pytest.mark.parametrize("task_name, dataset, advice", [
    ("gqa_cnn_dailymail", "cnn_dailymail:3.4.0", "tfds build cnn_dailymail:3.4.0"),
    ("gqa_mediasum", "gqa_media_sum:1.0.0", "python -m gqa_t5x.tasks.prepare_mediasum"),
])
def test_missing_dataset_fails_with_what_to_do(tmp_path, task_name, dataset, advice):
  _use_tfds_data_dir(task_name, tmp_path)
  with pytest.raises(DatasetNotPreparedError) as error:
    seqio.get_mixture_or_task(task_name).get_dataset(
        lengths.TASK_FEATURE_LENGTHS[task_name], split="validation")
  message = str(error.value)
  assert dataset in message and str(tmp_path) in message and advice in message


def test_every_paper_task_has_the_papers_lengths():
  assert {name: lengths.feature_lengths(name) for name in lengths.PAPER_DOWNSTREAM_TASKS} == {
      "gqa_cnn_dailymail": {"inputs": 512, "targets": 256},
      "gqa_wmt14_ende": {"inputs": 512, "targets": 256},
      "gqa_arxiv": {"inputs": 2048, "targets": 512},
      "gqa_pubmed": {"inputs": 2048, "targets": 512},
      "gqa_mediasum": {"inputs": 2048, "targets": 512},
      "gqa_multi_news": {"inputs": 2048, "targets": 512},
      "gqa_trivia_qa": {"inputs": 2048, "targets": 32},
  }
  assert set(lengths.TASK_FEATURE_LENGTHS) <= set(seqio.TaskRegistry.names())


# ---------------------------------------------------------------------------- vocab, embedded

def test_vocabulary_follows_gin_bound_after_import(spm_path):
  assert paper.VOCABULARY.vocab_size == PIECES + 100
  gin.bind_parameter("get_vocabulary.extra_ids", 10)
  assert paper.VOCABULARY.vocab_size == PIECES + 10
  assert paper.VOCABULARY == vocab.get_vocabulary()


def test_default_vocabulary_is_t5s_and_not_loaded_until_used():
  gin.clear_config()
  default = vocab.get_vocabulary()  # would fail here if it read gs:// eagerly (no network)
  assert default.sentencepiece_model_file == vocab.T5_SENTENCEPIECE_MODEL
  assert default.extra_ids == 100


def _pieces_and_scores(path):
  processor = sentencepiece.SentencePieceProcessor(model_file=path)
  return [(processor.id_to_piece(i), processor.get_score(i)) for i in range(len(processor))]


def test_embedded_vocabulary_training_is_deterministic_and_cached(tmp_path, spm_path):
  corpus._docstrings.cache_clear()  # pylint: disable=protected-access  # a fresh read
  again = vocab.embedded_sentencepiece_model(PIECES, str(tmp_path))
  assert _pieces_and_scores(again) == _pieces_and_scores(spm_path)
  assert vocab.embedded_sentencepiece_model(PIECES, str(tmp_path)) == again
  assert [p.name for p in tmp_path.iterdir()] == [again.rsplit("/", 1)[-1]]  # no temp leftovers


@pytest.mark.parametrize("task_name", ["gqa_embedded_span_corruption", "gqa_embedded_lead_summary",
                                       "gqa_embedded_module_qa"])
def test_embedded_tasks_are_deterministic(task_name):
  first = _examples(task_name, split="train", num_epochs=1)[:20]
  corpus._docstrings.cache_clear()  # pylint: disable=protected-access
  second = _examples(task_name, split="train", num_epochs=1)[:20]
  assert len(first) == 20
  for a, b in zip(first, second):
    assert a.keys() == b.keys()
    for key in a:
      np.testing.assert_array_equal(a[key], b[key])


def test_embedded_lead_summary_is_scored_with_rouge():
  examples = _examples("gqa_embedded_lead_summary")
  paragraph, first_sentence = corpus.lead_summary_pairs("validation")[0]
  assert examples[0]["inputs_pretokenized"].decode() == "summarize: " + paragraph
  assert examples[0]["targets_pretokenized"].decode() == first_sentence
  assert first_sentence.endswith((".", "!", "?")) and len(first_sentence) < len(paragraph)
  scores, _ = _evaluate_with_perfect_predictions("gqa_embedded_lead_summary")
  assert scores["rouge1"] > 99.0  # decoding a few rare characters as UNK may cost a little


def test_embedded_module_qa_asks_which_module_a_docstring_comes_from():
  examples = _examples("gqa_embedded_module_qa")
  modules = set(corpus._MODULES)  # pylint: disable=protected-access
  validation_docs = corpus.documents("validation")
  for ex in examples[:50]:
    question, context = ex["inputs_pretokenized"].decode().split(" context: ", 1)
    assert question == corpus.MODULE_QUESTION
    assert ex["targets_pretokenized"].decode() in modules
    assert any(" ".join(doc.split()).startswith(context) for doc in validation_docs)
  assert len({ex["targets_pretokenized"] for ex in examples}) > 20  # many answers, not a few
  scores, _ = _evaluate_with_perfect_predictions("gqa_embedded_module_qa")
  assert scores == {"em": 100.0, "f1": 100.0}


def test_embedded_multitask_mixes_span_corruption_and_module_qa():
  mixture = seqio.get_mixture_or_task("gqa_embedded_multitask")
  assert sorted(t.name for t in mixture.tasks) == ["gqa_embedded_module_qa",
                                                   "gqa_embedded_span_corruption"]
  ds = mixture.get_dataset({"inputs": 128, "targets": 32}, split="train", shuffle=True, seed=0)
  questions = [ex["inputs"][:3].tolist() == vocab.embedded_vocabulary().encode(
      "question:")[:3] for ex in ds.take(200).as_numpy_iterator()]
  assert 0.3 < sum(questions) / len(questions) < 0.7  # sampled at equal rates
