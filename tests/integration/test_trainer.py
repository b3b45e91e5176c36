"""The real trainer through its real entry point (`torchrun -m cpt_trainer`, gloo on CPU)."""
from __future__ import annotations

import json
import shutil

import pytest
import torch

from cpt_api.manifest import checkpoint_name
from cpt_trainer import checkpoint

from tests.integration.harness import (events, kill_after_checkpoint, log_tail, manifest_of, of,
                                       optimizer_steps, run, tiny_spec, write_config)

pytestmark = pytest.mark.slow


def losses(evs: list, upto: int | None = None) -> dict[int, float]:
    return {e.step: e.loss for e in of("progress", evs) if upto is None or e.step <= upto}


def test_two_process_sigkill_and_resume_matches_an_uninterrupted_run(tmp_path, tiny_model_dir, corpora):
    # Many steps after the first checkpoint, so the kill lands mid-run even on a fast machine.
    spec = tiny_spec(tiny_model_dir, corpora, budget={"steps": 30},
                     checkpoint={"every": 5, "keep": 10})
    straight = write_config(tmp_path / "straight", spec)
    assert run(straight, nproc=2) == 0, log_tail(straight)
    reference = losses(events(straight))
    assert sorted(reference) == list(range(1, 31))

    killed_dir = tmp_path / "killed"
    first = write_config(killed_dir, spec, attempt=1)
    step5 = kill_after_checkpoint(first, 2, killed_dir / "checkpoints" / "attempt-001", 5)

    second = write_config(killed_dir, spec, attempt=2,
                          restore_from=str(step5), restore_mode="fullState")
    assert run(second, nproc=2) == 0, log_tail(second)
    started = of("started", events(second))[0]
    assert (started.step, started.world_size) == (5, 2)
    resumed = losses(events(first), upto=5) | losses(events(second))
    assert sorted(resumed) == list(range(1, 31))
    for step in range(1, 31):
        assert resumed[step] == pytest.approx(reference[step], rel=1e-5, abs=1e-6), step


def test_restore_modes_and_lineage(tmp_path, tiny_model_dir, corpora):
    spec = tiny_spec(tiny_model_dir, corpora, budget={"steps": 6},
                     schedule={"warmupSteps": 3, "decay": "linear", "minLr": 0.0})
    first = write_config(tmp_path, spec, attempt=1)
    assert run(first) == 0, log_tail(first)
    base_run = losses(events(first))
    step3 = tmp_path / "checkpoints" / "attempt-001" / checkpoint_name(3)
    m = manifest_of(step3)
    assert m["step"] == 3 and m["lineage"]["parent"] is None
    assert m["lineage"]["restoreMode"] == "weightsOnly" and len(m["lineage"]["tokenizerHash"]) == 64
    assert set(m["files"]) >= {"config.json", "model/.metadata", "model/__0_0.distcp",
                               "optimizer/.metadata", "optimizer/__0_0.distcp", "train-state.json",
                               "rng-rank00000.json", "data-rank00000.json", "trainer-config.json"}

    full = write_config(tmp_path, spec, attempt=2, restore_from=str(step3), restore_mode="fullState")
    assert run(full) == 0, log_tail(full)
    assert of("started", events(full))[0].step == 3
    continued = losses(events(full))
    assert sorted(continued) == [4, 5, 6]
    for step in (4, 5, 6):
        assert continued[step] == pytest.approx(base_run[step], rel=1e-5)
    full_ckpt = tmp_path / "checkpoints" / "attempt-002" / checkpoint_name(6)
    assert manifest_of(full_ckpt)["lineage"]["parent"] == str(step3)

    weights = write_config(tmp_path, spec, attempt=3, restore_from=str(step3),
                           restore_mode="weightsOnly")
    assert run(weights) == 0, log_tail(weights)
    evs = events(weights)
    assert of("started", evs)[0].step == 0
    first_progress = of("progress", evs)[0]
    assert first_progress.step == 1 and first_progress.lr == pytest.approx(spec["optimizer"]["lr"] / 3)
    ckpt = tmp_path / "checkpoints" / "attempt-003" / checkpoint_name(3)
    assert manifest_of(ckpt)["lineage"]["restoreMode"] == "weightsOnly"
    # A fresh optimizer: three AdamW steps since the restore, not six.
    assert set(optimizer_steps(ckpt).values()) == {3.0}


