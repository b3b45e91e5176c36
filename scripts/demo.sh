#!/usr/bin/env bash
# Install everything, fetch the demo model and corpora, and run a demo CptRun on this machine.
#   ./scripts/demo.sh              the demo: German (a language the base barely knows): diagnosis,
#                                  tokenizer extension, CPT with every suite gated
#   ./scripts/demo.sh legal        license texts: the diagnosis says CPT is not indicated
#   ./scripts/demo.sh forgetting   a run that forgets (high LR, 1% replay): caught, rolled back
# Further arguments go to `cptctl run`.
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/env.sh
domain=german
case "${1:-}" in
  legal|forgetting) domain=$1; shift ;;
esac
case $domain in
  german) spec=examples/demo/german.yaml run=runs/demo-german ;;
  legal) spec=examples/demo/legal.yaml run=runs/demo-legal ;;
  forgetting) spec=examples/demo/forgetting.yaml run=runs/demo-forgetting ;;
esac
python examples/demo/prepare.py --out demo-data
if [ "$domain" != forgetting ]; then
  echo "== Is continued pretraining the right lever for this data? (cptctl diagnose)"
  report="$(cptctl diagnose --base demo-data/models/SmolLM2-135M-Instruct.Q4_1.gguf --format gguf \
    --domain "demo-data/$domain-eval.jsonl" --general demo-data/general-eval.jsonl \
    --max-docs 24 --max-tokens 8192 --seq-len 256 --top 5)"
  echo "$report"
  if grep -q "CPT not indicated" <<<"$report"; then
    cat <<'TEXT'
== Why the demo runs anyway
The diagnosis says CPT is not indicated: per byte the base already predicts license texts as
well as general English (they are among the most copied texts on the web, so its pretraining saw
them) and splitting their terms costs few tokens. On your own data that verdict means: do not spend GPU
hours on CPT, try prompting, RAG or SFT. This run continues to show what does not depend on the
domain: every suite measured before and during training, gates that roll back, and a checkpoint
chosen within every gate. `./scripts/demo.sh` (German) is the case where CPT pays.
TEXT
  fi
fi
cptctl validate "$spec"
# --fresh: running the demo again starts over (the previous run directory is moved aside)
cptctl run "$spec" --fresh "$@"
cptctl checkpoints "$run" --plot "$run/curves.png"
if [ "$domain" = german ]; then
  echo "== What the tokenizer extension saves on the held-out German text"
  python - "$run" <<'PY'
import json, sys
from pathlib import Path
from transformers import AutoTokenizer
from cpt_api.spec import BaseModelSpec
from cpt_trainer.model import load_tokenizer
base = load_tokenizer(BaseModelSpec(uri="demo-data/models/SmolLM2-135M-Instruct.Q4_1.gguf", format="gguf"), None)
extended_dir = sorted(Path(sys.argv[1], "checkpoints").glob("attempt-*/tokenizer-*"))[-1]
extended = AutoTokenizer.from_pretrained(extended_dir)
docs = [json.loads(line)["text"] for line in open("demo-data/german-eval.jsonl")]
before, after = (sum(map(len, tok(docs, add_special_tokens=False)["input_ids"])) for tok in (base, extended))
print(f"{len(extended) - len(base)} new tokens: {before} -> {after} tokens ({(before - after) / before:.1%} fewer)")
PY
fi
