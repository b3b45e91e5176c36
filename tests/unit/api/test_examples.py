"""Every CptRun a user can copy (examples/ and the README) is valid as written."""
from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml

from cpt_api import parse_run

ROOT = Path(__file__).resolve().parents[3]


def example_files() -> list[Path]:
    return [p for p in sorted(ROOT.glob("examples/**/*.yaml"))
            if any((doc or {}).get("kind") == "CptRun" for doc in yaml.safe_load_all(p.read_text()))]


@pytest.mark.parametrize("path", example_files(), ids=lambda p: str(p.relative_to(ROOT)))
def test_example_is_a_valid_cptrun(path: Path) -> None:
    run = parse_run(yaml.safe_load(path.read_text()))
    assert run.metadata.name


def test_readme_cptrun_is_valid() -> None:
    blocks = re.findall(r"```yaml\n(.*?)```", (ROOT / "README.md").read_text(), re.S)
    runs = [yaml.safe_load(b) for b in blocks if "kind: CptRun" in b]
    assert runs, "the README shows a CptRun"
    for doc in runs:
        assert parse_run(doc).spec.gates
