"""gqa-t5x: grouped-query attention T5 (Ainslie et al., EMNLP 2023) for T5X / Flax."""
import pathlib

# The project's gin files (models/, runs/, ...): the default gin search path of its commands.
GIN_CONFIGS_DIR = pathlib.Path(__file__).resolve().parent.parent / 'gin_configs'
