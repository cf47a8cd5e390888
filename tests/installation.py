"""The project as a user installs it: a wheel built from the sources and pip-installed, with its
declared dependencies, into a fresh virtual environment, used from outside the checkout.

The dependencies are not downloaded again: each environment sees the test environment's
site-packages through a .pth line (which, unlike a site directory, does not run that
environment's .pth files, so the checkout's editable install stays invisible) and pip runs with
--no-index, so a declared dependency the test stack lacks fails the install.
"""
import dataclasses
import fcntl
import glob
import os
import shutil
import subprocess
import sys
import sysconfig

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SOURCES = ('setup.py', 'gqa_t5x', 'tasks', 'gin_configs')  # what a wheel is built from
# pip with the packages on disk only: a declared dependency the test stack lacks fails the install.
OFFLINE_PIP = {'PIP_NO_INDEX': '1'}


@dataclasses.dataclass(frozen=True)
class Installation:
  wheel: str  # the built wheel
  bin_dir: str  # a venv's bin/ with the wheel installed: python and the console scripts

  @property
  def python(self) -> str:
    return os.path.join(self.bin_dir, 'python')


def get(root: str) -> Installation:
  """Builds the wheel and installs it once per `root` (a directory shared by the xdist workers)."""
  os.makedirs(root, exist_ok=True)
  with open(os.path.join(root, 'lock'), 'w') as lock:
    fcntl.flock(lock, fcntl.LOCK_EX)
    if not os.path.exists(os.path.join(root, 'READY')):
      _build(root)
      open(os.path.join(root, 'READY'), 'w').close()
  (wheel,) = glob.glob(os.path.join(root, 'dist', '*.whl'))
  return Installation(wheel, os.path.join(root, 'venv', 'bin'))


def _build(root: str) -> None:
  source = os.path.join(root, 'source')  # a copy: building writes build/ and *.egg-info/
  os.makedirs(source)
  for name in SOURCES:
    path = os.path.join(REPO, name)
    if os.path.isdir(path):
      shutil.copytree(path, os.path.join(source, name),
                      ignore=shutil.ignore_patterns('__pycache__'))
    else:
      shutil.copy(path, source)
  _pip(sys.executable, 'wheel', '--no-deps', '--no-build-isolation', '--wheel-dir',
       os.path.join(root, 'dist'), source)
  (wheel,) = glob.glob(os.path.join(root, 'dist', '*.whl'))
  python = fresh_venv(os.path.join(root, 'venv'))
  _pip(python, 'install', wheel)


def fresh_venv(directory: str) -> str:
  """An empty venv over the test environment's packages; returns its python."""
  subprocess.run([sys.executable, '-m', 'venv', '--without-pip', directory], check=True)
  python = os.path.join(directory, 'bin', 'python')
  site = subprocess.run([python, '-c', 'import sysconfig; print(sysconfig.get_paths()["purelib"])'],
                        check=True, capture_output=True, text=True).stdout.strip()
  stack = {sysconfig.get_paths()['purelib'], sysconfig.get_paths()['platlib']}
  with open(os.path.join(site, 'test_stack.pth'), 'w') as f:
    f.write(''.join(f'{path}\n' for path in sorted(stack)))
  return python


def _pip(python: str, *args: str) -> None:
  result = subprocess.run([python, '-m', 'pip', '--disable-pip-version-check', '-q', *args],
                          capture_output=True, text=True, env=dict(os.environ, **OFFLINE_PIP))
  if result.returncode:
    raise AssertionError(f'pip {" ".join(args)} failed:\n{result.stdout}{result.stderr}')
