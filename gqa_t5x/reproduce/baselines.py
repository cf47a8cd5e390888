"""Scores of trivial predictors on a task's validation split, with the task's own metrics.

A fine-tuned model's score means something only beside what no model is needed for: answering
every example with the most frequent training target ('constant'), or copying the first words of
the input's text ('lead', as many words as a typical target; the text after the input's last
'field:' marker, e.g. the context of 'question: ... context: ...'). The reproduction reports
both beside Table 1.
"""
import collections
import re
import statistics

from gqa_t5x import data

_FIELD = re.compile(r'\b[a-z_]+: ')


def source_text(inputs: str) -> str:
  """The input's text after its last 'field: ' marker (all of it if it has none)."""
  return _FIELD.split(inputs)[-1]


def _text(example: dict, feature: str) -> str:
  value = example[f'{feature}_pretokenized']
  return value.decode('utf-8') if isinstance(value, bytes) else str(value)


def predictors(train_examples: list[dict], postprocess) -> dict:
  """{name: fn(example) -> prediction string} fitted on the training examples.

  Target lengths are counted in the words the metric compares (after the task's postprocessing,
  e.g. without sentinels)."""
  targets = [_text(ex, 'targets') for ex in train_examples]
  constant = collections.Counter(targets).most_common(1)[0][0]
  words = max(1, round(statistics.median(
      len(postprocess(t, example=ex, is_target=False).split())
      for t, ex in zip(targets, train_examples))))
  return {
      'constant': lambda ex: constant,
      'lead': lambda ex: ' '.join(source_text(_text(ex, 'inputs')).split()[:words]),
  }


def score(task_name: str, task_feature_lengths: dict, module: str = 'gqa_t5x.tasks'
          ) -> dict[str, dict[str, float]]:
  """{baseline: {metric: score}} on the validation split, through the task's postprocessing."""
  def examples(split):
    cfg = data.DatasetConfig(task_name, task_feature_lengths, split, batch_size=1,
                             shuffle=False, module=module)
    return data.get_task(cfg), data.model_inputs(data.get_task(cfg), cfg)

  task, validation = examples('validation')
  postprocess = task.postprocess_fn or (lambda output, example=None, is_target=False: output)
  targets = [postprocess(_text(ex, 'targets'), example=ex, is_target=True) for ex in validation]
  out = {}
  for name, predict in predictors(examples('train')[1], postprocess).items():
    predictions = [postprocess(predict(ex), example=ex, is_target=False) for ex in validation]
    out[name] = {k: float(getattr(v, 'value', v)) for fn in task.metric_fns
                 for k, v in fn(targets, predictions).items()}
  return out
