"""An embedded English corpus that needs no download: docstrings of the Python standard library.

Every CPython installation carries these sources, so CPU runs, tests and the README demo work
offline. The text is read with `ast` (nothing is imported or executed) from a fixed list of
modules, in a fixed order, and split into train/validation by a hash of the text, so the corpus
is the same in every fresh process. Pure Python.
"""
import ast
import functools
import os
import re
import sysconfig
import zlib

# Pure-Python standard-library modules with plenty of English prose in their docstrings.
_MODULES = (
    "abc argparse ast base64 bdb bisect calendar cmd codecs collections colorsys configparser "
    "contextlib copy csv dataclasses datetime difflib dis email enum fileinput fnmatch fractions "
    "ftplib functools getopt gettext glob gzip hashlib heapq hmac http imaplib inspect ipaddress "
    "json locale logging mailbox mimetypes netrc numbers operator optparse os pathlib pdb pickle "
    "pkgutil platform poplib pprint queue random re sched secrets selectors shlex shutil smtplib "
    "socket socketserver statistics string subprocess tarfile tempfile textwrap threading timeit "
    "tokenize trace traceback typing unittest urllib uuid warnings wave weakref zipfile").split()

SPLITS = ("train", "validation")
_VALIDATION_BUCKET = 0  # one text in ten (crc32 % 10 == 0) is validation


def _module_source(name: str) -> str:
  stdlib = sysconfig.get_paths()["stdlib"]
  for path in (os.path.join(stdlib, f"{name}.py"), os.path.join(stdlib, name, "__init__.py")):
    if os.path.exists(path):
      with open(path, encoding="utf-8") as f:
        return f.read()
  raise FileNotFoundError(
      f"the embedded corpus reads the standard library's source, but {name}.py is not under "
      f"{stdlib}; install a Python distribution that ships its .py sources")


@functools.lru_cache(maxsize=None)
def _docstrings() -> tuple:
  """(module name, docstring) of every module, class and function, in a fixed order."""
  docs = []
  for name in _MODULES:
    for node in ast.walk(ast.parse(_module_source(name))):
      if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
        doc = ast.get_docstring(node)
        if doc and len(doc.split()) >= 8:
          docs.append((name, doc))
  return tuple(docs)


def _split_of(text: str) -> str:
  return "validation" if zlib.crc32(text.encode()) % 10 == _VALIDATION_BUCKET else "train"


def _check_split(split: str) -> None:
  if split not in SPLITS:
    raise ValueError(f"unknown split {split!r} of the embedded corpus; use one of {SPLITS}")


def documents(split: str) -> list:
  """Whole docstrings (at least 8 words) of the split: the uptraining corpus."""
  _check_split(split)
  return [doc for _, doc in _docstrings() if _split_of(doc) == split]


MODULE_QUESTION = "question: which standard-library module is this from?"
_MODULE_CONTEXT_WORDS = 32


def module_qa_examples(split: str) -> list:
  """(question and context, module name) pairs: which standard-library module a docstring is from.

  Closed-set question answering (the answer is one of the corpus's module names, rarely in the
  context itself): the model must read the whole context and recognise its subject, so neither
  a constant answer nor the context's first words score well. The context is the docstring's
  first 32 words, whitespace collapsed; a docstring belongs to its split as in documents().
  """
  _check_split(split)
  return [(f"{MODULE_QUESTION} context: {' '.join(doc.split()[:_MODULE_CONTEXT_WORDS])}", name)
          for name, doc in _docstrings() if _split_of(doc) == split]


_SENTENCE_END = re.compile(r"(?<=[.!?])\s+")


def lead_summary_pairs(split: str) -> list:
  """(paragraph, first sentence) pairs: extractive 'lead' summarisation, scored with ROUGE.

  Paragraphs of at least two sentences and 15 words, whitespace collapsed to single spaces. A
  paragraph belongs to its docstring's split, so validation text is never seen in uptraining.
  """
  pairs = []
  for doc in documents(split):
    for paragraph in re.split(r"\n\s*\n", doc):
      paragraph = " ".join(paragraph.split())
      sentences = _SENTENCE_END.split(paragraph)
      if len(sentences) >= 2 and len(paragraph.split()) >= 15:
        pairs.append((paragraph, sentences[0]))
  return pairs
