#!/usr/bin/env bash
# Install everything, build (or reuse) the test cluster's servers, and run the whole test suite.
# With arguments, they go to one pytest run as they are (`scripts/test.sh tests/unit -x`).
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/env.sh
bash tests/cluster/build.sh
# The real node's images (cached by a hash of their inputs), built here rather than inside a
# test's timeout; the real node needs root, its tests skip without it.
[[ $(id -u) != 0 ]] || bash tests/cluster/images.sh pause base operator trainer >/dev/null
static_checks() {
  # mypy's incremental cache lives with the environment (a new environment starts it afresh): a
  # full check is a core for over a minute, a cached one a few seconds; mypy re-checks what
  # changed and what depends on it, whatever the checkout's path or file times.
  lint-imports --config pyproject.toml &&
    ruff check api operator trainer tests bench &&
    mypy --cache-dir "$VIRTUAL_ENV/.mypy_cache" api/cpt_api operator/cpt_operator trainer/cpt_trainer
}
if [[ $# -gt 0 ]]; then
  static_checks
  exec python -m pytest --durations=30 "$@"
fi
# Two pytest runs side by side, of about equal length on a 2-core machine: the multi-process
# training tests (tests/integration), which keep the cores busy, beside everything else: the
# tests on the test cluster, which also wait on servers, pods and operators, then the unit, chart
# and other e2e tests (each run starts only the servers its tests use). The slowest tests of each
# are listed, so that CI time is seen where it goes.
logs=$(mktemp -d)
# The static checks (a core for a minute or two) go beside the tests, not before them.
static_checks >"$logs/static.log" 2>&1 &
static=$!
python -m pytest --ignore=tests/integration -p no:cacheprovider --basetemp="$logs/others" --durations=20 \
  >"$logs/others.log" 2>&1 &
others=$!
set +e
python -m pytest tests/integration -p no:cacheprovider --basetemp="$logs/training" --durations=20
training_rc=$?
wait "$others"
others_rc=$?
wait "$static"
static_rc=$?
set -e
echo "================ the cluster, unit, chart and other e2e tests (pytest --ignore=tests/integration) ================"
cat "$logs/others.log"
echo "================ import layers, ruff and mypy ================"
cat "$logs/static.log"
echo "exit codes: training $training_rc, others $others_rc, static checks $static_rc"
[[ $training_rc == 0 && $others_rc == 0 && $static_rc == 0 ]]
