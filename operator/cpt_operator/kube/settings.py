"""Operator settings, read once from the environment (the Helm chart sets these names)."""
from __future__ import annotations

import os
import random
import zlib
from dataclasses import dataclass, field
from typing import Mapping

from cpt_api.tenancy import TenancyPolicy

ANNOTATION_STOP = "cpt.mlops.dev/stop"
ANNOTATION_ROLLBACK = "cpt.mlops.dev/rollback-to"
ANNOTATION_RESUME = "cpt.mlops.dev/resume"
"""Continue a Stopped run from its newest checkpoint (set by `cptctl resume`, cleared once read)."""
ANNOTATION_ALERT = "cpt.mlops.dev/gate-alert"
"""Breaches alerts reported, not yet acted on (JSON, `api.alerts.encode_refs`), written by the webhook."""
FINALIZER = "cpt.mlops.dev/finalizer"


@dataclass(frozen=True, kw_only=True)
class Settings:
    trainer_image: str = "ghcr.io/cpt-operator/trainer:latest"
    prometheus_url: str = ""
    """Empty: no metrics are read (gates cannot fire; Jobs still run and finish)."""
    webhook_token: str = ""
    """Empty: the webhook refuses every request."""
    peering: str = ""
    peering_priority: int = 0
    """kopf pauses every replica that sees a live peer of the same or a higher priority, so each
    replica needs its own: the one with the highest handles CptRuns, the others stand by."""
    peering_lifetime_s: int = 60
    """How long a replica's keep-alive counts: a replica killed without a goodbye is replaced by a
    standby this long after its last keep-alive at the latest."""
    namespaces: tuple[str, ...] = ()
    metrics_port: int = 8080
    webhook_port: int = 8081
    health_port: int = 8082
    interval_s: float = 5.0
    """How often each active run is reconciled (observe -> decide -> act)."""
    finished_interval_s: float = 300.0
    """How often a finished (Succeeded, Failed, Stopped) run is: nothing is left to decide from
    its metrics; the pass only makes sure its attempt is gone and sweeps what is left of others
    (a change of the run or an event of its Jobs still triggers a pass at once)."""
    storage_max_age_s: float = 20.0
    """How long a timer pass may decide from an earlier read of a running run's storage when
    nothing says it changed (`kube.freshness.storage_due`); a pass that acts reads it again."""
    shared_read_s: float = 2.0
    """How long one listing of a namespace's Jobs and pods, and one Prometheus read of its runs,
    serve the timer passes of all its runs."""
    trainer_metrics_port: int = 9400
    rdzv_port: int = 29500
    run_as_user: int = 10001
    """uid and gid of the trainer pods: the user trainer/Dockerfile makes, a name in /etc/passwd
    rather than an anonymous uid (getpass, which torch's debug and cache paths call, fails on one)."""
    tenancy: TenancyPolicy = field(default_factory=TenancyPolicy)
    """What the platform team allows runs (chart values `tenancy`, environment CPT_TENANCY)."""
    rollback_grace_s: int = 15
    """Grace of a rolled-back or failed attempt's pods: its progress is being discarded (or cannot
    be saved without the failed rank), so it only needs time to exit, not to save (a stop or
    finish keeps the pods' full grace to checkpoint)."""

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> "Settings":
        env = os.environ if env is None else env
        namespaces = tuple(n.strip() for n in env.get("CPT_NAMESPACES", "").split(",") if n.strip())
        return cls(
            trainer_image=env.get("CPT_TRAINER_IMAGE") or cls.trainer_image,
            prometheus_url=env.get("PROMETHEUS_URL", "").rstrip("/"),
            webhook_token=env.get("CPT_WEBHOOK_TOKEN", ""),
            peering=env.get("CPT_PEERING_NAME", ""),
            peering_priority=peering_priority(env),
            peering_lifetime_s=int(env.get("CPT_PEERING_LIFETIME") or 60),
            namespaces=namespaces,
            metrics_port=int(env.get("CPT_METRICS_PORT") or 8080),
            webhook_port=int(env.get("CPT_WEBHOOK_PORT") or 8081),
            health_port=int(env.get("CPT_HEALTH_PORT") or 8082),
            interval_s=float(env.get("CPT_RECONCILE_INTERVAL") or 5.0),
            finished_interval_s=float(env.get("CPT_FINISHED_INTERVAL") or 300.0),
            storage_max_age_s=float(env.get("CPT_STORAGE_MAX_AGE") or 20.0),
            shared_read_s=float(env.get("CPT_SHARED_READ_TTL") or 2.0),
            tenancy=TenancyPolicy.from_env(env),
        )


def peering_priority(env: Mapping[str, str]) -> int:
    """CPT_PEERING_PRIORITY if set, else one derived from the pod's name (POD_NAME), else random.

    The Deployment gives every replica the same environment, and kopf pauses all replicas of one
    priority ("Pausing all operators, including self"), so a shared default would leave no replica
    working. A pod name is unique among live pods and keeps its priority across container restarts.
    """
    if explicit := env.get("CPT_PEERING_PRIORITY"):
        return int(explicit)
    if pod := env.get("POD_NAME"):
        return zlib.crc32(pod.encode()) & 0x7FFFFFFF
    return random.getrandbits(31)
