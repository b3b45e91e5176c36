"""Tokenizer extension through the real trainer: surgery, checkpoints, restore, refusal."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from cpt_api.manifest import checkpoint_name
from cpt_api.status import CheckpointSummary, CptRunStatus
from cpt_operator.checkpoint_report import render_report
from cpt_trainer.data.tokenizer_hash import tokenizer_hash
from cpt_trainer.model import load_tokenizer
from cpt_trainer.extension import CONFIG_KEY

from tests.integration.harness import events, log_tail, manifest_of, of, run, tiny_spec, write_config

pytestmark = pytest.mark.slow

TERMS = ["sublicensable", "indemnification"]
EVAL_TEXTS = [
    "Each contributor grants a sublicensable licence to the work and its derivatives.",
    "The indemnification clause survives termination; indemnification covers third-party claims.",
    "A plain sentence about software without any of the added words in it at all.",
    "Rights under this licence are sublicensable only with the prior written consent.",
]
# Runs in a fresh interpreter: what a server or evaluator does with an exported checkpoint.
RELOAD = """
import json, sys, torch
from transformers import AutoModelForCausalLM, AutoTokenizer
from cpt_trainer.data.tokenizer_hash import tokenizer_hash
from cpt_trainer.evals.perplexity import document_ids, token_nll
ckpt, texts, new_ids = sys.argv[1], json.loads(sys.argv[2]), set(json.loads(sys.argv[3]))
tok = AutoTokenizer.from_pretrained(ckpt)
model = AutoModelForCausalLM.from_pretrained(ckpt, dtype=torch.float32).eval()
docs = document_ids(tok, texts)
with torch.no_grad():
    r = token_nll(model, [d for d in docs if new_ids.intersection(d)], seq_len=64,
                  device=torch.device("cpu"), pad_id=tok.eos_token_id)
