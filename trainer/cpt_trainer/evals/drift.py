"""Chat drift: `Drift = E_x KL(p_base(·|x) || p_θ(·|x))` over response positions.

For each prompt of the suite the response is the record's `response` field when it has one,
otherwise the base model's own greedy response (computed once: the base does not change). At
every position that predicts a response token, the full next-token distributions of the base
(`reference`) and of the model under evaluation are compared:

    KL_t = Σ_v p_base(v | s_<t) · (log p_base(v | s_<t) − log p_θ(v | s_<t))

and the metric is the mean of KL_t over all response positions of all prompts (token-weighted,
in nats). It is 0 for the base itself and grows as training moves the model's chat behaviour
away from the base's, which is what later alignment has to pay for.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from .runtime import batch_rows, idle, logits_of, pad_right, vocab_size
from .sharing import ALONE, Share


def kl_sum(model: torch.nn.Module, reference: torch.nn.Module, rows: Sequence[tuple[list[int], int]],
           *, seq_len: int, device: torch.device, pad_id: int,
           share: Share = ALONE) -> tuple[float, int]:
    """(Σ KL_t, #positions) over this rank's share of rows of (prompt + response ids, prompt
    length); all of them by default."""
    # Both models' logits are alive at once, hence half the usual batch.
    per_batch = max(1, batch_rows(seq_len, vocab_size(model)) // 2)
    total, count = 0.0, 0
    for chunk in share.batches(rows, per_batch):
        if not chunk:  # a padding batch: both models, in the order a real batch runs them
            idle(model, device, pad_id)
            idle(reference, device, pad_id)
            continue
        ids, mask = pad_right([r for r, _ in chunk], pad_id, device)
        positions = _response_mask(chunk, ids.shape[1], device)
        log_theta = F.log_softmax(logits_of(model, ids, mask), dim=-1)
        log_base = F.log_softmax(logits_of(reference, ids, mask), dim=-1)
        kl = F.kl_div(log_theta, log_base, log_target=True, reduction="none").sum(-1)
        total += float(kl.double()[positions].sum().item())
        count += int(positions.sum().item())
    return total, count


def _response_mask(chunk: Sequence[tuple[list[int], int]], width: int, device: torch.device) -> torch.Tensor:
    """True at positions whose next token is a response token (prompt_len−1 … len−2)."""
    mask = torch.zeros((len(chunk), width), dtype=torch.bool)
    for i, (ids, prompt_len) in enumerate(chunk):
        mask[i, max(0, prompt_len - 1):len(ids) - 1] = True
    return mask.to(device)
