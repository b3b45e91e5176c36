"""Curation as documents are read: every filter drops what it should, keeps the rest, and says so in
curation.json with counts and findable examples; unreadable input is skipped, not fatal."""
from __future__ import annotations

import json
import logging
import re
from pathlib import Path

import pytest

from cpt_trainer.data import DataPipeline
from cpt_trainer.data.curation import non_printable_share
from cpt_trainer.data.decontamination import Decontaminator
from cpt_trainer.data.sources import Document

from .conftest import make_config

GPL = Path("/usr/share/common-licenses/GPL-3").read_text().split()
APACHE = Path("/usr/share/common-licenses/Apache-2.0").read_text().split()

EVAL_PASSAGE = " ".join(GPL[1000:1040])
"""A benchmark passage (40 words) that must not be trained on."""

STRICT = {"dedupe": "near", "nearThreshold": 0.85, "minChars": 40, "maxChars": 5000,
          "maxNonPrintable": 0.05, "maxRepeatedLineRatio": 0.5, "decontaminate": True,
          "decontaminationNgram": 13}


def _edited(text: str) -> str:
    """The same document with one word changed and some punctuation added: a near copy."""
    words = text.split()
    words[len(words) // 2] = "REVISED"
    return " ".join(words).replace(" the ", " the, ", 1)


# (expected filter or None if kept, text); the JSONL line number is the position + 1.
RECORDS = [
    (None, " ".join(GPL[:200])),
    ("exact_duplicate", " ".join(GPL[:200])),
    ("near_duplicate", _edited(" ".join(GPL[:200]))),
    ("too_short", "Too short to learn from."),
    ("too_long", " ".join(APACHE[:2000])),
    ("non_printable", " ".join(APACHE[:30]) + "\x07\x1b\x00\x02" * 20),
    ("repeated_lines", "Click here to subscribe.\n" * 8 + " ".join(APACHE[30:60])),
    # The eval passage, re-cased and re-punctuated, inside an otherwise clean document.
    ("contamination", " ".join(APACHE[100:160]) + "\n" + EVAL_PASSAGE.upper().replace(" ", ",  ")
     + "\n" + " ".join(APACHE[160:200])),
    (None, " ".join(APACHE[300:500])),
    # Shares twelve consecutive words with the eval passage: below the 13-gram, kept.
    (None, " ".join(APACHE[500:540]) + " " + " ".join(GPL[1000:1012])),
]


@pytest.fixture
def curated(tmp_path, tokenizer) -> tuple[DataPipeline, dict]:
    path = tmp_path / "mixed.jsonl"
    path.write_text("".join(json.dumps({"text": text}) + "\n" for _, text in RECORDS))
    cfg = make_config(tmp_path, [{"name": "mixed", "role": "domain", "uri": str(path),
                                  "format": "jsonl"}], curation=STRICT)
    report_dir = tmp_path / "run"
    pipe = DataPipeline(cfg, tokenizer, 0, 1, eval_texts=[EVAL_PASSAGE],
                        report_dir=str(report_dir))
    pipe.next_batch(1)  # documents are read (and curated) as the stream needs them
    return pipe, json.loads((report_dir / "curation.json").read_text())


def kept_texts(pipe: DataPipeline) -> list[Document]:
    """The documents curation keeps in the pipeline's first source, in unit order."""
    stream = pipe._core.streams[0]
    return [d for unit in stream.reader.units for d, verdict in
            stream.curator.curate(stream.reader.documents(unit)) if verdict is None]


def test_each_filter_drops_its_document_and_nothing_else(curated):
    pipe, report = curated
    expected = {name: line for line, (name, _) in enumerate(RECORDS, start=1) if name}
    assert {name: f["dropped"] for name, f in report["filters"].items()} == \
        {name: 1 for name in expected}
    for name, line in expected.items():
        (example,) = report["filters"][name]["examples"]
        assert example["source"] == "mixed" and example["line"] == line, name
        assert example["file"].endswith("mixed.jsonl") and example["reason"], name
    kept = {doc.text for doc in kept_texts(pipe)}
    assert kept == {text for name, text in RECORDS if name is None}
    assert report["read"] == {"mixed": len(RECORDS)} and report["kept"] == {"mixed": 3}
    assert pipe.curation_report()["filters"] == report["filters"]


def test_reasons_point_at_the_evidence(curated):
    _, report = curated
    reasons = {name: f["examples"][0]["reason"] for name, f in report["filters"].items()}
    assert "mixed.jsonl:1" in reasons["exact_duplicate"]
    assert "mixed.jsonl:1" in reasons["near_duplicate"]
    words = re.findall(r"\w+", EVAL_PASSAGE.lower())
    assert f"13-gram '{' '.join(words[:13])}'" in reasons["contamination"]
    assert "minChars 40" in reasons["too_short"] and "maxChars 5000" in reasons["too_long"]


def test_exact_dedupe_keeps_an_edited_copy_that_near_dedupe_drops(tmp_path, tokenizer):
    path = tmp_path / "copies.jsonl"
    original = " ".join(GPL[2000:2200])
    path.write_text("".join(json.dumps({"text": t}) + "\n"
                            for t in (original, _edited(original), original)))
    kept = {}
    for mode in ("exact", "near"):
        cfg = make_config(tmp_path, [{"name": "copies", "role": "domain", "uri": str(path),
                                      "format": "jsonl"}], curation={**STRICT, "dedupe": mode})
        pipe = DataPipeline(cfg, tokenizer, 0, 1)
        kept[mode] = [d.origin.line for d in kept_texts(pipe)]
    assert kept == {"exact": [1, 2], "near": [1]}


@pytest.mark.parametrize("words,matched", [(12, False), (13, True), (40, True)],
                         ids=["12 shared words", "13 shared words", "whole passage"])
def test_decontamination_matches_on_the_configured_ngram(words, matched):
    deco = Decontaminator([EVAL_PASSAGE], 13)
    text = "Preamble of a training document. " + " ".join(GPL[1005:1005 + words]) + " The end."
    assert (deco.shared_ngram(text) is not None) == matched


def test_unreadable_input_is_reported_with_file_and_line_and_skipped(tmp_path, tokenizer, caplog):
    docs = tmp_path / "docs"
    docs.mkdir()
    (docs / "a-good.txt").write_text(" ".join(GPL[:80]))
    (docs / "b-binary.txt").write_bytes(b"line one\nline two\x00\x01\x02 binary")
    (docs / "c-latin1.txt").write_bytes("first line\ncaf\u00e9 cr\u00e8me".encode("latin-1"))
    (docs / "d-empty.txt").write_bytes(b"")
    lines = tmp_path / "records.jsonl"
    lines.write_bytes(b"\n".join([
        json.dumps({"text": " ".join(APACHE[:80])}).encode(),
        b'{"text": "unterminated',
        b"",
        b"[1, 2, 3]",
        json.dumps({"body": "wrong field"}).encode(),
        b'{"text": "caf\xe9"}',
        json.dumps({"text": " ".join(APACHE[80:160])}).encode(),
    ]) + b"\n")
    cfg = make_config(tmp_path, [
        {"name": "files", "role": "domain", "uri": str(docs / "*.txt")},
        {"name": "records", "role": "replay", "uri": str(lines), "format": "jsonl"}])
    with caplog.at_level(logging.WARNING, logger="cpt_trainer.data.report"):
        pipe = DataPipeline(cfg, tokenizer, 0, 1, report_dir=str(tmp_path / "run"), workers=0)
        batch = pipe.next_batch(64)  # enough to read every unit of both sources
    where = {(Path(r.args[0]).name, r.args[1]) for r in caplog.records}
    assert where == {("b-binary.txt", 2), ("c-latin1.txt", 2), ("d-empty.txt", 0),
                     ("records.jsonl", 2), ("records.jsonl", 4), ("records.jsonl", 5),
                     ("records.jsonl", 6)}
    report = json.loads((tmp_path / "run" / "curation.json").read_text())
    assert report["filters"]["bad_input"]["dropped"] == 7
    assert report["read"] == {"files": 1, "records": 2}
    # The run goes on with what could be read.
    assert batch.num_tokens > 0


@pytest.mark.parametrize("text,bad", [
    ("Plain text,\twith tabs\nand newlines.\r\n", 0),
    ("bell\x07 and escape\x1b", 2),
    ("no\u00a0break and zero\u200bwidth", 2),
    ("", 0),
], ids=["whitespace is fine", "control characters", "odd spaces count", "empty"])
def test_non_printable_share_counts_what_is_neither_printable_nor_whitespace(text, bad):
    assert non_printable_share(text) == pytest.approx(bad / max(len(text), 1))
