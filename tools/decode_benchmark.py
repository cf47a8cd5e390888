#!/usr/bin/env python3
"""Decode-speed benchmark (same as `gqa-t5x-benchmark`); run from the repository root.

  python tools/decode_benchmark.py --levels=attention --kv_heads=64,8,1 --output_dir=/tmp/bench
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from gqa_t5x.benchmark.cli import main  # pylint: disable=wrong-import-position

if __name__ == '__main__':
  main()
