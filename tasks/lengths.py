"""The paper's input/output lengths, in one place for gin configs, the runner and the tests.

`from gqa_t5x.tasks.lengths import TASK_FEATURE_LENGTHS`.
"""

# Uptraining follows T5.1.1's pre-training: 512 input tokens; span corruption of 568 raw tokens
# (noise density 0.15, mean span 3) gives at most 114 target tokens, T5X's pretrain length.
UPTRAINING_FEATURE_LENGTHS = {"inputs": 512, "targets": 114}

# Section 4 of the paper: CNN/DM and WMT 512/256; arXiv, PubMed, MediaSum, Multi-News 2048/512;
# TriviaQA 2048/32.
TASK_FEATURE_LENGTHS = {
    "gqa_c4_span_corruption": UPTRAINING_FEATURE_LENGTHS,
    "gqa_cnn_dailymail": {"inputs": 512, "targets": 256},
    "gqa_arxiv": {"inputs": 2048, "targets": 512},
    "gqa_pubmed": {"inputs": 2048, "targets": 512},
    "gqa_mediasum": {"inputs": 2048, "targets": 512},
    "gqa_multi_news": {"inputs": 2048, "targets": 512},
    "gqa_wmt14_ende": {"inputs": 512, "targets": 256},
    "gqa_trivia_qa": {"inputs": 2048, "targets": 32},
    # Small embedded tasks for CPU runs (not from the paper).
    "gqa_embedded_span_corruption": {"inputs": 128, "targets": 32},
    "gqa_embedded_lead_summary": {"inputs": 256, "targets": 64},
    "gqa_embedded_module_qa": {"inputs": 96, "targets": 8},
}

PAPER_DOWNSTREAM_TASKS = ("gqa_cnn_dailymail", "gqa_arxiv", "gqa_pubmed", "gqa_mediasum",
                          "gqa_multi_news", "gqa_wmt14_ende", "gqa_trivia_qa")


def feature_lengths(task_name: str) -> dict:
  """A copy of TASK_FEATURE_LENGTHS[task_name], with an error that lists the known tasks."""
  if task_name not in TASK_FEATURE_LENGTHS:
    raise KeyError(f"no feature lengths for task {task_name!r}; known tasks: "
                   f"{', '.join(sorted(TASK_FEATURE_LENGTHS))}")
  return dict(TASK_FEATURE_LENGTHS[task_name])
