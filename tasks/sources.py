"""A TFDS source that reads prepared data only, and says how to prepare what is missing.

seqio.TfdsDataSource calls `tfds.load(download=True)`: without network access a missing
dataset then hangs for minutes in download retries. This source never downloads; a missing
dataset fails at once with the dataset, the data directory looked in and the command that
prepares it.
"""
from typing import Optional

import seqio


class DatasetNotPreparedError(FileNotFoundError):
  """The TFDS dataset has not been prepared in the data directory."""


class PreparedTfdsDataSource(seqio.TfdsDataSource):
  """seqio.TfdsDataSource in read-only mode, with an actionable error for missing data.

  `how_to_prepare` tells how to build the dataset into `{data_dir}`, for datasets that plain
  `tfds build` cannot fetch by itself.
  """

  def __init__(self, tfds_name: str, how_to_prepare: Optional[str] = None,
               splits=("train", "validation", "test"), **kwargs):
    # Explicit splits: TFDS knows a dataset's splits only once it is prepared.
    super().__init__(tfds_name=tfds_name, read_only=True, splits=splits, **kwargs)
    self._how_to_prepare = how_to_prepare or f"run `tfds build {tfds_name} --data_dir={{data_dir}}`"

  def _not_prepared_error(self) -> DatasetNotPreparedError:
    builder = self.tfds_dataset.builder
    return DatasetNotPreparedError(
        f"TFDS dataset {self.tfds_dataset.name} is not prepared in the TFDS data directory "
        f"{builder.data_dir_root} (looked for {builder.data_dir}). To prepare it, on a "
        f"machine with network access "
        f"{self._how_to_prepare.format(data_dir=builder.data_dir_root)}, and copy the data "
        "directory here; or point TFDS_DATA_DIR (or seqio.set_tfds_data_dir_override) at a "
        "directory that has it.")

  def _is_prepared(self) -> bool:
    return bool(self.tfds_dataset.builder.info.splits)

  def get_dataset(self, split: Optional[str] = None, *args, **kwargs):
    try:
      return super().get_dataset(split, *args, **kwargs)
    except AssertionError as e:  # TFDS's "could not find data in <data_dir>"
      raise self._not_prepared_error() from e

  def num_input_examples(self, split: str) -> Optional[int]:
    # Unknown (None) until prepared; reading the data reports the missing dataset.
    return super().num_input_examples(split) if self._is_prepared() else None

  def list_shards(self, split: str):
    if not self._is_prepared():
      raise self._not_prepared_error()
    return super().list_shards(split)
