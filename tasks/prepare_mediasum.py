"""Builds the gqa_media_sum TFDS dataset from the MediaSum release files (see media_sum.py).

  python -m gqa_t5x.tasks.prepare_mediasum --release_dir=/path/to/MediaSum/data [--data_dir=DIR]
"""
from absl import app
from absl import flags

from gqa_t5x.tasks import media_sum

_RELEASE_DIR = flags.DEFINE_string(
    "release_dir", None, f"directory holding {' and '.join(media_sum.RELEASE_FILES)}",
    required=True)
_DATA_DIR = flags.DEFINE_string(
    "data_dir", None, "TFDS data directory (default: TFDS_DATA_DIR or ~/tensorflow_datasets)")


def main(argv):
  del argv
  media_sum.prepare(_RELEASE_DIR.value, _DATA_DIR.value)


if __name__ == "__main__":
  app.run(main)
