"""Command-line flags shared by the package's commands, each defined once.

absl flags are process-global: two modules that both defined --head_dim (say) could not be
imported together, e.g. the converter and the benchmark in one notebook or test process.
"""
from absl import flags

import gqa_t5x

DEFAULT_SEARCH_PATHS = (str(gqa_t5x.GIN_CONFIGS_DIR), '.')

GIN_FILES = flags.DEFINE_multi_string(
    'gin_file', [], 'Gin config files (repeatable), searched in --gin_search_paths; e.g. '
    'models/t5_1_1/small.gin runs/pretrain.gin.')
GIN_BINDINGS = flags.DEFINE_multi_string('gin_bindings', [],
                                         'Gin bindings, e.g. "TRAIN_STEPS = 100".')
GIN_SEARCH_PATHS = flags.DEFINE_list('gin_search_paths', list(DEFAULT_SEARCH_PATHS),
                                     'Where --gin_file and include statements are looked up.')
HEAD_DIM = flags.DEFINE_integer('head_dim', None, 'Head dimension; default: the gin config\'s, '
                                'else 64 (T5.1.1).', lower_bound=1)
KV_HEADS = flags.DEFINE_list('kv_heads', [], 'Key/value head counts G to run (each must divide '
                             'the query heads); default: the command\'s own set.')
SEED = flags.DEFINE_integer('seed', 0, 'Random seed (random initialisation, benchmark weights).')
OUTPUT_DIR = flags.DEFINE_string('output_dir', None, 'Where the command writes its results.')