print(json.dumps({"hash": tokenizer_hash(tok), "ids": docs, "perplexity": r.perplexity}))
"""


def extension_spec(model: Path, corpora: dict[str, Path], eval_file: Path, terms: list[str],
                   ) -> dict:
    return tiny_spec(model, corpora, budget={"steps": 6},
                     tokenizer={"extend": {"terms": terms, "topK": 2, "oversampleSteps": 3,
                                           "oversampleFactor": 4.0}},
                     evaluation={"every": 3, "suites": [
                         {"name": "legal-domain", "kind": "domain", "uri": str(eval_file)}]})


def losses(evs: list) -> dict[int, float]:
    return {e.step: e.loss for e in of("progress", evs)}


def test_extend_train_checkpoint_reload_restore_and_refuse(tmp_path, tiny_model_dir, corpora):
    eval_file = tmp_path / "eval.jsonl"
    eval_file.write_text("".join(json.dumps({"text": t}) + "\n" for t in EVAL_TEXTS))
    spec = extension_spec(tiny_model_dir, corpora, eval_file, TERMS)
    first = write_config(tmp_path, spec, attempt=1)
    assert run(first) == 0, log_tail(first)
    ckpts = tmp_path / "checkpoints" / "attempt-001"
    step3, step6 = ckpts / checkpoint_name(3), ckpts / checkpoint_name(6)
    m3, m6 = manifest_of(step3), manifest_of(step6)

    # The extended tokenizer is saved beside the checkpoints and is the one they are bound to.
    saved = [p for p in ckpts.iterdir() if p.name.startswith("tokenizer-")]
    assert len(saved) == 1
    record = json.loads((saved[0] / "extension.json").read_text())
    added = [t["term"] for t in record["tokens"]]
    assert added[:2] == TERMS and len(added) == 4
    base_hash = tokenizer_hash(load_tokenizer(_base(tiny_model_dir)))
    assert record["baseTokenizerHash"] == base_hash != record["hash"]
    assert m3["lineage"]["tokenizerHash"] == m6["lineage"]["tokenizerHash"] == record["hash"]
    assert saved[0].name == f"tokenizer-{record['hash'][:12]}"

    # Under-trained token care: per-token counters and the eval slice, in every checkpoint.
    for m in (m3, m6):
        assert {"new_tokens.seen", "new_tokens.unseen", "new_terms.perplexity"} <= set(m["evals"])
        assert all(f"new_token.{t}.seen" in m["evals"] for t in added)
    assert m6["evals"]["new_tokens.seen"] >= m3["evals"]["new_tokens.seen"] > 0
    base_eval = of("evaluated", events(first))[0]
    assert base_eval.is_base and "new_terms.perplexity" in base_eval.metrics

    # A fresh process loading the exported checkpoint gets the same tokenizer and the same
    # model; the export keeps the extension's mark in config.json (surgery is never redone).
    exported = tmp_path / "exported"
    subprocess.run([sys.executable, "-m", "cpt_trainer.export", str(step6), "--to", str(exported)],
                   check=True, capture_output=True, timeout=120)
    config = json.loads((exported / "config.json").read_text())
    assert config[CONFIG_KEY] == record["hash"]
    new_ids = {t["id"] for t in record["tokens"]}
    out = subprocess.run([sys.executable, "-c", RELOAD, str(exported), json.dumps(EVAL_TEXTS),
                          json.dumps(sorted(new_ids))],
                         capture_output=True, text=True, check=True, timeout=120)
    fresh = json.loads(out.stdout.strip().splitlines()[-1])
    assert fresh["hash"] == record["hash"]
    with_new = [ids for ids in fresh["ids"] if new_ids.intersection(ids)]
    assert len(with_new) == 3  # every text naming a term, and only those
    from transformers import AutoTokenizer

    here = AutoTokenizer.from_pretrained(saved[0])
    assert [here(t, add_special_tokens=False)["input_ids"] + [here.eos_token_id]
            for t in EVAL_TEXTS] == fresh["ids"]
    # The trainer measured the slice with its in-memory model and tokenizer: same logits.
    assert fresh["perplexity"] == pytest.approx(m6["evals"]["new_terms.perplexity"], rel=1e-5)

    # fullState restore rebuilds the identical extension and continues exactly.
    full = write_config(tmp_path, spec, attempt=2, restore_from=str(step3), restore_mode="fullState")
    assert run(full) == 0, log_tail(full)
    assert of("started", events(full))[0].step == 3
    continued, reference = losses(events(full)), losses(events(first))
    assert sorted(continued) == [4, 5, 6]
    for step in (4, 5, 6):
        assert continued[step] == pytest.approx(reference[step], rel=1e-5)
    m_full = manifest_of(tmp_path / "checkpoints" / "attempt-002" / checkpoint_name(6))
    assert m_full["lineage"]["tokenizerHash"] == record["hash"]
    assert m_full["evals"]["new_tokens.seen"] == m6["evals"]["new_tokens.seen"]

    # Another extension of the same base does not fit that checkpoint: refused, both named.
    other = extension_spec(tiny_model_dir, corpora, eval_file, ["sublicensable"])
    wrong = write_config(tmp_path, other, attempt=3, restore_from=str(step3),
                         restore_mode="weightsOnly")
    assert run(wrong) == 2, log_tail(wrong)
    finished = of("finished", events(wrong))[-1]
    assert finished.reason == "refused" and "tokenizer mismatch" in finished.message
    assert record["hash"] in finished.message and "extended with" in finished.message
    theirs = finished.message.rsplit("has hash ", 1)[1].split()[0]
    assert len(theirs) == 64 and theirs != record["hash"]

    # `cptctl checkpoints` shows the per-token counters apart from the metric columns.
    status = CptRunStatus(checkpoints=[
        CheckpointSummary(name=f"attempt-001/{p.name}", step=m["step"], tokens=m["tokens"],
                          metrics=m["evals"]) for p, m in ((step3, m3), (step6, m6))])
    report = render_report(status)
    assert f"new tokens at attempt-001/{checkpoint_name(6)}" in report
    assert all(t in report.split("new tokens at", 1)[1] for t in added)
    assert "new_token." not in report.splitlines()[0]


def _base(model_dir: Path):
    from cpt_api.spec import BaseModelSpec

    return BaseModelSpec(uri=str(model_dir))

