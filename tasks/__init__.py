"""SeqIO tasks of the GQA paper (importing this module registers them).

Paper tasks (TFDS, T5's vocabulary by default): gqa_c4_span_corruption, gqa_cnn_dailymail,
gqa_arxiv, gqa_pubmed, gqa_multi_news, gqa_mediasum, gqa_wmt14_ende, gqa_trivia_qa.
Embedded tasks (no download, small vocabulary): gqa_embedded_span_corruption,
gqa_embedded_lead_summary. Lengths: lengths.TASK_FEATURE_LENGTHS.
"""
from gqa_t5x.tasks import embedded  # pylint: disable=unused-import
from gqa_t5x.tasks import paper  # pylint: disable=unused-import
from gqa_t5x.tasks.lengths import TASK_FEATURE_LENGTHS  # pylint: disable=unused-import
