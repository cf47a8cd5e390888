"""gqa-t5x: grouped-query attention T5 (Ainslie et al., EMNLP 2023) for T5X / Flax."""
import pathlib

# The project's gin files (models/, runs/, ...), always on the commands' gin search path. An
# installed wheel holds them inside the package (setup.py maps gin_configs/ there); a source
# checkout, installed editable or not, has them beside the package.
GIN_CONFIGS_DIR = pathlib.Path(__file__).resolve().parent / 'gin_configs'
if not GIN_CONFIGS_DIR.is_dir():
  GIN_CONFIGS_DIR = GIN_CONFIGS_DIR.parent.parent / 'gin_configs'
