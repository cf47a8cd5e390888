r"""Compares two versions of the CPU decode kernels call by call, on this machine.

  .venv/bin/python tools/kernel_ab.py --baseline=HEAD [--candidate=FILE] [--what=matmul]
      [--threads=2] [--reps=150] [--heads_per_kv=8 --items=128]

Why: on a shared machine a kernel's time drifts by 20-50% from one phase to the next, more than
most changes to it are worth, so whole decodes or one process per version compare the machine's
phases, not the code. Here both versions of gqa_t5x/cpu_kernels/decode_step.cc are compiled into
one binary (tools/kernel_ab.cc) and called alternately on the same data, each first half the
time; the median of the pairs' time ratios is the figure. --what=matmul times a decode step's
products at batch 16 (T5's logits, projections, MLP) with the weight out of cache;
--what=attention the cross-attention over --items (batch x kv heads) of --heads_per_kv query
heads, head dim 64, 2048 keys, its keys and values read from memory as in a decode step. Each
call reads the next of several copies of the same data, so that neither version of a pair finds
what the other left in the cache, and the two versions' outputs are compared (max difference).

--baseline and --candidate take a file or a git revision of the kernel's source (default: the
working tree's file as candidate).
"""
import argparse
import os
import re
import subprocess
import sys
import tempfile

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
KERNEL = 'gqa_t5x/cpu_kernels/decode_step.cc'


def fail(message: str):
  print(message, file=sys.stderr)
  sys.exit(2)


def source(spec: str) -> str:
  """The kernel's source from a file, else from git revision `spec`."""
  if os.path.isfile(spec):
    with open(spec) as f:
      return f.read()
  result = subprocess.run(['git', 'show', f'{spec}:{KERNEL}'], cwd=REPO, capture_output=True,
                          text=True)
  if result.returncode:
    fail(f'--baseline/--candidate {spec!r}: neither a file nor a git revision with '
             f'{KERNEL} ({result.stderr.strip()})')
  return result.stdout


def namespaced(text: str, name: str) -> str:
  """The kernel's code in namespace `name`, without its FFI handler symbols (one binary holds
  both versions)."""
  text, count = re.subn(r'^namespace \{', f'namespace {name} {{', text, count=1, flags=re.M)
  cut = text.find('\nXLA_FFI_DEFINE_HANDLER_SYMBOL')
  if not count or cut < 0:
    fail(f'{KERNEL} no longer has the anonymous namespace and FFI handlers this tool expects')
  if 'void AttentionItem(' not in text:
    fail(f'this version of {KERNEL} predates AttentionItem(..., bias_stride, ...), which '
         'tools/kernel_ab.cc calls: compare versions from the commit that added it on')
  if 'int64_t StripWidth(' not in text:
    fail(f'this version of {KERNEL} predates StripWidth and MatmulStrip(..., n0, n1), which '
         'tools/kernel_ab.cc calls: compare versions from the commit that added them on')
  return text[:cut] + '\n'


def main():
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--baseline', required=True, help='file or git revision')
  parser.add_argument('--candidate', default=os.path.join(REPO, KERNEL), help='file or revision')
  parser.add_argument('--what', choices=('matmul', 'attention'), default='matmul')
  parser.add_argument('--threads', type=int, default=2)
  parser.add_argument('--reps', type=int, default=150, help='pairs of calls per shape')
  parser.add_argument('--heads_per_kv', type=int, default=8)
  parser.add_argument('--items', type=int, default=128)
  args = parser.parse_args()
  if min(args.threads, args.reps, args.heads_per_kv, args.items) < 1:
    parser.error('--threads, --reps, --heads_per_kv and --items must be >= 1')

  import jax  # pylint: disable=g-import-not-at-top  (only for the FFI headers' path)
  with tempfile.TemporaryDirectory() as tmp:
    for name, spec in (('va', args.baseline), ('vb', args.candidate)):
      with open(os.path.join(tmp, f'{name}.inc'), 'w') as f:
        f.write(namespaced(source(spec), name))
    binary = os.path.join(tmp, 'kernel_ab')
    subprocess.run([os.environ.get('CXX', 'g++'), '-O3', '-march=native', '-std=c++17',
                    '-pthread', '-I', jax.ffi.include_dir(), '-I', tmp,
                    os.path.join(REPO, 'tools', 'kernel_ab.cc'), '-o', binary], check=True)
    print(f'baseline {args.baseline}, candidate {args.candidate}, {args.threads} threads, '
          f'{args.reps} pairs of calls per shape', flush=True)
    subprocess.run([binary, args.what, str(args.threads), str(args.reps),
                    str(args.heads_per_kv), str(args.items)], check=True)


if __name__ == '__main__':
  main()
