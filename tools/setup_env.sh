#!/usr/bin/env bash
# Creates .venv with the project's pinned stack and this checkout installed in editable mode (the
# development set-up; users can `pip install` the project instead). Idempotent: a second run only
# checks.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3.11}"
command -v "$PYTHON" >/dev/null || PYTHON=python3
VENV=.venv
STAMP="$VENV/.gqa_t5x_installed"
if [[ -f "$STAMP" ]] && cmp -s "$STAMP" <(cat setup.py tools/requirements.txt); then
  exit 0
fi
[[ -x "$VENV/bin/python" ]] || "$PYTHON" -m venv "$VENV"
PIP=("$VENV/bin/python" -m pip --disable-pip-version-check -q)
# PEP 660 editable installs (needed for the tasks/ -> gqa_t5x.tasks mapping) need setuptools>=64.
"${PIP[@]}" install "pip>=24,<27" "setuptools>=70,<81" wheel
# Environments made when the stack used tensorflow-cpu: the full `tensorflow` (which
# tensorflow-text requires) would be written over its files, so both go before it is installed.
if "$VENV/bin/python" -m pip show -q tensorflow-cpu 2>/dev/null; then
  "${PIP[@]}" uninstall -y tensorflow-cpu tensorflow
fi
"${PIP[@]}" install -r tools/requirements.txt
"${PIP[@]}" install --no-deps -e .
if ! "$VENV/bin/python" -m pip check >/dev/null; then
  "$VENV/bin/python" -m pip check >&2 || true
  echo "setup_env.sh: dependency conflicts above" >&2; exit 1
fi
cat setup.py tools/requirements.txt > "$STAMP"
