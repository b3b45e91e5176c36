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


@pytest.mark.parametrize("bpb_domain, bpb_general, r, count, verdict, says, decided", [
    pytest.param(2.0, 1.0, 1, 100, "cpt", "large knowledge / distribution gap", "bits per byte",
                 id="a large gap per byte warrants CPT"),
    pytest.param(2.0, 1.0, 4, 1000, "cpt", "tokenizer extension is worth measuring", "bits per byte",
                 id="a large gap with costly fragmentation also suggests measuring extension"),
    pytest.param(1.3, 1.0, 1, 100, "borderline", "moderate gap", "bits per byte",
                 id="a moderate gap is borderline"),
    pytest.param(1.05, 1.0, 3, 500, "borderline", "costs 10.0% of the domain tokens", "fragmentation",
                 id="costly fragmentation alone is borderline"),
    pytest.param(1.05, 1.0, 4, 100, "not-cpt", "costs only 3.0%", "none",
                 id="fragmentation that costs little is not a reason"),
    pytest.param(1.05, 1.0, 1, 100, "not-cpt", "no distribution gap", "none",
                 id="no gap and whole terms: prompting, RAG or SFT first"),
    pytest.param(0.5, 1.0, 1, 100, "not-cpt", "easier than general text", "none",
                 id="a domain the base finds easy does not need CPT"),
])
def test_recommendation_rules(bpb_domain: float, bpb_general: float, r: int, count: int, verdict: str,
                              says: str, decided: str) -> None:
    rec = recommend(bpb_domain, bpb_general, fragmentation(r, count=count))
    assert (rec.verdict, rec.decided_by) == (verdict, decided)
    assert any(says in reason for reason in rec.reasons), rec.reasons
    assert any("SFT" in reason for reason in rec.reasons)  # CPT is never the whole story
    assert "bits per byte" in rec.reasons[0]


def test_extension_is_not_suggested_when_it_saves_little() -> None:
    tiny_saving = fragmentation(4, count=10, tokens=1_000_000)
    rec = recommend(2.0, 1.0, tiny_saving, Thresholds())
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
        assert 0 < m["tokens"] <= 2000 and m["bytes"] > m["tokens"] and m["words"] > 0
        assert m["perplexity"] == pytest.approx(math.exp(m["nll"]))
        # the same NLL per byte and per word
        assert m["bits_per_byte"] == pytest.approx(m["nll"] * m["tokens"] / math.log(2) / m["bytes"])
        assert m["word_perplexity"] == pytest.approx(math.exp(m["nll"] * m["tokens"] / m["words"]))
        # A random model over a 512-token vocabulary is close to uniform.
        assert 100 < m["perplexity"] < 5000
    assert report["gap"] == pytest.approx(report["domain"]["bits_per_byte"] / report["general"]["bits_per_byte"])
    frag = report["fragmentation"]
    assert frag["r_bar"] >= 1 and frag["terms_analysed"] > 0 and 0 < frag["excess_share"] < 1
    savings = [c["saving"] for c in frag["candidates"]]
    assert len(savings) == 5 and savings == sorted(savings, reverse=True)
    th = Thresholds(**report["thresholds"])
    assert set(report["seconds"]) == {"loading", "domain sample", "general sample", "fragmentation"}
    assert report["recommendation"]["verdict"] == recommend(
        report["domain"]["bits_per_byte"], report["general"]["bits_per_byte"],
        _frag_from(frag), th).verdict


def _frag_from(doc: dict) -> FragmentationReport:  # type: ignore[type-arg]
    """A report with the JSON's excess (one stand-in term of r = 2) and its candidates."""
    cands = tuple(TermStats(c["term"], c["count"], c["general_count"], c["keyness"], tuple(c["pieces"]),
                            c["running"]) for c in doc["candidates"])
    excess = (TermStats("(all terms)", doc["excess"], 0, math.inf, ("a", "b")),) if doc["excess"] else ()
    report = FragmentationReport(terms=excess, domain_words=doc["domain_words"],
                                 domain_tokens=doc["domain_tokens"], r_bar=doc["r_bar"], candidates=cands)
    assert (report.excess_share, report.saving_share) == (doc["excess_share"], doc["saving_share"])
    return report


def test_text_report_and_thresholds_from_the_command_line(tiny_model_dir: Path, corpora, capsys) -> None:  # type: ignore[no-untyped-def]
    # A random model has no domain gap; thresholds below 1x make the same numbers warrant CPT.
    code = main(["--base", str(tiny_model_dir), "--domain", str(corpora["domain"]),
                 "--general", str(corpora["replay"] / "stdlib.jsonl"), "--max-docs", "4",
                 "--max-tokens", "600", "--seq-len", "64", "--gap-threshold", "0.5",
                 "--weak-gap", "0.4", "--device", "cpu"])
    text = capsys.readouterr().out
    assert code == 0
    assert "recommendation: CPT warranted" in text
    assert "gap (domain / general, per byte):" in text and "fragmentation: splitting frequent domain terms" in text
    assert "thresholds: gap 0.5x" in text and "time: loading" in text


def test_a_missing_sample_is_a_clear_error(tiny_model_dir: Path, tmp_path: Path, capsys) -> None:  # type: ignore[no-untyped-def]
    code = main(["--base", str(tiny_model_dir), "--domain", str(tmp_path / "nope"),
                 "--general", str(tmp_path / "nope")])
    assert code == 2
    assert f"domain sample: {tmp_path / 'nope'} does not exist" in capsys.readouterr().err
