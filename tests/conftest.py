"""Test-wide set-up: 8 host CPU devices for mesh tests (must precede the first jax import), and
the project installed from its wheel."""
import os

import pytest

from tests import installation

os.environ.setdefault('XLA_FLAGS', '--xla_force_host_platform_device_count=8')
os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '3')


@pytest.fixture(scope='session')
def installed(tmp_path_factory):
  """The wheel pip-installed into a fresh venv (tests/installation.py), built once per run: the
  xdist workers share it."""
  root = tmp_path_factory.getbasetemp()
  if os.environ.get('PYTEST_XDIST_WORKER'):
    root = root.parent  # this run's directory, above the workers' own
  return installation.get(str(root / 'installed'))


@pytest.fixture(scope='session')
def thp_enabled() -> bool:
  """Whether this kernel grants transparent huge pages to madvise()d buffers (THP `always` or
  `madvise`, as on this project's machines): there gqa_t5x.huge_pages must move every whole page."""
  thp = '/sys/kernel/mm/transparent_hugepage/enabled'
  if not os.path.exists(thp):
    return False
  with open(thp) as f:
    return '[never]' not in f.read()
