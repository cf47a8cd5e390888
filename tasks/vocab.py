"""Vocabularies: T5's 32k SentencePiece model by default, any local SentencePiece model instead.

Nothing here touches a file or the network at import time: a SentencePieceVocabulary reads its
model on first use, and tasks hold a `DeferredVocabulary` that asks the gin-configurable
functions below which vocabulary to use only when a dataset is built, so gin bindings parsed
after `import gqa_t5x.tasks` still apply.

  get_vocabulary.sentencepiece_model_file = '/path/to/spm.model'    # paper tasks
  embedded_vocabulary.sentencepiece_model_file = '/path/to/spm.model'  # embedded tasks
"""
import hashlib
import os
import tempfile
from typing import Callable, Optional

import gin
import seqio
import sentencepiece as spm

from gqa_t5x.tasks import corpus

T5_SENTENCEPIECE_MODEL = "gs://t5-data/vocabs/cc_all.32000.100extra/sentencepiece.model"
T5_EXTRA_IDS = 100


@gin.configurable
def get_vocabulary(sentencepiece_model_file: str = T5_SENTENCEPIECE_MODEL,
                   extra_ids: int = T5_EXTRA_IDS) -> seqio.SentencePieceVocabulary:
  """The vocabulary of the paper's tasks (and of the model that reads them)."""
  return seqio.SentencePieceVocabulary(sentencepiece_model_file, extra_ids=extra_ids)


@gin.configurable
def embedded_vocabulary(sentencepiece_model_file: Optional[str] = None,
                        vocab_size: int = 1000,
                        extra_ids: int = T5_EXTRA_IDS,
                        cache_dir: Optional[str] = None) -> seqio.SentencePieceVocabulary:
  """The embedded tasks' vocabulary: by default a small one trained on the embedded corpus."""
  if sentencepiece_model_file is None:
    sentencepiece_model_file = embedded_sentencepiece_model(vocab_size, cache_dir)
  return seqio.SentencePieceVocabulary(sentencepiece_model_file, extra_ids=extra_ids)


# (vocab_size, cache_dir) -> model path found or trained by this process.
_MODEL_PATHS: dict[tuple[int, str], str] = {}


def default_cache_dir() -> str:
  return os.environ.get("GQA_T5X_CACHE_DIR",
                        os.path.join(os.path.expanduser("~"), ".cache", "gqa_t5x"))


def embedded_sentencepiece_model(vocab_size: int = 1000, cache_dir: Optional[str] = None) -> str:
  """Path of a SentencePiece model trained on the embedded corpus's train split, cached.

  Training is deterministic (fixed sentence order, one thread, no sampling), and the cache
  file is named after the corpus's hash and the size, so a cached model is the model that
  training would produce now. Written to a temporary file and renamed into place, so a reader
  never sees a partial model.
  """
  if not 100 <= vocab_size <= 32000:
    raise ValueError(f"vocab_size={vocab_size}: use 100..32000 SentencePiece pieces")
  cache_dir = cache_dir or default_cache_dir()
  known = _MODEL_PATHS.get((vocab_size, cache_dir))
  if known and os.path.exists(known):  # every vocabulary use lands here: skip the corpus hash
    return known
  sentences = [" ".join(paragraph.split())
               for doc in corpus.documents("train") for paragraph in doc.split("\n\n")]
  sentences = [s for s in sentences if s]
  digest = hashlib.sha256("\n".join(sentences).encode()).hexdigest()[:12]
  path = _MODEL_PATHS[(vocab_size, cache_dir)] = os.path.join(
      cache_dir, f"embedded_spm_{vocab_size}_{digest}.model")
  if os.path.exists(path):
    return path
  os.makedirs(cache_dir, exist_ok=True)
  with tempfile.TemporaryDirectory(dir=cache_dir) as tmp:
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(sentences), model_prefix=os.path.join(tmp, "spm"),
        vocab_size=vocab_size, model_type="unigram", num_threads=1,
        input_sentence_size=0, shuffle_input_sentence=False, max_sentence_length=16384,
        # T5's special ids: 0 pad, 1 eos, 2 unk, no bos.
        pad_id=0, eos_id=1, unk_id=2, bos_id=-1, minloglevel=2)
    os.replace(os.path.join(tmp, "spm.model"), path)
  return path


class DeferredVocabulary(seqio.Vocabulary):
  """A vocabulary that delegates to `resolve()`, called when the vocabulary is used.

  Tasks are registered when `gqa_t5x.tasks` is imported, before gin files are parsed; this
  lets their vocabulary follow the gin bindings of `get_vocabulary`/`embedded_vocabulary`.
  """

  def __init__(self, resolve: Callable[[], seqio.Vocabulary]):
    self._resolve = resolve
    super().__init__()

  @property
  def vocabulary(self) -> seqio.Vocabulary:
    return self._resolve()

  @property
  def bos_id(self):
    return self.vocabulary.bos_id

  @property
  def eos_id(self):
    return self.vocabulary.eos_id

  @property
  def unk_id(self):
    return self.vocabulary.unk_id

  @property
  def pad_id(self):
    return self.vocabulary.pad_id

  @property
  def extra_ids(self):
    return self.vocabulary.extra_ids

  @property
  def vocab_size(self):
    return self.vocabulary.vocab_size

  @property
  def _base_vocab_size(self):
    return self.vocabulary._base_vocab_size  # pylint: disable=protected-access

  def encode(self, s):
    return self.vocabulary.encode(s)

  def decode(self, ids):
    return self.vocabulary.decode(ids)

  def encode_tf(self, s):
    return self.vocabulary.encode_tf(s)

  def decode_tf(self, ids):
    return self.vocabulary.decode_tf(ids)

  # seqio.Vocabulary's abstract hooks; the public methods above never reach them.
  _encode = encode
  _decode = decode
  _encode_tf = encode_tf
  _decode_tf = decode_tf

  def __eq__(self, other):
    if isinstance(other, DeferredVocabulary):
      other = other.vocabulary
    return self.vocabulary == other

  def __hash__(self):
    return id(self._resolve)

  def __str__(self):
    return f"DeferredVocabulary({self._resolve.__name__})"
