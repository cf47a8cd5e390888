#!/usr/bin/env bash
# Installs T5X next to gqa-t5x, in a virtual environment of its own (default ~/t5x-venv), for
# `python -m t5x.train/eval/infer` with gin_configs/t5x/ and for tests/test_t5x_configs.py.
#
# T5X is not on PyPI, and its setup.py asks for flax/optax/seqio/clu from git heads. Instead:
# the project's pinned stack (tools/requirements.txt), then T5X, AirIO and JEstimator from
# their repositories at the commits tested with it, without their declared dependencies, then
# the few packages they import that the stack lacks. Nothing is installed into this repository.
#
#   bash tools/install_t5x.sh [VENV_DIR]
#   VENV_DIR/bin/python -m pytest -q tests/test_t5x_configs.py
set -euo pipefail
cd "$(dirname "$0")/.."
VENV="${1:-$HOME/t5x-venv}"
PYTHON="${PYTHON:-python3.11}"
T5X_COMMIT=cc342d419ec3e3e9c4bf1df33c82330cafdc1e16         # google-research/t5x, 2026-04-21
AIRIO_COMMIT=69897df7d9a427b947a9f7bb4164c7782b43e601       # google/airio, 2026-04-09
JESTIMATOR_COMMIT=326824a477feef6d92e6f44175000907a72899ca  # google-research/jestimator, 2024-05-15

[[ -x "$VENV/bin/python" ]] || "$PYTHON" -m venv "$VENV"
PIP=("$VENV/bin/python" -m pip --disable-pip-version-check -q)
"${PIP[@]}" install "pip>=24,<27" "setuptools>=70,<81" wheel flit_core
"${PIP[@]}" install -r tools/requirements.txt
"${PIP[@]}" install --no-deps -e .
"${PIP[@]}" install --no-deps \
  "git+https://github.com/google-research/jestimator@${JESTIMATOR_COMMIT}" \
  "git+https://github.com/google/airio@${AIRIO_COMMIT}" \
  "git+https://github.com/google-research/t5x@${T5X_COMMIT}"
# Imported by T5X or AirIO and not in the stack (AirIO pins grain 0.2.12).
"${PIP[@]}" install "grain==0.2.12" "cached_property>=1.5" "fiddle>=0.2.5" "jaxtyping>=0.2" "chex>=0.1.86"
"$VENV/bin/python" -c "import t5x.train, t5x.eval, t5x.infer, gqa_t5x.network; print('T5X ready in $VENV')"
