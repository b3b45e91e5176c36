#!/usr/bin/env bash
# Install everything, build (or reuse) the test cluster's servers, and run the whole test suite.
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/env.sh
bash tests/cluster/build.sh
# The real node's images (cached by a hash of their inputs), built here rather than inside a
# test's timeout; the real node needs root, its tests skip without it.
[[ $(id -u) != 0 ]] || bash tests/cluster/images.sh pause base operator trainer >/dev/null
lint-imports --config pyproject.toml
ruff check operator trainer tests bench
mypy operator/cpt_operator trainer/cpt_trainer
# the slowest tests, so that CI time is seen where it goes
python -m pytest --durations=30 "$@"
