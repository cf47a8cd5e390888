r"""Times gqa-t5x-convert on a synthetic T5.1.1-Large checkpoint against a plain `cp -r`.

  .venv/bin/python tools/benchmark_convert.py [--workdir=/tmp/gqa_convert_bench] [--rounds=3] \
      [--keep]

Writes a float32, T5.1.1-Large-shaped checkpoint (emb 1024, 16 heads x 64, 24+24 layers,
mlp 2816, vocab 32128: about 3 GB) in T5X's legacy layout, copies it with `cp -r` (the same
bytes read and written), reads and decompresses every tensor without writing (the converter's
floor: T5X's gzip, not the disk, is the bottleneck), converts it to GQA-8, and reports wall time
and peak RSS of each. Targets (issue 14): convert <= 1.3x the read-only floor; peak RSS <= the
interpreter + 2x the largest tensor, where "interpreter" is the peak RSS of a process that only
imports what the converter imports. The copy runs first so that all read from a warm page
cache. The read and the conversion then run --rounds times each, in turn (the order flipping from
round to round); each round's convert / read ratio gives a mean with Student's t 95% interval
(gqa_t5x.reproduce.stats), which is inside the target when its upper end is below it. Everything is
deleted at the end unless --keep.
"""
import argparse
import os
import shutil
import statistics
import subprocess
import sys
import time

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
from gqa_t5x.reproduce import stats  # pylint: disable=g-import-not-at-top
from tests.t5x_layout import write_legacy_checkpoint  # pylint: disable=g-import-not-at-top

EMB, HEADS, HEAD_DIM, LAYERS, MLP, VOCAB = 1024, 16, 64, 24, 2816, 32128
TARGET = 1.3  # convert / read-only floor


def large_params():
  """Yields (name, float32 array) one at a time: the T5.1.1 tree of t5x.md, random values."""
  rng = np.random.default_rng(0)
  joined = HEADS * HEAD_DIM

  def tensor(*shape):
    return rng.standard_normal(shape, dtype=np.float32)

  yield 'token_embedder/embedding', tensor(VOCAB, EMB)
  for stack, attentions in (('encoder', ('attention',)),
                            ('decoder', ('self_attention', 'encoder_decoder_attention'))):
    yield f'{stack}/relpos_bias/rel_embedding', tensor(HEADS, 32)
    for i in range(LAYERS):
      layer = f'{stack}/layers_{i}'
      norms = (('pre_attention_layer_norm',) if stack == 'encoder' else
               ('pre_self_attention_layer_norm', 'pre_cross_attention_layer_norm'))
      for norm in norms + ('pre_mlp_layer_norm',):
        yield f'{layer}/{norm}/scale', tensor(EMB)
      for attention in attentions:
        for projection in ('query', 'key', 'value'):
          yield f'{layer}/{attention}/{projection}/kernel', tensor(EMB, joined)
        yield f'{layer}/{attention}/out/kernel', tensor(joined, EMB)
      yield f'{layer}/mlp/wi_0/kernel', tensor(EMB, MLP)
      yield f'{layer}/mlp/wi_1/kernel', tensor(EMB, MLP)
      yield f'{layer}/mlp/wo/kernel', tensor(MLP, EMB)
    yield f'{stack}/{stack}_norm/scale', tensor(EMB)
  yield 'decoder/logits_dense/kernel', tensor(EMB, VOCAB)


def measured(command: list[str]) -> tuple[float, float, str]:
  """(wall seconds, peak RSS in MB, stderr tail) of `command`, run in a fresh wrapper process."""
  wrapper = ('import resource, subprocess, sys, time; t = time.time(); '
             'r = subprocess.run(sys.argv[1:], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, '
             'text=True); print(time.time() - t, resource.getrusage(resource.RUSAGE_CHILDREN)'
             '.ru_maxrss); sys.stderr.write(r.stderr[-600:]); sys.exit(r.returncode)')
  result = subprocess.run([sys.executable, '-c', wrapper, *command], capture_output=True,
                          text=True, check=True)
  seconds, kilobytes = result.stdout.split()
  return float(seconds), int(kilobytes) / 1024, result.stderr


def directory_bytes(path: str) -> int:
  return sum(os.path.getsize(os.path.join(d, f)) for d, _, files in os.walk(path) for f in files)


