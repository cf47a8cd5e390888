"""Atomic file writes: a reader (or a rerun after a crash) never sees a half-written output."""
import json
import os
import tempfile
from typing import BinaryIO, Callable


def write_atomically(path: str, write: Callable[[BinaryIO], None]) -> None:
  """Calls write(file) on a temporary file in path's folder (created if missing), then renames
  it to path."""
  folder = os.path.dirname(path) or '.'
  os.makedirs(folder, exist_ok=True)
  fd, tmp = tempfile.mkstemp(dir=folder, prefix='.tmp-' + os.path.basename(path))
  try:
    with os.fdopen(fd, 'wb') as f:
      write(f)
    os.replace(tmp, path)
  except BaseException:
    os.unlink(tmp)
    raise


def write_text(path: str, text: str) -> None:
  write_atomically(path, lambda f: f.write(text.encode()))


def write_json(path: str, document) -> None:
  write_text(path, json.dumps(document, indent=2) + '\n')
