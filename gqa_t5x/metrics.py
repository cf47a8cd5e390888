"""The paper's evaluation metrics as SeqIO metric functions.

Each function takes `(targets, predictions)` (lists of strings, or for TriviaQA lists of gold
answer lists) and returns `{name: score}` with scores in 0..100, as T5 / SeqIO report them.
Pure Python: safe to import where no model or TensorFlow is wanted.
"""
import collections
import re
import string
from typing import Mapping, Sequence

import sacrebleu
from rouge_score import rouge_scorer

ROUGE_KEYS = ("rouge1", "rouge2", "rougeLsum")


def _check_aligned(targets: Sequence, predictions: Sequence) -> None:
  if len(targets) != len(predictions):
    raise ValueError(
        f"got {len(targets)} targets but {len(predictions)} predictions; a metric needs one "
        "prediction per target")
  if not targets:
    raise ValueError("got no examples; a metric needs at least one (target, prediction) pair")


def _one_sentence_per_line(text: str) -> str:
  """rougeLsum scores sentence by sentence, and rouge-score finds sentences only at newlines.

  Decoded SentencePiece text has lost its newlines, so sentence ends ('.', '!' or '?' followed
  by whitespace) become newlines again (T5 does the same for ' . ').
  """
  return re.sub(r"([.!?])\s+", "\\1\n", text.strip())


def rouge(targets: Sequence[str], predictions: Sequence[str]) -> Mapping[str, float]:
  """ROUGE-1/2/Lsum F-measure, averaged over examples (the deterministic mean, no bootstrap)."""
  _check_aligned(targets, predictions)
  scorer = rouge_scorer.RougeScorer(list(ROUGE_KEYS))
  totals = collections.Counter()
  for target, prediction in zip(targets, predictions):
    scores = scorer.score(target=_one_sentence_per_line(target),
                          prediction=_one_sentence_per_line(prediction))
    for key in ROUGE_KEYS:
      totals[key] += scores[key].fmeasure
  return {key: 100 * totals[key] / len(targets) for key in ROUGE_KEYS}


def bleu(targets: Sequence[str], predictions: Sequence[str]) -> Mapping[str, float]:
  """Corpus BLEU with sacrebleu, detokenized text, T5's settings (intl tokenizer, exp smoothing)."""
  _check_aligned(targets, predictions)
  score = sacrebleu.corpus_bleu(list(predictions), [list(targets)], smooth_method="exp",
                                tokenize="intl", lowercase=False, use_effective_order=False)
  return {"bleu": score.score}


# The official TriviaQA evaluation (triviaqa_evaluation.py) treats these as punctuation too.
_TRIVIA_QA_PUNCTUATION = frozenset(string.punctuation + "‘’´`_")


def normalize_trivia_qa(answer: str) -> str:
  """The official TriviaQA answer normalisation.

  Lower-case; punctuation (and underscores) become spaces; the articles a/an/the are dropped;
  runs of whitespace collapse to one space.
  """
  answer = "".join(" " if ch in _TRIVIA_QA_PUNCTUATION else ch for ch in answer.lower())
  answer = re.sub(r"\b(a|an|the)\b", " ", answer)
  return " ".join(answer.split())


def _token_f1(gold: str, prediction: str) -> float:
  gold_tokens, prediction_tokens = gold.split(), prediction.split()
  num_same = sum((collections.Counter(gold_tokens) & collections.Counter(prediction_tokens)).values())
  if num_same == 0:
    return 0.0
  precision = num_same / len(prediction_tokens)
  recall = num_same / len(gold_tokens)
  return 2 * precision * recall / (precision + recall)


def trivia_qa(targets: Sequence[Sequence[str]], predictions: Sequence[str]) -> Mapping[str, float]:
  """TriviaQA exact match and token F1, each the max over a question's gold answers."""
  _check_aligned(targets, predictions)
  em = f1 = 0.0
  for golds, prediction in zip(targets, predictions):
    if isinstance(golds, str) or not golds:
      raise ValueError(f"TriviaQA targets must be non-empty lists of gold answers, got {golds!r}")
    prediction = normalize_trivia_qa(prediction)
    golds = [normalize_trivia_qa(g) for g in golds]
    em += max(float(g == prediction) for g in golds)
    f1 += max(_token_f1(g, prediction) for g in golds)
  return {"em": 100 * em / len(targets), "f1": 100 * f1 / len(targets)}
