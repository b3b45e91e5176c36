#!/usr/bin/env bash
# Install everything, build (or reuse) the test cluster's servers, and run the whole test suite.
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/env.sh
bash tests/cluster/build.sh
lint-imports --config pyproject.toml
ruff check operator trainer tests bench
mypy operator/cpt_operator
python -m pytest "$@"
