"""`cptctl export` on checkpoints the real trainer wrote: what transformers loads from the
export is the checkpoint's model, and a corrupt checkpoint or a used directory is refused."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from cpt_operator import cli
from cpt_api.manifest import checkpoint_name
from cpt_api.status import CptRunStatus
from cpt_trainer import checkpoint
from cpt_trainer.model import load_checkpoint_model

from tests.integration.harness import log_tail, run, tiny_spec, write_config

pytestmark = pytest.mark.slow

IDS = torch.tensor([[5, 17, 300, 42, 7, 99, 0, 12], [1, 2, 3, 4, 5, 6, 7, 8]])


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, tiny_model_dir, corpora) -> Path:
    """A local run directory with checkpoints at steps 3 and 6 of attempt 1."""
    root = tmp_path_factory.mktemp("run")
    config = write_config(root, tiny_spec(tiny_model_dir, corpora, budget={"steps": 6}))
    assert run(config) == 0, log_tail(config)
    (root / "status.json").write_text(CptRunStatus().model_dump_json())
    return root


def ckpt(run_dir: Path, step: int) -> Path:
    return run_dir / "checkpoints" / "attempt-001" / checkpoint_name(step)


def choose(run_dir: Path, name: str | None) -> None:
    (run_dir / "status.json").write_text(CptRunStatus(best_checkpoint=name).model_dump_json())


def export(*argv: str) -> int:
    return cli.main(["export", *argv])


def logits(model: torch.nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return model.eval()(input_ids=IDS).logits


def files_of(directory: Path) -> dict[str, bytes]:
    return {p.relative_to(directory).as_posix(): p.read_bytes()
            for p in sorted(directory.rglob("*")) if p.is_file()}


def test_the_chosen_checkpoint_exports_to_a_directory_transformers_loads(run_dir, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    choose(run_dir, f"attempt-001/{checkpoint_name(3)}")  # not the newest: the choice wins
    source = ckpt(run_dir, 3)
    before = files_of(source)
    out = tmp_path / "served"
    assert export(str(run_dir), "--to", str(out), "--max-shard-size", "100KB") == 0

    index = json.loads((out / "model.safetensors.index.json").read_text())
    shards = sorted(p.name for p in out.glob("model-*.safetensors"))
    assert len(shards) > 1 and set(index["weight_map"].values()) == set(shards)
    assert "lm_head.weight" not in index["weight_map"]  # tied: stored once
    model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    assert torch.equal(logits(model), logits(load_checkpoint_model(str(source))))

    config, theirs = (json.loads((d / "config.json").read_text()) for d in (out, source))
    assert config == {**theirs, "use_cache": True}
    for name in ("tokenizer.json", "tokenizer_config.json"):
        assert (out / name).read_bytes() == (source / name).read_bytes()
    assert AutoTokenizer.from_pretrained(out)("the licensee")["input_ids"]
    assert sorted(p.name for p in out.iterdir()) == sorted(
        ["config.json", "model.safetensors.index.json", "tokenizer.json", "tokenizer_config.json",
         *shards])
    assert files_of(source) == before  # the checkpoint is only read
    assert not list(tmp_path.glob(".served.export-*"))  # no staging directory left behind


@pytest.mark.parametrize("args, step", [
    pytest.param([], 6, id="without a chosen checkpoint the newest valid one is exported"),
    pytest.param([checkpoint_name(3)], 3, id="a step name picks that checkpoint of the run"),
    pytest.param(["attempt-001/" + checkpoint_name(3)], 3, id="so does an attempt/step name"),
])
def test_which_checkpoint_is_exported(run_dir, tmp_path, args, step):
    choose(run_dir, None)
    out = tmp_path / "out"
    assert export(str(run_dir), *args, "--to", str(out)) == 0
    assert sorted(p.name for p in out.glob("*.safetensors")) == ["model.safetensors"]
    from safetensors.torch import load_file

    expected = load_checkpoint_model(str(ckpt(run_dir, step))).model.norm.weight
    assert torch.equal(load_file(out / "model.safetensors")["model.norm.weight"], expected)


def test_a_corrupt_checkpoint_is_refused_with_the_file_named(run_dir, tmp_path, capfd):
    broken = tmp_path / checkpoint_name(6)
    shutil.copytree(ckpt(run_dir, 6), broken)
    shard = broken / "model" / "__0_0.distcp"
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0xFF  # same size: only the sha256 can tell
    shard.write_bytes(bytes(data))
    out = tmp_path / "out"
    assert export(str(broken), "--to", str(out)) == 2
    err = capfd.readouterr().err
    assert "model/__0_0.distcp sha256" in err and "differs from manifest" in err
    assert not out.exists() and not list(tmp_path.glob(".out.export-*"))


def test_a_non_empty_directory_is_refused_unless_forced(run_dir, tmp_path, capfd):
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    source = str(ckpt(run_dir, 6))
    assert export(source, "--to", str(out)) == 2
    assert "is not empty (use --force" in capfd.readouterr().err
    assert [p.name for p in out.iterdir()] == ["notes.txt"]

    assert export(source, "--to", str(out), "--force") == 0
    assert not (out / "notes.txt").exists() and (out / "model.safetensors").exists()
    assert checkpoint.problems_of(source)[1] == []


def test_an_export_into_the_checkpoint_is_refused(run_dir, capfd):
    source = ckpt(run_dir, 6)
    assert export(str(source), "--to", str(source / "hf"), "--force") == 2
    assert "overlaps the checkpoint" in capfd.readouterr().err
    assert not (source / "hf").exists()