def test_mismatched_tokenizer_is_refused(tmp_path, tiny_model_dir, corpora):
    spec = tiny_spec(tiny_model_dir, corpora, budget={"steps": 3})
    first = write_config(tmp_path, spec, attempt=1)
    assert run(first) == 0, log_tail(first)
    step3 = tmp_path / "checkpoints" / "attempt-001" / checkpoint_name(3)

    other = tmp_path / "other-tokenizer"
    shutil.copytree(tiny_model_dir, other)
    doc = json.loads((other / "tokenizer.json").read_text())
    doc["added_tokens"].append({"id": len(doc["model"]["vocab"]) + 5, "content": "<extra>",
                                "single_word": False, "lstrip": False, "rstrip": False,
                                "normalized": False, "special": True})
    (other / "tokenizer.json").write_text(json.dumps(doc))
    bad = write_config(tmp_path, {**spec, "tokenizer": {"uri": str(other)}}, attempt=2,
                       restore_from=str(step3), restore_mode="fullState")
    assert run(bad) == 2, log_tail(bad)
    finished = of("finished", events(bad))[-1]
    assert finished.reason == "refused" and "tokenizer mismatch" in finished.message
    assert str(other) in finished.message and str(step3) in finished.message


def test_partial_and_corrupt_checkpoints_are_ignored_reported_and_refused(tmp_path, tiny_model_dir,
                                                                          corpora):
    spec = tiny_spec(tiny_model_dir, corpora, budget={"steps": 6})
    first = write_config(tmp_path, spec)
    assert run(first) == 0, log_tail(first)
    root = tmp_path / "checkpoints" / "attempt-001"
    good = root / checkpoint_name(6)
    partial = root / checkpoint_name(7)
    shutil.copytree(good, partial)
    (partial / "manifest.json").unlink()
    corrupt = root / checkpoint_name(8)
    shutil.copytree(good, corrupt)
    manifest = json.loads((corrupt / "manifest.json").read_text())
    manifest["step"] = 8
    (corrupt / "manifest.json").write_text(json.dumps(manifest))
    with open(corrupt / "model" / "__0_0.distcp", "r+b") as f:
        f.seek(200)
        byte = f.read(1)
        f.seek(200)
        f.write(bytes([byte[0] ^ 0xFF]))

    valid, problems = checkpoint.list_checkpoints(str(root))
    assert [name for name, _ in valid] == [checkpoint_name(3), checkpoint_name(6)]
    reasons = {p.checkpoint: p.reason for p in problems}
    assert "no manifest" in reasons[checkpoint_name(7)]
    assert "model/__0_0.distcp" in reasons[checkpoint_name(8)] and "sha256" in reasons[checkpoint_name(8)]
    assert checkpoint.latest_valid(str(root))[0] == checkpoint_name(6)

    refused = write_config(tmp_path, spec, attempt=2, restore_from=str(corrupt),
                           restore_mode="fullState")
    assert run(refused) == 2
    message = of("finished", events(refused))[-1].message
    assert "cannot restore" in message and "model/__0_0.distcp" in message
    # The good checkpoints are untouched by the refused attempt.
    assert checkpoint.problems_of(str(good))[1] == []


