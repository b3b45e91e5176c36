"""What a trainer reports while it runs, one JSON object a line in `<runDir>/events.jsonl`.

The local runner reads this file to show progress and feed the policy; on a cluster the same
facts reach the operator through Prometheus. Rank 0 writes it.
"""
from __future__ import annotations

from typing import Annotated, Literal, Union

from pydantic import Field, TypeAdapter

from .base import SpecModel
from .goodput import TrainerTimes
from .skips import DataSkip


class Started(SpecModel):
    event: Literal["started"] = "started"
    attempt: int
    step: int
    tokens: int
    restore_from: str | None = None
    world_size: int = 1
    metrics_url: str | None = None
    base_sha256: str | None = None
    """Digest of the base's bytes this attempt verified (the run records the first one)."""
    loaded_bytes: list[int] = Field(default_factory=list)
    """Bytes each rank read to load its start (weights of the model and the reference, and a
    fullState restore's optimizer state), by rank: from the store, or from this node's copy of
    a remote base. Each rank reads its own shards, so each holds about 1/world of the total."""
    setup_seconds: float | None = None
    """From the trainer's start to this event: loading, restoring, the base's evaluation excluded."""
    restart: int = 0
    """In-place restarts of this attempt's trainers before this one (torchrun's count): a restarted
    trainer continues from the attempt's newest checkpoint."""
    times: TrainerTimes | None = None
    time: float


class Progress(SpecModel):
    event: Literal["progress"] = "progress"
    step: int
    tokens: int
    loss: float | None
    """None when the step's loss was not finite (JSON has no NaN)."""
    lr: float
    grad_norm: float | None
    tokens_per_s: float
    skipped: bool = False
    times: TrainerTimes | None = None
    """The trainer's account of its time so far (`api.goodput`)."""
    time: float


class Anomaly(SpecModel):
    event: Literal["anomaly"] = "anomaly"
    step: int
    kind: Literal["grad_norm", "loss_spike", "non_finite", "restored", "skipped"]
    """`restored`: the trainer reloaded its last stable checkpoint and skipped the data of the
    anomalous steps; `skipped`: anomalies went on in the same source's window, which grew."""
    value: float | None = None
    threshold: float | None = None
    message: str = ""
    source: str | None = None
    """The source the anomaly is attributed to: the one whose per-source loss rose most."""
    skip: DataSkip | None = None
    """restored / skipped: the data window skipped so far (also in later checkpoints' lineage)."""
    time: float


class Evaluated(SpecModel):
    event: Literal["evaluated"] = "evaluated"
    step: int
    tokens: int
    metrics: dict[str, float]
    """`suite.metric` -> value."""
    checkpoint: str | None = None
    """Name of the checkpoint saved at this step, if any."""
    is_base: bool = False
    """The reference evaluation of the base model before any training."""
    time: float


class CheckpointSaved(SpecModel):
    event: Literal["checkpoint"] = "checkpoint"
    step: int
    tokens: int
    name: str
    uri: str
    seconds: float
    time: float
    retention_error: str | None = None
    """Retention could not delete the checkpoints beyond `keep` after this commit (the checkpoint
    is saved; the next save tries again)."""


class Finished(SpecModel):
    event: Literal["finished"] = "finished"
    step: int
    tokens: int
    reason: Literal["budget", "interrupted", "anomaly", "refused", "error"]
    """`refused`: the trainer refused its config (exit code `EXIT_REFUSED`); the message says why."""
    message: str = ""
    times: TrainerTimes | None = None
    time: float


Event = Annotated[
    Union[Started, Progress, Anomaly, Evaluated, CheckpointSaved, Finished],
    Field(discriminator="event"),
]
EVENT = TypeAdapter(Event)


def parse_event(line: str) -> Started | Progress | Anomaly | Evaluated | CheckpointSaved | Finished:
    return EVENT.validate_json(line)
