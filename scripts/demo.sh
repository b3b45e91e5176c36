#!/usr/bin/env bash
# Install everything, fetch the demo model and corpora, and run the demo CptRun on this machine.
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/env.sh
python examples/demo/prepare.py --out demo-data
cptctl validate examples/demo/cptrun.yaml
# --fresh: running the demo again starts over (the previous run directory is moved aside)
cptctl run examples/demo/cptrun.yaml --fresh "$@"
cptctl checkpoints runs/demo-legal --plot runs/demo-legal/curves.png
