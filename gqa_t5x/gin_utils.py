"""T5X's gin command line (--gin_file, --gin_bindings, --gin.NAME=value, --gin_search_paths),
plus the macro checks T5X lacks: a misspelt or missing macro fails before any work starts."""
import importlib
import re
import sys
from typing import Callable, Sequence

from absl import app, flags, logging
import gin

from gqa_t5x import errors
from gqa_t5x import common_flags

DEFAULT_SEARCH_PATHS = common_flags.DEFAULT_SEARCH_PATHS

flags.DEFINE_string('coordinator_address', None, 'host:port of process 0, for multi-process runs.')
flags.DEFINE_integer('num_processes', None, 'Number of processes of a multi-process run.')
flags.DEFINE_integer('process_id', None, 'This process index in a multi-process run.')
flags.DEFINE_bool('multiprocess', False, 'Call jax.distributed.initialize() with the '
                  "platform's auto-detection (TPU pods, SLURM) when no coordinator is given.")

FLAGS = flags.FLAGS
_GIN_CALL_NOTE = '\n  In call to configurable'  # gin appends this to errors raised in a job
_GIN_FLAG = re.compile(r'^--gin\.([^=]+)=(.*)$', re.DOTALL)


def rewrite_gin_args(argv: Sequence[str]) -> list[str]:
  """--gin.NAME=value -> --gin_bindings='NAME = value' (T5X's shorthand)."""
  return [f'--gin_bindings={m.group(1)} = {m.group(2)}' if (m := _GIN_FLAG.match(a)) else a
          for a in argv]


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
    raise errors.ConfigError(f'Unknown gin macro {unknown[0]}: no loaded gin file uses %{unknown[0]}. '
                     f'Macros these gin files accept: {sorted(referenced)}')
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
    raise errors.ConfigError('No --gin_file given: pass a model gin (e.g. models/t5_1_1/small.gin) and a '
                     'run gin (e.g. runs/pretrain.gin).')
  gin.clear_config()
  for path in search_paths:
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
  for path in search_paths:
    gin.add_config_file_search_path(path)
  try:
    gin.parse_config_files_and_bindings(list(gin_files), list(bindings))
    return gin.get_configurable(network.T5Config)()
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


def initialize_distributed() -> None:
  """jax.distributed.initialize from the flags; CPU processes talk over gloo."""
  if FLAGS.coordinator_address or FLAGS.multiprocess:
    import jax
    jax.config.update('jax_cpu_collectives_implementation', 'gloo')
    jax.distributed.initialize(coordinator_address=FLAGS.coordinator_address,
                               num_processes=FLAGS.num_processes, process_id=FLAGS.process_id)


def run(job: Callable[[], object]) -> Callable[[], None]:
  """A console-script `main` that parses the gin flags, then runs the gin-configured job."""
  def job_main(argv):
    if len(argv) > 1:
      raise app.UsageError(f'Unexpected arguments {argv[1:]}: configure runs with --gin_file and '
                           '--gin.NAME=value.')
    try:
      initialize_distributed()
      parse_gin(FLAGS.gin_file, FLAGS.gin_bindings, FLAGS.gin_search_paths)
      logging.info('Gin config:\n%s', gin.config_str())
      gin.get_configurable(job)()  # the gin-bound version of the job
    except errors.ConfigError as e:
      sys.exit(f'Error: {str(e).split(_GIN_CALL_NOTE)[0]}')

  def main(argv=None):
    app.run(job_main, argv=rewrite_gin_args(sys.argv if argv is None else argv))
  return main
