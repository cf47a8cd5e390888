"""The paper's tasks: span-corruption uptraining on C4 and the seven fine-tuning tasks.

All read prepared TFDS data only (see sources.py) and share one vocabulary, T5's by default
(vocab.get_vocabulary). Their lengths are in lengths.TASK_FEATURE_LENGTHS.
"""
import functools

import seqio

from gqa_t5x import metrics
from gqa_t5x.tasks import media_sum
from gqa_t5x.tasks import preprocessors
from gqa_t5x.tasks import span_corruption
from gqa_t5x.tasks import vocab
from gqa_t5x.tasks.sources import PreparedTfdsDataSource

VOCABULARY = vocab.DeferredVocabulary(vocab.get_vocabulary)
OUTPUT_FEATURES = {
    "inputs": seqio.Feature(VOCABULARY, add_eos=True, required=False),
    "targets": seqio.Feature(VOCABULARY, add_eos=True),
}

# T5.1.1's pre-training data, as T5's c4_v220_span_corruption reads it: uptraining continues
# that pre-training on the same corpus version.
seqio.TaskRegistry.add(
    "gqa_c4_span_corruption",
    source=PreparedTfdsDataSource(
        "c4/en:2.2.0",
        how_to_prepare=("build it with Apache Beam as https://www.tensorflow.org/datasets/"
                        "catalog/c4 describes (`tfds build c4/en:2.2.0 --data_dir={data_dir} "
                        "--beam_pipeline_options=...`)")),
    preprocessors=[
        functools.partial(seqio.preprocessors.rekey, key_map={"targets": "text"}),
        *span_corruption.token_preprocessors(),
    ],
    output_features=OUTPUT_FEATURES,
    metric_fns=[])


def _add_seq2seq_task(name, source, text_preprocessor, metric_fn, token_preprocessors=(),
                      postprocess_fn=None):
  preprocessors.add_text_to_text_task(
      name, source, OUTPUT_FEATURES, metric_fn, text_preprocessors=(text_preprocessor,),
      token_preprocessors=token_preprocessors, postprocess_fn=postprocess_fn)


_add_seq2seq_task("gqa_cnn_dailymail", PreparedTfdsDataSource("cnn_dailymail:3.4.0"),
                  preprocessors.summarize("article", "highlights"), metrics.rouge)
_add_seq2seq_task("gqa_arxiv", PreparedTfdsDataSource("scientific_papers/arxiv:1.1.1"),
                  preprocessors.summarize("article", "abstract"), metrics.rouge)
_add_seq2seq_task("gqa_pubmed", PreparedTfdsDataSource("scientific_papers/pubmed:1.1.1"),
                  preprocessors.summarize("article", "abstract"), metrics.rouge)
_add_seq2seq_task("gqa_multi_news", PreparedTfdsDataSource("multi_news:2.1.0"),
                  preprocessors.summarize("document", "summary"), metrics.rouge)
_add_seq2seq_task(
    "gqa_mediasum",
    PreparedTfdsDataSource(
        f"{media_sum.NAME}:{media_sum.GqaMediaSum.VERSION}",
        how_to_prepare=("download news_dialogue.json and train_val_test_split.json from "
                        "https://github.com/zcgzcgzcg1/MediaSum/tree/main/data into DIR and "
                        "run `python -m gqa_t5x.tasks.prepare_mediasum --release_dir=DIR "
                        "--data_dir={data_dir}`")),
    preprocessors.summarize_interview, metrics.rouge)
_add_seq2seq_task("gqa_wmt14_ende", PreparedTfdsDataSource("wmt14_translate/de-en:1.0.0"),
                  preprocessors.translate("en", "de", "English", "German"), metrics.bleu)
_add_seq2seq_task("gqa_trivia_qa", PreparedTfdsDataSource("trivia_qa/rc:1.1.0"),
                  preprocessors.trivia_qa, metrics.trivia_qa,
                  token_preprocessors=[preprocessors.trivia_qa_truncate_inputs],
                  postprocess_fn=preprocessors.trivia_qa_postprocess)