def main():
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--workdir', default='/tmp/gqa_convert_bench')
  parser.add_argument('--rounds', type=int, default=3,
                      help='reads and conversions, each (at least 2, for an interval)')
  parser.add_argument('--keep', action='store_true', help='keep the files afterwards')
  args = parser.parse_args()
  if args.rounds < 2:
    parser.error(f'--rounds={args.rounds}: an interval needs at least 2 rounds')
  source = os.path.join(args.workdir, 'mha_large', 'checkpoint_1000000')
  copy = os.path.join(args.workdir, 'copy', 'checkpoint_1000000')
  output = os.path.join(args.workdir, 'gqa8_large', 'checkpoint_1000000')
  try:
    if not os.path.exists(source):
      start = time.time()
      write_legacy_checkpoint(source, large_params(), step=1_000_000)
      print(f'wrote synthetic checkpoint in {time.time() - start:.0f}s', file=sys.stderr)
    largest_mb = VOCAB * EMB * 4 / 2**20
    shutil.rmtree(os.path.dirname(copy), ignore_errors=True)
    os.makedirs(os.path.dirname(copy))
    copy_s, copy_mb, _ = measured(['cp', '-r', source, copy])
    imports = ('import numpy, jax, orbax.checkpoint, tensorstore, flax.serialization; '
               'import gqa_t5x.convert')
    _, interpreter_mb, _ = measured([sys.executable, '-c', imports])
    read_all = ('from etils import epath; from gqa_t5x.checkpoints import legacy_format; '
                f'ckpt = legacy_format.read(epath.Path({source!r})); '
                '[t.read().nbytes for t in ckpt.params.values()]')
    convert = [sys.executable, '-m', 'gqa_t5x.convert', f'--input={source}',
               f'--output={output}', '--num_kv_heads=8']
    runs = {'read': [], 'convert': []}
    for round_ in range(args.rounds):
      shutil.rmtree(os.path.dirname(output), ignore_errors=True)
      for name in ('read', 'convert') if round_ % 2 == 0 else ('convert', 'read'):
        runs[name].append(measured([sys.executable, '-c', read_all] if name == 'read' else convert))
      (read_s, _, _), (convert_s, _, _) = runs['read'][-1], runs['convert'][-1]
      print(f'round {round_ + 1}/{args.rounds}: read {read_s:.1f} s, convert {convert_s:.1f} s, '
            f'ratio {convert_s / read_s:.2f}', file=sys.stderr, flush=True)
    written = directory_bytes(output)
    median = {name: statistics.median(s for s, _, _ in rs) for name, rs in runs.items()}
    peak = {name: max(mb for _, mb, _ in rs) for name, rs in runs.items()}
    ratio = stats.interval([c[0] / r[0] for r, c in zip(runs['read'], runs['convert'])])
    rows = [('cp -r', copy_s, copy_mb, directory_bytes(copy)),
            ('read + gunzip every tensor, no write', median['read'], peak['read'], 0),
            ('gqa-t5x-convert (GQA-8)', median['convert'], peak['convert'], written)]
    print(f'checkpoint: {directory_bytes(source) / 1e9:.2f} GB on disk (float32, gzip zarr); '
          f'largest tensor {largest_mb:.0f} MiB; interpreter + imports {interpreter_mb:.0f} MiB')
    print(f'| | wall time (median of {args.rounds} for read and convert) | peak RSS (highest) | '
          'bytes written |\n|---|---|---|---|')
    for name, seconds, rss, written in rows:
      print(f'| {name} | {seconds:.1f} s | {rss:.0f} MiB | {written / 1e9:.2f} GB |')
    print(f'load average during the run: {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs')
    below_target = stats.Interval(ratio.mean - TARGET, ratio.low - TARGET, ratio.high - TARGET,
                                  ratio.n)
    within = {'held': 'inside the target', 'contradicted': 'over the target',
              'inconclusive': 'not resolved against the target'}[stats.verdict(below_target, -1)]
    print(f'convert / read-only floor: {ratio.mean:.2f} [{ratio.low:.2f}, {ratio.high:.2f}] (mean '
          f'of {ratio.n} rounds, 95% interval; target <= {TARGET}): {within}; convert / copy: '
          f'{median["convert"] / copy_s:.1f}; peak RSS {peak["convert"]:.0f} MiB vs interpreter '
          f'+ 2 x largest = {2 * largest_mb + interpreter_mb:.0f} MiB')
    log = runs['convert'][-1][2]
    print('last progress line:', log.strip().splitlines()[-1] if log.strip() else '-')
  finally:
    if not args.keep:
      shutil.rmtree(args.workdir, ignore_errors=True)


if __name__ == '__main__':
  main()
