"""`python -m gqa_t5x.reproduce`: the reproduction pipeline (see cli.py)."""
from gqa_t5x.reproduce.cli import main

main()
