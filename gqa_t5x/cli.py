"""What every gqa-t5x command does the same way: flags, help, errors and log output.

- `--gin.NAME=value` is T5X's shorthand for `--gin_bindings='NAME = value'`.
- A user error (an unknown flag, a bad value, a bad gin config or checkpoint) prints
  `<command>: error: <what was wrong and what would be accepted>` and exits with status 2.
- `--help` prints the command's description and the flags it reads, and exits with status 0.
- Output is for people: the project's own progress and warnings, every library's warnings and
  errors, but not the libraries' INFO lines (Orbax logs kilobytes of them), and long messages
  wrapped; `--verbosity=0` (absl's flag) shows everything, TF_CPP_MIN_LOG_LEVEL=0 the C++ logs of
  TensorFlow and XLA.
"""
import importlib.util
import logging as python_logging
import os
import re
import sys
import textwrap
from typing import Callable, Optional, Sequence

from absl import app
from absl import flags
from absl import logging

from gqa_t5x import errors

# The C++ logs of TensorFlow (only seqio's input pipelines here) and of XLA: on a machine without
# a GPU, TensorFlow logs an ERROR for the GPU it did not find. Failures raise Python exceptions;
# TF_CPP_MIN_LOG_LEVEL=0 shows the logs.
os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '3')

_GIN_FLAG = re.compile(r'^--gin\.([^=]+)=(.*)$', re.DOTALL)
_GIN_CALL_NOTE = '\n  In call to configurable'  # gin appends this to errors raised in a job
_WIDTH = 160  # of a log message line, after absl's prefix (about 60 characters)
_HELP = ('-h', '-help', '--help', '-helpshort', '--helpshort', '-?')


def rewrite_gin_args(argv: Sequence[str]) -> list[str]:
  """--gin.NAME=value -> --gin_bindings='NAME = value' (T5X's shorthand)."""
  return [f'--gin_bindings={m.group(1)} = {m.group(2)}' if (m := _GIN_FLAG.match(a)) else a
          for a in argv]


def run(command: str, main: Callable[[list[str]], None], description: str,
        argv: Optional[Sequence[str]] = None) -> None:
  """Parses the flags (sys.argv unless argv is given) and runs main(positional arguments)."""
  def parse(args):
    if any(a in _HELP for a in args[1:]):
      print(help_text(command, description))
      sys.exit(0)
    try:
      return flags.FLAGS(args)
    except flags.Error as e:
      usage_error(command, f'{e} (`{command} --help` lists the flags it accepts)')

  def checked_main(args):
    handler = logging.get_absl_handler()
    filters = ([] if flags.FLAGS['verbosity'].present else [_OwnInfoOnly()]) + [_WrappedLines()]
    for f in filters:
      handler.addFilter(f)
    try:
      main(args)
    except (errors.ConfigError, app.UsageError) as e:
      usage_error(command, str(e).split(_GIN_CALL_NOTE)[0])
    finally:
      for f in filters:
        handler.removeFilter(f)

  app.run(checked_main, argv=rewrite_gin_args(sys.argv if argv is None else argv),
          flags_parser=parse)


def usage_error(command: str, message: str) -> None:
  print(f'{command}: error: {message}', file=sys.stderr)
  sys.exit(2)


def no_positional_arguments(args: Sequence[str]) -> None:
  if len(args) > 1:
    raise app.UsageError(f'unexpected arguments {" ".join(args[1:])}: every option is a --flag')


def help_text(command: str, description: str) -> str:
  """The description, then the project's flags defined in this process (absl's and libraries'
  own flags, e.g. Orbax's, are for --helpfull)."""
  own = sorted((flag for module, module_flags in flags.FLAGS.flags_by_module_dict().items()
                if module.startswith('gqa_t5x.') or module == sys.argv[0]
                for flag in module_flags), key=lambda flag: flag.name)
  lines = [description.strip(), '', f'Flags of {command}:']
  for flag in own:
    default = f' (default: {flag.default_as_str})' if flag.default not in (None, [], '') else ''
    lines += textwrap.wrap(f'--{flag.name}: {flag.help}{default}', 98, initial_indent='  ',
                           subsequent_indent='      ')
  lines += ['', "absl's flags (--verbosity, --flagfile, ...) and the libraries' flags: --helpfull."]
  return '\n'.join(lines)


def import_tensorflow_quietly() -> None:
  """Imports TensorFlow with its native stderr (file descriptor 2) sent to /dev/null, unless
  TF_CPP_MIN_LOG_LEVEL=0. Why: TensorFlow 2.21's libraries log at load time, through absl before
  absl's logging is set up, whatever TF_CPP_MIN_LOG_LEVEL says: six lines (oneDNN is on, no CUDA
  driver, each twice) before a command's first line of its own. A failed import still raises."""
  if 'tensorflow' in sys.modules or os.environ['TF_CPP_MIN_LOG_LEVEL'] == '0':
    return
  sys.stderr.flush()
  saved, null = os.dup(2), os.open(os.devnull, os.O_WRONLY)
  try:
    os.dup2(null, 2)
    import tensorflow  # pylint: disable=g-import-not-at-top,unused-import
  finally:
    os.dup2(saved, 2)
    os.close(saved)
    os.close(null)


def _package_dirs() -> tuple[str, ...]:
  """Where the project's modules live: gqa_t5x/, and tasks/ in a source checkout."""
  specs = (importlib.util.find_spec(name) for name in ('gqa_t5x', 'gqa_t5x.tasks'))
  return tuple(os.path.join(path, '') for spec in specs
               for path in spec.submodule_search_locations)


class _OwnInfoOnly(python_logging.Filter):
  """Passes warnings and errors, and INFO lines logged by the project itself."""

  def __init__(self):
    super().__init__()
    self._dirs = _package_dirs()

  def filter(self, record: python_logging.LogRecord) -> bool:
    return record.levelno >= python_logging.WARNING or record.pathname.startswith(self._dirs)


class _WrappedLines(python_logging.Filter):
  """Wraps a message longer than a terminal line onto indented continuation lines."""

  def filter(self, record: python_logging.LogRecord) -> bool:
    lines = record.getMessage().splitlines()
    if any(len(line) > _WIDTH for line in lines):
      wrapped = (textwrap.fill(line, _WIDTH, subsequent_indent='    ') for line in lines)
      record.msg, record.args = '\n'.join(wrapped), ()
    return True