def test_anomalies_are_skipped_then_restored_or_stop_the_attempt(tmp_path, tiny_model_dir, corpora):
    # A base whose final norm is NaN: every step's loss is non-finite, deterministically.
    from transformers import AutoModelForCausalLM, AutoTokenizer

    broken = tmp_path / "broken-base"
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    with torch.no_grad():
        model.model.norm.weight.fill_(float("nan"))
    model.save_pretrained(broken)
    AutoTokenizer.from_pretrained(tiny_model_dir).save_pretrained(broken)
    spec = tiny_spec(broken, corpora, budget={"steps": 5},
                     schedule={"warmupSteps": 1, "decay": "constant"},
                     gradient={"anomaly": {"maxConsecutive": 2, "onNonFinite": "skip"}})
    skipping = write_config(tmp_path / "skip", spec)
    assert run(skipping) == 0, log_tail(skipping)
    evs = events(skipping)
    kinds = [e.kind for e in of("anomaly", evs)]
    # skip, skip -> restore the start point, and again: the loop never applies a NaN update
    assert kinds[:3] == ["non_finite", "non_finite", "restored"], kinds
    assert all(e.skipped for e in of("progress", evs))
    assert of("finished", evs)[-1].reason == "budget"
    manifest = manifest_of(tmp_path / "skip" / "checkpoints" / "attempt-001" / checkpoint_name(5))
    assert manifest["stable"] is False  # never a target for the next anomaly restore

    spec["gradient"]["anomaly"]["onNonFinite"] = "stop"
    stopping = write_config(tmp_path / "stop", spec)
    assert run(stopping) == 3, log_tail(stopping)
    evs = events(stopping)
    assert [e.kind for e in of("anomaly", evs)] == ["non_finite"]
    finished = of("finished", evs)[-1]
    assert finished.reason == "anomaly" and "not finite" in finished.message


def test_tokenizer_version_pins_the_tokenizer(tmp_path, tiny_model_dir, corpora):
    from transformers import AutoTokenizer

    from cpt_trainer.data import tokenizer_hash

    actual = tokenizer_hash(AutoTokenizer.from_pretrained(tiny_model_dir))
    spec = tiny_spec(tiny_model_dir, corpora, budget={"steps": 3},
                     tokenizer={"version": actual[:16]})
    pinned = write_config(tmp_path / "ok", spec)
    assert run(pinned) == 0, log_tail(pinned)

    spec["tokenizer"] = {"version": "0" * 64}
    wrong = write_config(tmp_path / "wrong", spec)
    assert run(wrong) == 2
    message = of("finished", events(wrong))[-1].message
    assert "tokenizer version mismatch" in message and actual in message


def test_a_base_changed_after_the_first_start_is_refused_naming_both_digests(tmp_path, tiny_model_dir,
                                                                              corpora):
    """The run records the base's digest at its first start (status.baseSha256) and hands it to
    every later attempt: a restart from the base after its files changed is refused."""
    from cpt_api import CptRunSpec, CptRunStatus, Phase
    from cpt_operator.reconcile import AttemptState, Observed, StartAttempt, reconcile
    from cpt_operator.records import RunRecords
    from cpt_trainer.load.node_copy import digest

    base = tmp_path / "base"
    shutil.copytree(tiny_model_dir, base)
    spec = tiny_spec(base, corpora, budget={"steps": 3})
    first = write_config(tmp_path, spec, attempt=1)
    assert run(first) == 0, log_tail(first)
    recorded = RunRecords(str(tmp_path / "checkpoints")).read().base_sha256
    assert recorded and recorded == of("started", events(first))[0].base_sha256

    # attempt 1 is lost before any checkpoint of its own is seen: the restart is from the base
    status = CptRunStatus(phase=Phase.running, attempt=1)
    lost = Observed(attempt=AttemptState(number=1, state="absent", message="node lost"), now="t",
                    base_sha256=recorded)
    plan = reconcile(CptRunSpec.model_validate(spec), status, lost)
    start = next(a for a in plan.actions if isinstance(a, StartAttempt))
    assert start.restore_from is None and start.base_sha256 == recorded

    config = json.loads((base / "config.json").read_text())
    (base / "config.json").write_text(json.dumps({**config, "note": "edited in place"}))
    second = write_config(tmp_path, spec, attempt=2, base_sha256=start.base_sha256)
    assert run(second) == 2, log_tail(second)
    finished = of("finished", events(second))[-1]
    changed = digest(str(base))
    assert changed != recorded
    assert finished.reason == "refused" and str(base) in finished.message
    assert recorded in finished.message and changed in finished.message

    refused = AttemptState(number=2, state="failed", message=finished.message, refused=True)
    final = reconcile(CptRunSpec.model_validate(spec), plan.status, Observed(attempt=refused, now="t"))
    assert final.status.phase == Phase.failed and recorded in final.status.message
