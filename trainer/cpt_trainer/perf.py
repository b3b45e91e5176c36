"""Model FLOPs utilisation: achieved training FLOP/s over the device's dense bf16 peak.

FLOPs per token = 6·N (non-embedding parameters, forward + backward) + 12·L·H·Q·T for attention
(PaLM, appendix B). Only reported on GPUs whose peak we know; a wrong peak is worse than none.
"""
from __future__ import annotations

from typing import Any

import torch

# Dense bf16 tensor-core peaks (FLOP/s) from the vendors' data sheets (SXM parts).
PEAKS = {"H200": 989e12, "H100": 989e12, "A100": 312e12, "L40S": 362e12, "L4": 121e12}


def flops_per_token(model: torch.nn.Module, seq_len: int) -> float:
    cfg: Any = model.config  # a transformers PretrainedConfig, which torch types as Tensor | Module
    embedding = sum(p.numel() for n, p in model.named_parameters() if "embed" in n)
    n = sum(p.numel() for p in model.parameters()) - embedding
    layers: int = getattr(cfg, "num_hidden_layers", 0)
    heads: int = getattr(cfg, "num_attention_heads", 0)
    head_dim: int = getattr(cfg, "head_dim", None) or cfg.hidden_size // max(1, heads)
    return 6.0 * n + 12.0 * layers * heads * head_dim * seq_len


def peak_flops(device: torch.device) -> float | None:
    name = torch.cuda.get_device_name(device)
    for key, peak in PEAKS.items():
        if key in name:
            return peak
    return None
