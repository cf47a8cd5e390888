#!/usr/bin/env bash
# Creates .venv with the project's pinned stack. Idempotent: a second run only checks.
#
# Why not a plain `pip install -e .`: tensorflow-text (and seqio through it) declares the full
# `tensorflow` package, which pip would install over tensorflow-cpu's files (two packages owning
# one folder). We install everything else first, then those two with --no-deps.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3.11}"
command -v "$PYTHON" >/dev/null || PYTHON=python3
VENV=.venv
STAMP="$VENV/.gqa_t5x_installed"
if [[ -f "$STAMP" ]] && cmp -s "$STAMP" <(cat setup.py tools/requirements.txt tools/requirements-nodeps.txt); then
  exit 0
fi
[[ -x "$VENV/bin/python" ]] || "$PYTHON" -m venv "$VENV"
PIP=("$VENV/bin/python" -m pip --disable-pip-version-check -q)
# PEP 660 editable installs (needed for the tasks/ -> gqa_t5x.tasks mapping) need setuptools>=64.
"${PIP[@]}" install "pip>=24,<27" "setuptools>=70,<81" wheel
"${PIP[@]}" install -r tools/requirements.txt
"${PIP[@]}" install --no-deps -r tools/requirements-nodeps.txt
"${PIP[@]}" install --no-deps -e .
# The one expected complaint is tensorflow-text's declared `tensorflow` (tensorflow-cpu provides it).
if "$VENV/bin/python" -m pip check 2>/dev/null | grep -v "^tensorflow-text .* requires tensorflow, which is not installed"; then
  echo "setup_env.sh: dependency conflicts above" >&2; exit 1
fi
cat setup.py tools/requirements.txt tools/requirements-nodeps.txt > "$STAMP"
