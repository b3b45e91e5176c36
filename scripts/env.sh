# Source me: creates (once) and activates the project's virtual environment.
# The venv lives in a cache outside the checkout, keyed by the dependency pins, so fresh clones
# and CI runs on the same machine reuse it; pip's own cache makes a rebuild quick.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
export CPT_CACHE_DIR="${CPT_CACHE_DIR:-$HOME/.cache/cpt-operator}"
PY="${PYTHON:-python3.11}"
command -v "$PY" >/dev/null || PY=python3
# key on the dependency pins only, so editing tool settings in pyproject.toml does not rebuild
KEY="$("$PY" -c 'import sys,tomllib,json,hashlib; p=tomllib.load(open(sys.argv[1],"rb"))["project"]; print(hashlib.sha256(json.dumps([p["dependencies"],p["optional-dependencies"],p["requires-python"]]).encode()).hexdigest()[:12])' "$ROOT/pyproject.toml")"
VENV="$CPT_CACHE_DIR/venv-$KEY"
if [ ! -x "$VENV/bin/cptctl" ]; then
  echo "== creating the Python environment in $VENV (first time: torch is a large download)"
  start=$(date +%s)
  "$PY" -m venv "$VENV"
  "$VENV/bin/python" -m pip install -q --upgrade pip
  "$VENV/bin/python" -m pip install -q -e "$ROOT[all]"
  echo "== environment ready in $(( $(date +%s) - start ))s"
  # Environments of older pins are 6 GB each (torch with its CUDA libraries): only the newest stays.
  for old in "$CPT_CACHE_DIR"/venv-*; do
    [ "$old" = "$VENV" ] || { echo "== removing the older environment $old"; rm -rf "$old"; }
  done
else
  # the checkout may have moved (fresh clone): re-point the editable install, no downloads
  "$VENV/bin/python" -m pip install -q --no-deps -e "$ROOT" >/dev/null
fi
# shellcheck disable=SC1091
. "$VENV/bin/activate"
