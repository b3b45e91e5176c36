"""Bytes autograd keeps for the backward pass of a Llama-style decoder, per rank.

Derived from what each operation saves (the approach of Korthikanti et al. 2022, "Reducing
Activation Recomputation in Large Transformer Models"), for SwiGLU, grouped-query attention,
RMSNorm and flash / sdpa attention, which keeps no T×T score matrix. Per token and decoder layer,
with `a` the bytes of a matmul input (2 in bf16, 4 in fp32) and `r` those of the residual stream
(fp32 under autocast with fp32 weights; bf16 under FSDP's bf16 mixed precision):

- each of the two RMSNorms keeps its input upcast to fp32 (4·h), the normalised value before the
  weight (r·h) and its output as the next matmul's input (a·h): (4 + r + a)·h;
- attention keeps q and k after RoPE, v, the output (which the o projection reads in place) and a
  fp32 log-sum-exp per head: a·(2·q_dim + 2·kv_dim) + 4·heads;
- the MLP keeps the gate output (SiLU input), the SiLU output, the up output and their product
  (the down projection's input): 4·a·intermediate.

For GPT-2-shaped blocks at 16 bits this gives the same order as the paper's 34·h (more, because
SwiGLU keeps four intermediate-sized tensors where GELU keeps two). Outside the blocks: the
token ids (int64) and the final norm. Measured against a real model in
tests/unit/trainer/test_memory_measured.py.

Activation checkpointing keeps only a checkpointed block's input (r·h per token) and recomputes
one block at a time in the backward pass, so one full block is added back.

Logits, per token and vocabulary entry, at the peak of the loss: the fp32 log-probabilities the
cross-entropy keeps (4), and in its backward the fp32 gradients of the log-probabilities and of
the logits (4 + 4): 12 bytes. With the KL-to-base term: the reference logits as computed (a),
the base's fp32 probabilities kept for the KL gradient (4) and the model's fp32 log-probabilities
for the KL term (4), counted as if every token were a replay token.
"""
from __future__ import annotations

from dataclasses import dataclass

from cpt_api.spec import ActivationCheckpointing
from .model_shape import ModelShape

TOKEN_ID_BYTES = 8
LOSS_BYTES_PER_LOGIT = 12


@dataclass(frozen=True, slots=True)
class Dtypes:
    """Element sizes of one step's tensors, in bytes."""

    compute: int
    """A matmul input and the attention / MLP intermediates (`a`)."""
    residual: int
    """The residual stream between blocks (`r`)."""


def norm_bytes(shape: ModelShape, dt: Dtypes) -> int:
    """One RMSNorm, per token: fp32 input, normalised value, output."""
    return (4 + dt.residual + dt.compute) * shape.hidden


def layer_bytes(shape: ModelShape, dt: Dtypes) -> int:
    """One decoder layer without checkpointing, per token."""
    attention = dt.compute * (2 * shape.q_dim + 2 * shape.kv_dim) + 4 * shape.heads
    mlp = 4 * dt.compute * shape.intermediate
    return 2 * norm_bytes(shape, dt) + attention + mlp


def activation_bytes(shape: ModelShape, tokens: int, dt: Dtypes, ac: ActivationCheckpointing) -> int:
    """Everything saved for backward over `tokens` tokens, the loss's logits excepted."""
    full, kept = layer_bytes(shape, dt), dt.residual * shape.hidden
    checkpointed = {ActivationCheckpointing.none: 0, ActivationCheckpointing.full: shape.layers,
                    ActivationCheckpointing.selective: (shape.layers + 1) // 2}[ac]
    blocks = (shape.layers - checkpointed) * full + checkpointed * kept
    recomputed = full if checkpointed else 0
    outside = TOKEN_ID_BYTES + norm_bytes(shape, dt)
    return tokens * (blocks + recomputed + outside)


def logit_bytes(shape: ModelShape, tokens: int, dt: Dtypes, kl: bool) -> int:
    """The loss's logits (and the KL term's reference logits) over `tokens` tokens."""
    per_logit = LOSS_BYTES_PER_LOGIT + ((dt.compute + 4 + 4) if kl else 0)
    return tokens * shape.vocab * per_logit
