"""Command-line flags that several commands read: each defined once, and only by those commands.

absl flags are process-global. A flag defined when a module is imported would be accepted (and
ignored) by every command that imports the module, and two command modules defining the same
flag could not be imported into one process (a notebook, a test worker). So each shared flag is
defined by a function that the commands reading it call: the first call defines it, later calls
return the same holder.
"""
import functools
from typing import NamedTuple, Sequence

from absl import app
from absl import flags


class GinFlags(NamedTuple):
  """T5X's gin flags (--gin.NAME=value is rewritten to --gin_bindings by gqa_t5x.cli)."""
  files: flags.FlagHolder
  bindings: flags.FlagHolder
  search_paths: flags.FlagHolder


class MultiprocessFlags(NamedTuple):
  """jax.distributed's settings, under T5X's flag names."""
  coordinator_address: flags.FlagHolder
  process_count: flags.FlagHolder
  process_index: flags.FlagHolder
  auto_detect: flags.FlagHolder


@functools.cache
def gin() -> GinFlags:
  return GinFlags(
      flags.DEFINE_multi_string('gin_file', [], 'Gin config files (repeatable), searched in '
                                '--gin_search_paths; e.g. models/t5_1_1/small.gin '
                                'runs/pretrain.gin.'),
      flags.DEFINE_multi_string('gin_bindings', [], 'Gin bindings, e.g. "TRAIN_STEPS = 100"; '
                                '--gin.TRAIN_STEPS=100 is short for the same.'),
      flags.DEFINE_list('gin_search_paths', ['.'], 'Where --gin_file and gin include '
                        "statements are looked up, before the project's own gin configs."))


@functools.cache
def multiprocess() -> MultiprocessFlags:
  return MultiprocessFlags(
      flags.DEFINE_string('coordinator_address', None, 'host:port of process 0 of a '
                          'multi-process run.'),
      flags.DEFINE_integer('process_count', None, 'Number of processes of a multi-process run.',
                           lower_bound=1),
      flags.DEFINE_integer('process_index', None, "This process's index in a multi-process run.",
                           lower_bound=0),
      flags.DEFINE_bool('multiprocess', False, 'Call jax.distributed.initialize() with the '
                        "platform's auto-detection (TPU pods, SLURM) when no coordinator is "
                        'given.'))


@functools.cache
def head_dim() -> flags.FlagHolder:
  return flags.DEFINE_integer('head_dim', None, "Head dimension; default: the gin config's where "
                              'one is given, else 64 (T5.1.1).', lower_bound=1)


@functools.cache
def kv_heads() -> flags.FlagHolder:
  return flags.DEFINE_list('kv_heads', [], 'Key/value head counts G to run, each dividing the '
                           "query heads; default: the command's own set.")


def checked_kv_heads(num_heads: int, requested: Sequence[str]) -> list[int]:
  """--kv_heads's values as integers, each checked to divide num_heads (else app.UsageError)."""
  from gqa_t5x.attention import check_kv_heads  # pylint: disable=g-import-not-at-top  (jax)
  try:
    values = [int(v) for v in requested]
  except ValueError:
    raise app.UsageError(f'--kv_heads must be integers; got {",".join(requested)}') from None
  for g in values:
    try:
      check_kv_heads(num_heads, g, '--kv_heads')
    except ValueError as e:
      raise app.UsageError(str(e)) from None
  return values


@functools.cache
def seed() -> flags.FlagHolder:
  return flags.DEFINE_integer('seed', 0, 'Random seed (random initialisation, benchmark '
                              'weights).')


@functools.cache
def output_dir() -> flags.FlagHolder:
  return flags.DEFINE_string('output_dir', None, 'Where the command writes its results.')
