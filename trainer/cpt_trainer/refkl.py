"""The KL-to-base term of the training loss (`regularization.refKL`):

    β · Σ_{replay tokens t} KL(p_base(·|s_<t) || p_θ(·|s_<t))

summed over a micro-batch's replay tokens and divided, like the NLL, by the global token count:
it anchors the model's predictions on replay data (the general ability continued pretraining
must keep) to the frozen base's.

The reference runs only on the windows that hold replay tokens (a window is filled from one
source, so under a low replay weight most hold none). Sharded (fsdp), the reference's forward is
a collective: every rank must enter it on every micro-batch, whatever its windows hold, or one
rank waits in the reference's all-gather while another waits in the backward's reduce-scatter
until the collective timeout. A rank without replay windows then runs it on one token: the same
all-gathers, next to no compute, and the result is dropped. Replicated (one process, ddp), the
reference has no collectives and is not run where there is nothing to anchor.
"""
from __future__ import annotations

import contextlib
from typing import Any

import torch
import torch.nn.functional as F

from .data import Batch


def replay_kl(reference: torch.nn.Module, batch: Batch, logits: torch.Tensor, replay: torch.Tensor,
              *, flatten: bool, collective: bool,
              autocast: contextlib.AbstractContextManager[Any]) -> torch.Tensor | None:
    """Σ KL over the positions where `replay` [B, T-1] is true, differentiable through the
    model's `logits` [B, T-1, V]; None when the micro-batch has no replay token. `collective`:
    the reference is sharded, so it runs on every call (see the module docstring)."""
    keep = replay.any(dim=1)
    if not bool(keep.any()):
        if collective:
            with torch.no_grad(), autocast:
                reference(**_one_token(batch.model_inputs(flatten=flatten)))
        return None
    picked = batch.rows(keep)
    with torch.no_grad(), autocast:
        ref = reference(**picked.model_inputs(flatten=flatten)).logits
    ref = ref.view(*picked.input_ids.shape, -1)[:, :-1]
    mask = replay[keep]
    ref_logp = F.log_softmax(ref.float()[mask], dim=-1)
    logp = F.log_softmax(logits[keep][mask], dim=-1)
    return (ref_logp.exp() * (ref_logp - logp)).sum()


def _one_token(inputs: dict[str, Any]) -> dict[str, Any]:
    """The forward's inputs cut to the first token of the first row."""
    return {k: v[:1, :1] if isinstance(v, torch.Tensor) else v for k, v in inputs.items()}


__all__ = ["replay_kl"]
