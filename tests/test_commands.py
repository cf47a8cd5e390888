"""Every command's module can be imported into one process (a notebook, a test worker).

absl flags are process-global, so two commands defining the same flag would raise
DuplicateFlagError on import; shared flags are defined once, by gqa_t5x.common_flags' functions.
"""
import subprocess
import sys

COMMANDS = ('gqa_t5x.demo', 'gqa_t5x.convert', 'gqa_t5x.train', 'gqa_t5x.eval', 'gqa_t5x.infer',
            'gqa_t5x.benchmark.cli', 'gqa_t5x.reproduce.cli', 'gqa_t5x.tasks.prepare_mediasum')


def test_every_command_module_imports_into_one_process():
  code = ''.join(f'import {m}\n' for m in COMMANDS) + 'print("imported")'
  result = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True,
                          timeout=300)
  assert result.returncode == 0, result.stderr[-2000:]
  assert result.stdout.strip().endswith('imported')
