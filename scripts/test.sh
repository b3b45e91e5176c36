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
lint-imports --config pyproject.toml
ruff check api operator trainer tests bench
mypy api/cpt_api operator/cpt_operator trainer/cpt_trainer
if [[ $# -gt 0 ]]; then
  exec python -m pytest --durations=30 "$@"
fi
# Two pytest runs side by side: the tests on the test cluster, which mostly wait for servers,
# pods and operators, beside the others, which mostly train (each run starts only the servers
# its tests use). The slowest tests of each are listed, so that CI time is seen where it goes.
logs=$(mktemp -d)
python -m pytest -m cluster -p no:cacheprovider --basetemp="$logs/cluster" --durations=20 \
  >"$logs/cluster.log" 2>&1 &
cluster=$!
set +e
python -m pytest -m "not cluster" -p no:cacheprovider --basetemp="$logs/local" --durations=20
local_rc=$?
wait "$cluster"
cluster_rc=$?
set -e
echo "================ the tests on the test cluster (pytest -m cluster) ================"
cat "$logs/cluster.log"
echo "exit codes: not cluster $local_rc, cluster $cluster_rc"
[[ $local_rc == 0 && $cluster_rc == 0 ]]
