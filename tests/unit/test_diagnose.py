"""`cptctl diagnose`: the recommendation rules, and the real module on the tiny model."""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

from cpt_trainer.diagnose import Thresholds, main, recommend
from cpt_trainer.fragmentation import FragmentationReport, TermStats


def fragmentation(r: int, count: int = 100, tokens: int = 10_000) -> FragmentationReport:
    term = TermStats("licensee", count, 0, math.inf, tuple("x" * r))
    return FragmentationReport(terms=(term,), domain_words=5_000, domain_tokens=tokens,
                               r_bar=float(r), candidates=(term,) if r > 1 else ())


@pytest.mark.parametrize("ppl_domain, ppl_general, r, verdict, says", [
    pytest.param(40.0, 10.0, 1, "cpt", "large knowledge / distribution gap",
                 id="a large perplexity gap warrants CPT"),
    pytest.param(40.0, 10.0, 4, "cpt", "tokenizer extension is worth measuring",
                 id="a large gap with heavy fragmentation also suggests measuring extension"),
    pytest.param(13.0, 10.0, 1, "borderline", "moderate gap",
                 id="a moderate gap is borderline"),
    pytest.param(10.5, 10.0, 3, "borderline", "heavily fragmented",
                 id="heavy fragmentation alone is borderline"),
    pytest.param(10.5, 10.0, 1, "not-cpt", "no distribution gap",
                 id="no gap and whole terms: prompting, RAG or SFT first"),
    pytest.param(5.0, 10.0, 1, "not-cpt", "easier than general text",
                 id="a domain the base finds easy does not need CPT"),
])
def test_recommendation_rules(ppl_domain: float, ppl_general: float, r: int, verdict: str,
                              says: str) -> None:
    rec = recommend(ppl_domain, ppl_general, fragmentation(r))
    assert rec.verdict == verdict
    assert any(says in reason for reason in rec.reasons), rec.reasons
    assert any("SFT" in reason for reason in rec.reasons)  # CPT is never the whole story


def test_extension_is_not_suggested_when_it_saves_little() -> None:
    tiny_saving = fragmentation(4, count=10, tokens=1_000_000)
    rec = recommend(40.0, 10.0, tiny_saving, Thresholds())
    assert rec.verdict == "cpt"
    assert not any("extension" in reason for reason in rec.reasons)


def test_the_module_reports_perplexities_gap_and_fragmentation(tiny_model_dir: Path,
                                                              corpora: dict[str, Path]) -> None:
    general = corpora["replay"] / "stdlib.jsonl"
    cmd = [sys.executable, "-m", "cpt_trainer.diagnose", "--base", str(tiny_model_dir),
           "--domain", str(corpora["domain"]), "--general", str(general), "--max-docs", "8",
           "--max-tokens", "2000", "--seq-len", "128", "--top", "5", "--json"]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=120,
                         env={**os.environ, "CUDA_VISIBLE_DEVICES": ""})
    assert out.returncode == 0, out.stderr
    report = json.loads(out.stdout)

    for side in ("domain", "general"):
        m = report[side]
        assert m["documents"] == 8
        assert 0 < m["tokens"] <= 2000
        assert m["perplexity"] == pytest.approx(math.exp(m["nll"]))
        # A random model over a 512-token vocabulary is close to uniform.
        assert 100 < m["perplexity"] < 5000
    assert report["gap"] == pytest.approx(report["domain"]["perplexity"] / report["general"]["perplexity"])
    frag = report["fragmentation"]
    assert frag["r_bar"] >= 1 and frag["terms_analysed"] > 0
    savings = [c["saving"] for c in frag["candidates"]]
    assert len(savings) == 5 and savings == sorted(savings, reverse=True)
    th = Thresholds(**report["thresholds"])
    assert report["recommendation"]["verdict"] == recommend(
        report["domain"]["perplexity"], report["general"]["perplexity"],
        _frag_from(frag), th).verdict


def _frag_from(doc: dict) -> FragmentationReport:  # type: ignore[type-arg]
    cands = tuple(TermStats(c["term"], c["count"], c["general_count"], c["keyness"],
                            tuple(c["pieces"])) for c in doc["candidates"])
    return FragmentationReport(terms=cands, domain_words=doc["domain_words"],
                               domain_tokens=doc["domain_tokens"], r_bar=doc["r_bar"],
                               candidates=cands)


def test_text_report_and_thresholds_from_the_command_line(tiny_model_dir: Path, corpora, capsys) -> None:  # type: ignore[no-untyped-def]
    # A random model has no domain gap; thresholds below 1x make the same numbers warrant CPT.
    code = main(["--base", str(tiny_model_dir), "--domain", str(corpora["domain"]),
                 "--general", str(corpora["replay"] / "stdlib.jsonl"), "--max-docs", "4",
                 "--max-tokens", "600", "--seq-len", "64", "--gap-threshold", "0.5",
                 "--weak-gap", "0.4", "--device", "cpu"])
    text = capsys.readouterr().out
    assert code == 0
    assert "recommendation: CPT warranted" in text
    assert "gap (domain / general):" in text and "fragmentation r̄ =" in text


def test_a_missing_sample_is_a_clear_error(tiny_model_dir: Path, tmp_path: Path, capsys) -> None:  # type: ignore[no-untyped-def]
    code = main(["--base", str(tiny_model_dir), "--domain", str(tmp_path / "nope"),
                 "--general", str(tmp_path / "nope")])
    assert code == 2
    assert f"domain sample: {tmp_path / 'nope'} does not exist" in capsys.readouterr().err
