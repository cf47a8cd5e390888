"""How the reproduction decides a claim: intervals and verdicts on hand-made numbers, checked
against values computed here by hand (t quantiles from a table), and trivial baselines on a task
whose baseline scores are known by hand."""
import math

import pytest
from scipy import stats as scipy_stats
import seqio
import tensorflow as tf

from gqa_t5x import metrics
from gqa_t5x.reproduce import baselines, report, stats

T_975_DF2 = 4.303  # Student's t, 97.5% quantile, 2 degrees of freedom (a table)


def test_interval_is_students_t_around_the_mean():
  values = [1.0, 2.0, 3.0]  # mean 2, sd 1
  got = stats.interval(values)
  half = T_975_DF2 * 1.0 / math.sqrt(3)
  assert got.mean == pytest.approx(2.0)
  assert (got.low, got.high) == pytest.approx((2 - half, 2 + half), abs=1e-3)


def test_identical_values_give_a_zero_width_interval():
  got = stats.interval([0.5, 0.5, 0.5])
  assert got.low == got.high == 0.5


def test_separated_intervals_decide_by_direction():
  a, b = [10.0, 10.2, 10.1], [5.0, 5.3, 5.1]
  assert report.decide([(a, b)])['verdict'] == 'held'
  assert report.decide([(b, a)])['verdict'] == 'contradicted'


def test_overlapping_intervals_are_inconclusive():
  a, b = [10.0, 12.0, 8.0], [9.0, 11.5, 9.5]  # per-seed differences 1, 0.5, -1.5
  assert report.decide([(a, b)])['verdict'] == 'inconclusive'


def test_paired_differences_remove_the_noise_rows_share():
  # Seeds move both rows together; a is b + 1 at every seed. Paired: held. Unpaired, the
  # spread between seeds swamps the gap: inconclusive.
  b = [1.0, 5.0, 9.0]
  a = [x + 1.0 for x in b]
  paired = report.decide([(a, b)], paired=True)
  assert paired['verdict'] == 'held'
  assert paired['differences'][0]['low'] == pytest.approx(1.0)
  assert report.decide([(a, b)], paired=False)['verdict'] == 'inconclusive'


def test_unpaired_difference_is_welchs_interval():
  a, b = [1.0, 2.0, 3.0], [0.0, 0.0, 0.0, 0.0, 6.0]
  va, vb = 1.0 / 3, 7.2 / 5  # sample variances over n
  df = (va + vb) ** 2 / (va ** 2 / 2 + vb ** 2 / 4)
  got = stats.difference(a, b, paired=False)
  assert got.mean == pytest.approx(2.0 - 1.2)
  assert got.half_width == pytest.approx(
      float(scipy_stats.t.ppf(0.975, df)) * math.sqrt(va + vb))


def test_a_claim_of_several_comparisons_needs_all_of_them():
  held, inconclusive = ([2.0, 2.1, 2.2], [1.0, 1.1, 1.2]), ([2.0, 1.0, 3.0], [2.0, 2.0, 2.0])
  assert report.decide([held, held])['verdict'] == 'held'
  assert report.decide([held, inconclusive])['verdict'] == 'inconclusive'
  assert report.decide([held, (held[1], held[0])])['verdict'] == 'contradicted'


def test_verdict_of_a_claimed_decrease():
  diff = stats.Interval(-2.0, -3.0, -1.0, 3)
  assert stats.verdict(diff, -1) == 'held'
  assert stats.verdict(diff, +1) == 'contradicted'


# Baselines on a task small enough to score by hand.
_TRAIN = [('question: q1 context: red green blue', 'blue'),
          ('question: q2 context: red cyan', 'blue'),
          ('question: q3 context: gold silver', 'gold')]
_VALIDATION = [('question: q4 context: blue moon', 'blue'),
               ('question: q5 context: red pale', 'red'),
               ('question: q6 context: gold dust', 'dust')]


def _source(split, shuffle_files, seed=None):
  del shuffle_files, seed
  pairs = _TRAIN if split == 'train' else _VALIDATION
  return tf.data.Dataset.from_tensor_slices({
      'inputs': [i for i, _ in pairs], 'targets': [t for _, t in pairs],
      'answers': [[t] for _, t in pairs]})


@pytest.fixture(scope='module')
def hand_task():
  from gqa_t5x.tasks import embedded, preprocessors  # pylint: disable=g-import-not-at-top
  name = 'test_findings_hand_task'
  if name not in seqio.TaskRegistry.names():
    seqio.TaskRegistry.add(
        name, source=seqio.FunctionDataSource(_source, splits=('train', 'validation')),
        preprocessors=[seqio.preprocessors.tokenize, seqio.preprocessors.append_eos_after_trim],
        postprocess_fn=preprocessors.trivia_qa_postprocess,
        output_features=embedded.OUTPUT_FEATURES, metric_fns=[metrics.trivia_qa])
  return name


def test_baselines_are_computed_from_the_task(hand_task):
  scores = baselines.score(hand_task, {'inputs': 32, 'targets': 8}, module=None)
  # constant: 'blue' (2 of 3 training targets) is right on the first validation example only.
  assert scores['constant'] == pytest.approx({'em': 100 / 3, 'f1': 100 / 3})
  # lead: the context's first word (one: the median target length): blue, red right; gold wrong.
  assert scores['lead'] == pytest.approx({'em': 200 / 3, 'f1': 200 / 3})


def test_lead_copies_the_text_after_the_last_field_marker():
  assert baselines.source_text('question: who? context: Ada wrote it') == 'Ada wrote it'
  assert baselines.source_text('summarize: A long text') == 'A long text'
  assert baselines.source_text('plain text') == 'plain text'
