"""The run directory of a local run: where everything about one CptRun lives.

    runs/<name>/
      cptrun.yaml           the spec as given (a changed base on resume is refused)
      run-id                this run's identity, made once: its checkpoint root is claimed with it
      status.json           CptRunStatus, the local twin of the CR's status
      requests/             stop / rollback requests from other `cptctl` invocations
      attempt-NNN/          one trainer launch: trainer-config.json, events.jsonl, trainer.log
      checkpoints/attempt-NNN/step-XXXXXXXX/
"""
from __future__ import annotations

import json
import os
import uuid
from pathlib import Path

from cpt_api import CptRunStatus
from cpt_api.manifest import attempt_folder


class RunDir:
    def __init__(self, root: str | Path):
        self.root = Path(root).resolve()

    @classmethod
    def find(cls, run: str) -> "RunDir":
        """A run given as a directory, or as a name under ./runs."""
        for candidate in (Path(run), Path("runs") / run):
            if (candidate / "status.json").exists():
                return cls(candidate)
        raise FileNotFoundError(f"no run directory for {run!r} (looked in {run} and runs/{run})")

    @property
    def spec_file(self) -> Path:
        return self.root / "cptrun.yaml"

    @property
    def status_file(self) -> Path:
        return self.root / "status.json"

    @property
    def checkpoints(self) -> str:
        return str(self.root / "checkpoints")

    @property
    def requests(self) -> Path:
        return self.root / "requests"

    @property
    def lock_file(self) -> Path:
        return self.root / "runner.pid"

    @property
    def run_id(self) -> str:
        """Made on first use and kept, so running the same directory again resumes its own
        checkpoints, while another run directory is another run."""
        path = self.root / "run-id"
        if not path.exists():
            tmp = path.with_suffix(".tmp")
            tmp.write_text(uuid.uuid4().hex)
            os.replace(tmp, path)
        return path.read_text().strip()

    def attempt(self, number: int) -> Path:
        return self.root / attempt_folder(number)

    def read_status(self) -> CptRunStatus:
        if not self.status_file.exists():
            return CptRunStatus()
        return CptRunStatus.model_validate_json(self.status_file.read_text())

    def write_status(self, status: CptRunStatus) -> None:
        """Atomic replace, so a reader (or a crash) never sees half a status."""
        tmp = self.status_file.with_suffix(".tmp")
        tmp.write_text(status.model_dump_json(by_alias=True, exclude_none=True, indent=2))
        os.replace(tmp, self.status_file)

    def request(self, kind: str, payload: dict[str, str]) -> None:
        self.requests.mkdir(parents=True, exist_ok=True)
        tmp = self.requests / f".{kind}.tmp"
        tmp.write_text(json.dumps(payload))
        os.replace(tmp, self.requests / f"{kind}.json")

    def take_request(self, kind: str) -> dict[str, str] | None:
        path = self.requests / f"{kind}.json"
        if not path.exists():
            return None
        payload: dict[str, str] = json.loads(path.read_text())
        path.unlink()
        return payload
