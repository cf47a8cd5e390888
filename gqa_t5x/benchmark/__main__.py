"""`python -m gqa_t5x.benchmark`: the gqa-t5x-benchmark command."""
from gqa_t5x.benchmark.cli import main

main()
