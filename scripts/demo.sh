#!/usr/bin/env bash
# Install everything, fetch the demo model and corpora, and run a demo CptRun on this machine.
#   ./scripts/demo.sh              the demo: diagnosis first, then legal CPT with every suite gated
#   ./scripts/demo.sh forgetting   a run that forgets (high LR, 1% replay): caught, rolled back
# Further arguments go to `cptctl run`.
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/env.sh
spec=examples/demo/cptrun.yaml run=runs/demo-legal
if [ "${1:-}" = forgetting ]; then
  shift
  spec=examples/demo/forgetting.yaml run=runs/demo-forgetting
fi
python examples/demo/prepare.py --out demo-data
if [ "$spec" = examples/demo/cptrun.yaml ]; then
  echo "== Is continued pretraining the right lever for this data? (cptctl diagnose)"
  report="$(cptctl diagnose --base demo-data/models/SmolLM2-135M-Instruct.Q4_1.gguf --format gguf \
    --domain demo-data/legal-eval.jsonl --general demo-data/general-eval.jsonl \
    --max-docs 24 --max-tokens 8192 --seq-len 256 --top 5)"
  echo "$report"
  if grep -q "CPT not indicated" <<<"$report"; then
    cat <<'TEXT'
== Why the demo runs anyway
The diagnosis says CPT is not indicated: per byte the base already predicts license texts as
well as general English (they are among the most copied texts on the web, so its pretraining saw
them) and splitting their terms costs few tokens. On your own data that verdict means: do not spend GPU
hours on CPT, try prompting, RAG or SFT. The demo continues because what it shows does not depend
on the domain: every suite measured before and during training, gates that roll back, and a
checkpoint chosen within every gate, on a real model with data this machine ships.
TEXT
  fi
fi
cptctl validate "$spec"
# --fresh: running the demo again starts over (the previous run directory is moved aside)
cptctl run "$spec" --fresh "$@"
cptctl checkpoints "$run" --plot "$run/curves.png"
