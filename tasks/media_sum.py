"""MediaSum (Zhu et al. 2021) as a TFDS dataset built from the public release's local files.

TFDS's own `media_sum` needs Apache Beam; this builder reads the two files of
https://github.com/zcgzcgzcg1/MediaSum/tree/main/data directly:

  news_dialogue.json          [{"id", "program", "date", "url", "title", "summary",
                                "utt": [...], "speaker": [...]}, ...]
  train_val_test_split.json   {"train": [ids], "val": [ids], "test": [ids]}

Prepare once (writes TFRecords under the TFDS data directory):

  python -m gqa_t5x.tasks.prepare_mediasum --release_dir=/path/to/MediaSum/data [--data_dir=DIR]
"""
import json
import os

from etils import epath
import tensorflow_datasets as tfds

NAME = "gqa_media_sum"
RELEASE_FILES = ("news_dialogue.json", "train_val_test_split.json")
# The release calls its validation split 'val'.
_SPLITS = {"train": "train", "validation": "val", "test": "test"}


class GqaMediaSum(tfds.core.GeneratorBasedBuilder):
  """MediaSum interview transcripts and their summaries."""

  VERSION = tfds.core.Version("1.0.0")
  # TFDS derives this from the module name, which the editable install maps elsewhere.
  pkg_dir_path = epath.Path(__file__).parent
  MANUAL_DOWNLOAD_INSTRUCTIONS = (
      f"Download {' and '.join(RELEASE_FILES)} from "
      "https://github.com/zcgzcgzcg1/MediaSum/tree/main/data (unzip news_dialogue.json.zip) "
      "and pass their directory as the manual dir.")

  def _info(self) -> tfds.core.DatasetInfo:
    return tfds.core.DatasetInfo(
        builder=self,
        description="MediaSum interview transcripts (NPR, CNN) with their summaries.",
        features=tfds.features.FeaturesDict({
            "id": tfds.features.Text(),
            "summary": tfds.features.Text(),
            "utt": tfds.features.Sequence(tfds.features.Text()),
            "speaker": tfds.features.Sequence(tfds.features.Text()),
        }),
        homepage="https://github.com/zcgzcgzcg1/MediaSum",
        citation="Zhu, Liu, Mei, Zeng. MediaSum: A Large-scale Media Interview Dataset for "
        "Dialogue Summarization. NAACL 2021.")

  def _split_generators(self, dl_manager: tfds.download.DownloadManager):
    release_dir = dl_manager.manual_dir
    missing = [f for f in RELEASE_FILES if not (release_dir / f).exists()]
    if missing:
      raise FileNotFoundError(
          f"MediaSum release files {missing} are not in {release_dir}. "
          + self.MANUAL_DOWNLOAD_INSTRUCTIONS)
    with (release_dir / "train_val_test_split.json").open() as f:
      split_ids = json.load(f)
    with (release_dir / "news_dialogue.json").open() as f:
      interviews = json.load(f)
    return {split: self._generate_examples(interviews, frozenset(split_ids[release_split]))
            for split, release_split in _SPLITS.items()}

  def _generate_examples(self, interviews, ids):
    for interview in interviews:
      if interview["id"] in ids:
        yield interview["id"], {key: interview[key] for key in ("id", "summary", "utt", "speaker")}


def prepare(release_dir: str, data_dir=None) -> None:
  """Builds gqa_media_sum from the release files in `release_dir` into the TFDS data_dir."""
  builder = GqaMediaSum(data_dir=data_dir)
  builder.download_and_prepare(
      download_config=tfds.download.DownloadConfig(manual_dir=os.path.abspath(release_dir)))
