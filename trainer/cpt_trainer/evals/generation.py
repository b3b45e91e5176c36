"""Generation for behaviour, safety, drift and code suites: greedy, and sampled for pass@k.

Prompts go through the tokenizer's chat template when it has one (with the generation prompt
appended), since that is how a chat model is served; otherwise they are encoded as the tokenizer
encodes any text for inference. A prompt longer than `seq_len − max_new_tokens` keeps its end.
Prompts are left-padded into batches in their fixed order and decoded greedily (no sampling,
one beam), so the same weights give the same outputs on every call.

Across ranks each rank generates for its share of the prompts (`sharing.Share`). A sharded
model's every decoding step is a forward, hence a collective, so in lock step every rank makes
as many `generate` calls as the largest share needs (a padding call decodes a one-token prompt
and drops it) and each call stops in sync (`synced_gpus`): a rank whose outputs have all ended
keeps stepping, its results dropped, until every rank's have, so the forwards stay paired.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
from transformers import GenerationConfig, PreTrainedTokenizerBase

from .runtime import batch_rows, vocab_size
from .sharing import ALONE, Share

# Models are loaded with `config.use_cache = False` (packed training batches need the
# per-document mask that a cache would drop), but generation of unpacked, left-padded prompts is
# exact with one, and without it every new token recomputes the whole prefix
# (bench/bench_generation.py measures both). A switch only so that the benchmark can compare.
KV_CACHE = True


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The model under DDP / FSDP (`.module`) or torch.compile (`._orig_mod`) wrappers."""
    while True:
        inner = getattr(model, "_orig_mod", None) or getattr(model, "module", None)
        if not isinstance(inner, torch.nn.Module):
            return model
        model = inner


def render_prompt(tokenizer: PreTrainedTokenizerBase, prompt: str) -> list[int]:
    if getattr(tokenizer, "chat_template", None):
        text = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                             add_generation_prompt=True)
        return list(tokenizer(text, add_special_tokens=False)["input_ids"])
    return list(tokenizer(prompt)["input_ids"])


def prompt_rows(tokenizer: PreTrainedTokenizerBase, prompts: Sequence[str], *, seq_len: int,
                max_new_tokens: int) -> list[list[int]]:
    keep = max(1, seq_len - max_new_tokens)
    return [render_prompt(tokenizer, p)[-keep:] for p in prompts]


def stop_ids(model: torch.nn.Module, tokenizer: PreTrainedTokenizerBase) -> list[int]:
    """EOS of the tokenizer plus any the model's generation config adds (chat end markers)."""
    ids = set()
    if tokenizer.eos_token_id is not None:
        ids.add(int(tokenizer.eos_token_id))
    config = getattr(model, "generation_config", None)
    extra = getattr(config, "eos_token_id", None)
    ids.update([extra] if isinstance(extra, int) else list(extra or []))
    return sorted(ids)


def greedy(model: torch.nn.Module, tokenizer: PreTrainedTokenizerBase, rows: Sequence[list[int]], *,
           max_new_tokens: int, device: torch.device, seq_len: int,
           share: Share = ALONE) -> list[list[int]]:
    """New token ids for each prompt row of this rank's share (all of them by default), up to
    and including the first stop token."""
    model = unwrap(model)
    stops = stop_ids(model, tokenizer)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (stops or [0])[0]
    # GenerationConfig.__init__ is unannotated in transformers
    config = GenerationConfig(max_new_tokens=max_new_tokens, do_sample=False,  # type: ignore[no-untyped-call]
                              num_beams=1, pad_token_id=pad, eos_token_id=stops or None,
                              use_cache=KV_CACHE)
    # generate() keeps only the last position's logits, so the logit budget bounds rows × vocab,
    # not rows × seq_len × vocab (which allowed 5 prompts a batch on a 49k vocabulary at 256).
    per_batch = batch_rows(1, vocab_size(model), limit=16)
    out: list[list[int]] = []
    for chunk in share.batches(rows, per_batch):
        ids, mask = _pad_left(chunk or [[pad]], pad, device)
        generated = model.generate(input_ids=ids, attention_mask=mask,  # type: ignore[operator]
                                   generation_config=config, synced_gpus=share.lockstep)
        for row in generated[:len(chunk), ids.shape[1]:].tolist():
            out.append(_until_stop(row, stops))
    return out


def sampled(model: torch.nn.Module, tokenizer: PreTrainedTokenizerBase, rows: Sequence[list[int]], *, n: int,
            temperature: float, top_p: float, seed: int, max_new_tokens: int, device: torch.device,
            share: Share = ALONE) -> list[list[list[int]]]:
    """`n` sampled completions of each prompt row of this rank's share. Each prompt is decoded in
    a call of its own under its own seed (`seed` + its index in `rows`), with the RNG state put
    back afterwards: every world size draws the same completions, and the caller's (training)
    random stream is untouched."""
    model = unwrap(model)
    stops = stop_ids(model, tokenizer)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (stops or [0])[0]
    config = GenerationConfig(max_new_tokens=max_new_tokens, do_sample=True,  # type: ignore[no-untyped-call]
                              temperature=temperature, top_p=top_p, num_return_sequences=n,
                              pad_token_id=pad, eos_token_id=stops or None, use_cache=KV_CACHE)
    out: list[list[list[int]]] = []
    for chunk in share.batches(list(enumerate(rows)), 1):
        index, row = chunk[0] if chunk else (0, [pad])  # an empty chunk: a lock-step padding call
        ids, mask = _pad_left([row], pad, device)
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            torch.manual_seed(seed + index)
            generated = model.generate(input_ids=ids, attention_mask=mask,  # type: ignore[operator]
                                       generation_config=config, synced_gpus=share.lockstep)
        if chunk:
            out.append([_until_stop(r, stops) for r in generated[:, ids.shape[1]:].tolist()])
    return out


def decode(tokenizer: PreTrainedTokenizerBase, ids: list[int]) -> str:
    return str(tokenizer.decode(ids, skip_special_tokens=True))


def _until_stop(row: list[int], stops: list[int]) -> list[int]:
    for i, token in enumerate(row):
        if token in stops:
            return row[:i + 1]
    return row


def _pad_left(rows: Sequence[list[int]], pad: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, width - len(r):] = torch.tensor(r, dtype=torch.long)
        mask[i, width - len(r):] = 1
    return ids.to(device), mask.to(device)
