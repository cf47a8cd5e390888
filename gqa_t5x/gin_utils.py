"""T5X's gin command line (--gin_file, --gin_bindings, --gin.NAME=value, --gin_search_paths),
plus the macro checks T5X lacks: a misspelt or missing macro fails before any work starts."""
import importlib
import logging as python_logging
import os
import re
from typing import Sequence

from absl import logging
import gin

import gqa_t5x
from gqa_t5x import cli
from gqa_t5x import common_flags
from gqa_t5x import errors

DEFAULT_SEARCH_PATHS = ('.',)  # T5X's; the project's gin configs are always searched after them


def search_path(user_paths: Sequence[str]) -> list[str]:
  """T5X's order: the user's paths first, then the project's own gin configs."""
  return [*user_paths, str(gqa_t5x.GIN_CONFIGS_DIR)]


class _SearchMissFilter(python_logging.Filter):
  """gin's package-resource reader logs an ERROR for every search path that lacks a gin file,
  even when a later one has it; gin raises by itself when none has it."""

  def filter(self, record: python_logging.LogRecord) -> bool:
    return not record.pathname.endswith(os.path.join('gin', 'resource_reader.py'))


python_logging.getLogger().addFilter(_SearchMissFilter())  # gin logs through the root logger


rewrite_gin_args = cli.rewrite_gin_args  # --gin.NAME=value -> --gin_bindings (T5X's shorthand)


def _macro_names(bindings: Sequence[str]) -> set[str]:
  """Upper-case macro names a list of bindings assigns (NAME = value)."""
  return {m.group(1) for b in bindings if (m := re.match(r'\s*([A-Z][A-Z0-9_]*)\s*=', b))}


def check_macros(command_line_macros: set[str]) -> None:
  """Unknown (set but never referenced) or missing (still REQUIRED) macros -> one clear error."""
  config = gin.config._CONFIG  # gin has no public iterator over macro definitions
  macro_fn = gin.config.get_configurable(gin.config.macro)
  defined = {scope: bindings.get('value') for (scope, selector), bindings in config.items()
             if selector == 'gin.macro'}
  referenced = {ref.config_key[0] for ref in gin.config.iterate_references(config, to=macro_fn)}
  unknown = sorted(command_line_macros - referenced)
  if unknown:
    raise errors.ConfigError(f'Unknown gin macro {unknown[0]}: no loaded gin file uses '
                             f'%{unknown[0]}. Macros these gin files accept: {sorted(referenced)}')
  undefined = sorted(referenced - set(defined))
  if undefined:
    raise errors.ConfigError(f'Gin macro {undefined[0]} is used but never set: pass '
                     f'--gin.{undefined[0]}=... or include the gin file that defines it.')
  for name in sorted(referenced):
    value = defined[name]
    if isinstance(value, gin.config.ConfigurableReference) and \
        value.configurable.wrapped == gin.config._retrieve_constant and \
        value.scoped_configurable_fn() is gin.REQUIRED:
      raise errors.ConfigError(f'Missing required gin macro {name}: pass --gin.{name}=... '
                       f'(strings need quotes, e.g. --gin.MODEL_DIR=\\"/tmp/run\\").')


def parse_gin(gin_files: Sequence[str], gin_bindings: Sequence[str],
              search_paths: Sequence[str] = DEFAULT_SEARCH_PATHS) -> None:
  """Parses files then bindings, checks macros, and locks the config."""
  if not gin_files:
    raise errors.ConfigError('No --gin_file given: pass a model gin (e.g. '
                             'models/t5_1_1/small.gin) and a run gin (e.g. runs/pretrain.gin).')
  gin.clear_config()
  for path in search_path(search_paths):
    gin.add_config_file_search_path(path)
  try:
    gin.parse_config_files_and_bindings(gin_files, gin_bindings, finalize_config=False)
  except (ValueError, OSError) as e:  # gin's own message names the file, line and binding
    raise errors.ConfigError(f'Bad gin config: {e}') from e
  check_macros(_macro_names(gin_bindings))
  _import_task_module()
  gin.finalize()


def model_config(gin_files: Sequence[str], bindings: Sequence[str] = (),
                 search_paths: Sequence[str] = DEFAULT_SEARCH_PATHS):
  """The network.T5Config that model gin files bind; leaves gin's global config empty."""
  from gqa_t5x import network  # pylint: disable=g-import-not-at-top  (jax only when needed)
  gin.clear_config()
  for path in search_path(search_paths):
    gin.add_config_file_search_path(path)
  try:
    gin.parse_config_files_and_bindings(list(gin_files), list(bindings))
    return gin.get_configurable(network.T5Config)()
  except (OSError, TypeError, ValueError) as e:
    raise errors.ConfigError('the gin files must configure gqa_t5x.network.T5Config (a model gin '
                             f'such as models/t5_1_1/small.gin): {str(e).splitlines()[0]}') from e
  finally:
    gin.clear_config()


def _import_task_module() -> None:
  """Imports MIXTURE_OR_TASK_MODULE now: a task module may register gin configurables, which gin
  refuses once the config is locked."""
  try:
    module = gin.query_parameter('%MIXTURE_OR_TASK_MODULE')
  except ValueError:
    return
  if module:
    try:
      importlib.import_module(module)
    except ImportError as e:
      raise errors.ConfigError(f'MIXTURE_OR_TASK_MODULE={module!r} cannot be imported ({e}): '
                               'name an importable module that registers your tasks.') from e


def initialize_distributed(settings: common_flags.MultiprocessFlags) -> None:
  """jax.distributed.initialize from the flags; CPU processes talk over gloo."""
  if settings.coordinator_address.value or settings.auto_detect.value:
    import jax  # pylint: disable=g-import-not-at-top
    jax.config.update('jax_cpu_collectives_implementation', 'gloo')
    jax.distributed.initialize(coordinator_address=settings.coordinator_address.value,
                               num_processes=settings.process_count.value,
                               process_id=settings.process_index.value)


def command(name: str, job: str, description: str):
  """The console-script `main` of `name`: parses the gin flags, then runs the gin-configured
  gqa_t5x.runs.<job> (imported only then, so that --help and flag errors are quick)."""
  gin_flags, multiprocess = common_flags.gin(), common_flags.multiprocess()

  def job_main(argv):
    cli.no_positional_arguments(argv)
    initialize_distributed(multiprocess)
    cli.import_tensorflow_quietly()  # the gin files' tasks import it
    parse_gin(gin_flags.files.value, gin_flags.bindings.value, gin_flags.search_paths.value)
    logging.debug('Gin config:\n%s', gin.config_str())
    runs = importlib.import_module('gqa_t5x.runs')
    gin.get_configurable(getattr(runs, job))()  # the gin-bound version of the job

  def main(argv=None):
    cli.run(name, job_main, description, argv)
  return main
