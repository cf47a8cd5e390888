"""The paper's metrics against values computed by hand."""
import pytest

from gqa_t5x import metrics


def test_rouge_matches_hand_counts():
  # target: the cat sat on the mat (6 unigrams, 5 bigrams); prediction: the cat on the mat.
  # ROUGE-1: 5 shared unigrams -> P = 5/5, R = 5/6, F = 10/11.
  # ROUGE-2: shared bigrams the-cat, on-the, the-mat -> P = 3/4, R = 3/5, F = 2/3.
  # ROUGE-Lsum: one sentence, LCS 'the cat on the mat' = 5 -> same as ROUGE-1.
  scores = metrics.rouge(["the cat sat on the mat"], ["the cat on the mat"])
  assert scores["rouge1"] == pytest.approx(100 * 10 / 11)
  assert scores["rouge2"] == pytest.approx(100 * 2 / 3)
  assert scores["rougeLsum"] == pytest.approx(100 * 10 / 11)


def test_rouge_averages_over_examples():
  scores = metrics.rouge(["the cat sat on the mat", "a b c"], ["the cat on the mat", "a b c"])
  assert scores["rouge1"] == pytest.approx((100 * 10 / 11 + 100) / 2)


def test_rouge_lsum_scores_sentence_by_sentence():
  # Swapped sentences: each target sentence is matched in full by the summary-level LCS,
  # whereas one flat sequence would share only an LCS of 2 of 4 tokens (F = 50).
  scores = metrics.rouge(["alpha beta. gamma delta."], ["gamma delta. alpha beta."])
  assert scores["rougeLsum"] == pytest.approx(100.0)
  assert scores["rouge1"] == pytest.approx(100.0)
  assert scores["rouge2"] == pytest.approx(100 * 2 / 3)  # bigram beta-gamma vs delta-alpha


def test_bleu_matches_hand_computed_precisions():
  # prediction 'the cat sat on the mat', reference 'the cat sat on a mat' (equal lengths, BP=1):
  # clipped n-gram precisions 5/6, 3/5, 2/4, 1/3 -> BLEU = (5/6*3/5*2/4*1/3) ** (1/4).
  score = metrics.bleu(["the cat sat on a mat"], ["the cat sat on the mat"])["bleu"]
  assert score == pytest.approx(100 * (5 / 6 * 3 / 5 * 2 / 4 * 1 / 3) ** 0.25, abs=1e-6)
  assert metrics.bleu(["Das ist gut."], ["Das ist gut."])["bleu"] == pytest.approx(100.0)


@pytest.mark.parametrize("answer, normalized", [
    ("The  Beatles!", "beatles"),            # case, article, punctuation, whitespace
    ("An apple a day", "apple day"),         # every article goes
    ("theatre", "theatre"),                  # articles only as whole words
    ("rock‘n’roll", "rock n roll"),          # the official extra quote characters
    ("New_York", "new york"),                # underscores are punctuation
    ("U.S.A.", "u s"),                       # 'a' left alone after punctuation is an article
    ("  \tParis\n", "paris"),
])
def test_trivia_qa_normalisation(answer, normalized):
  assert metrics.normalize_trivia_qa(answer) == normalized


def test_trivia_qa_takes_the_best_gold_answer():
  targets = [["Paris", "City of Light"], ["Paris"]]
  predictions = ["the city of light!", "Paris France"]
  scores = metrics.trivia_qa(targets, predictions)
  # Example 1: exact match with the second alias. Example 2: no exact match; token F1 with
  # 'paris' is P = 1/2, R = 1 -> 2/3.
  assert scores["em"] == pytest.approx(50.0)
  assert scores["f1"] == pytest.approx((100 + 100 * 2 / 3) / 2)


def test_trivia_qa_empty_prediction_scores_zero():
  assert metrics.trivia_qa([["Paris"]], [""]) == {"em": 0.0, "f1": 0.0}


@pytest.mark.parametrize("metric_fn, targets", [
    (metrics.rouge, ["a", "b"]), (metrics.bleu, ["a", "b"]), (metrics.trivia_qa, [["a"], ["b"]])])
def test_metrics_reject_misaligned_inputs(metric_fn, targets):
  with pytest.raises(ValueError, match="2 targets but 1 predictions"):
    metric_fn(targets, ["a"])


def test_trivia_qa_rejects_a_bare_string_target():
  with pytest.raises(ValueError, match="non-empty lists of gold answers"):
    metrics.trivia_qa(["Paris"], ["Paris"])
