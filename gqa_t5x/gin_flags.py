"""T5X's gin command-line flags, defined once for every command of the package.

absl flags are process-global: two modules defining --gin_file could not be imported together
(e.g. the converter and the runner in one notebook or test process).
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
