"""Every random stream of a rank (torch, CUDA, Python, NumPy) as JSON, for checkpoints.

JSON, not pickle: loading a checkpoint must never execute code from it. A resumed rank on the
same world size continues its own stream exactly; on another world size no old stream belongs
to the new rank, and a fresh, reproducible one is derived from the seed and the step.
"""
from __future__ import annotations

import base64
import random
from typing import Any

import numpy as np
import torch


def _tensor_b64(t: torch.Tensor) -> str:
    return base64.b64encode(t.numpy().tobytes()).decode()


def _b64_tensor(text: str) -> torch.Tensor:
    return torch.frombuffer(bytearray(base64.b64decode(text)), dtype=torch.uint8)


def rng_state() -> dict[str, Any]:
    version, internal, gauss = random.getstate()
    bitgen = np.random.get_state(legacy=False)
    state: dict[str, Any] = {
        "torch": _tensor_b64(torch.get_rng_state()),
        "python": [version, list(internal), gauss],
        "numpy": {"bit_generator": bitgen["bit_generator"],
                  "key": bitgen["state"]["key"].tolist(), "pos": int(bitgen["state"]["pos"]),
                  "has_gauss": int(bitgen["has_gauss"]), "gauss": float(bitgen["gauss"])},
    }
    if torch.cuda.is_available():
        state["cuda"] = [_tensor_b64(s) for s in torch.cuda.get_rng_state_all()]
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(_b64_tensor(state["torch"]))
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    n = state["numpy"]
    np.random.set_state({"bit_generator": n["bit_generator"],
                         "state": {"key": np.array(n["key"], dtype=np.uint32), "pos": n["pos"]},
                         "has_gauss": n["has_gauss"], "gauss": n["gauss"]})
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([_b64_tensor(s) for s in state["cuda"]])


class RngState:
    """This rank's random streams as a stateful checkpoint part."""

    def state_dict(self) -> dict[str, Any]:
        return rng_state()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        set_rng_state(state)


def reseed(seed: int, step: int, rank: int) -> None:
    """A fresh stream for `rank` at `step`, when no saved rank's stream continues on it."""
    torch.manual_seed(seed + 1_000_003 * step + rank)


__all__ = ["RngState", "reseed", "rng_state", "set_rng_state"]
