"""How evaluation runs a model: eval mode restored afterwards, no autograd, optional autocast.

`model.eval()` turns dropout off (results must not depend on the RNG); the previous mode is put
back per module, because a training loop may hold some submodules frozen in eval mode on
purpose.
"""
from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch

# Logits are `batch × length × vocab` floats; this bounds one batch's logits (256 MiB in fp32) so
# a 150k vocabulary at a long seq_len does not run out of memory, while tiny models still batch.
# A batch holds about three logit-sized tensors at once (the logits, their shifted copy, the
# log-softmax): 1 GiB of logits made the demo's evaluation (49k vocabulary) 3 GiB, far above
# its training step; the memory planner counts evaluation as smaller than a step.
LOGIT_BUDGET = 1 << 26


@contextlib.contextmanager
def inference(model: torch.nn.Module, device: torch.device,
              autocast_dtype: torch.dtype | None) -> Iterator[None]:
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    autocast = (torch.autocast(device.type, dtype=autocast_dtype) if autocast_dtype is not None
                else contextlib.nullcontext())
    try:
        with torch.no_grad(), autocast:
            yield
    finally:
        for module, training in modes:
            module.train(training)


def batch_rows(seq_len: int, vocab: int, limit: int | None = None) -> int:
    """Rows per forward pass so that one batch's logits fit in LOGIT_BUDGET."""
    rows = max(1, LOGIT_BUDGET // max(1, seq_len * vocab))
    return min(rows, limit) if limit else rows


def vocab_size(model: torch.nn.Module) -> int:
    config = getattr(model, "config", None)
    size = getattr(config, "vocab_size", None)
    if size is None:
        get = getattr(model, "get_output_embeddings", None)
        head = get() if callable(get) else None
        size = head.weight.shape[0] if head is not None else 32_000
    return int(size)


def pad_right(rows: list[list[int]], pad: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """(input_ids, attention_mask) for rows padded on the right."""
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, :len(r)] = torch.tensor(r, dtype=torch.long)
        mask[i, :len(r)] = 1
    return ids.to(device), mask.to(device)


def logits_of(model: torch.nn.Module, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Float32 logits; the cast keeps softmax and NLL sums exact enough under bf16 autocast."""
    out = model(input_ids=ids, attention_mask=mask, use_cache=False)
    logits: torch.Tensor = out.logits
    return logits.float()


def idle(model: torch.nn.Module, device: torch.device, pad_id: int) -> None:
    """A forward on one token whose result is dropped: a padding batch (`sharing.py`). It
    enters every collective a sharded model's forward holds, and computes next to nothing."""
    model(input_ids=torch.full((1, 1), pad_id, dtype=torch.long, device=device), use_cache=False)
