"""The model and tokenizer a run names: architecture skeletons, whole-model loads for tools and
GGUF bases, the tokenizer, and the checks that a base is the one the spec and the run recorded.

Training ranks never load a whole base: `weights.py` builds a skeleton here, shards it and
reads each rank's slices. Remote URIs (any fsspec URL) are copied once per node and hashed on the
way (`load/node_copy.py`); the base itself is only ever read. Every load is checked against the
spec's `baseModel.sha256` when one is given, so a run never silently trains another model.
"""
from __future__ import annotations

import logging
import os
from pathlib import Path

import torch
from transformers import (AutoConfig, AutoModelForCausalLM, AutoTokenizer, PreTrainedModel,
                          PreTrainedTokenizerBase)

from cpt_api.manifest import MODEL_DIR
from cpt_api.spec import BaseModelSpec, ModelFormat, TokenizerSpec

from .errors import Refused
from .load.node_copy import base_digest, local_copy

log = logging.getLogger(__name__)


def check_digest(base: BaseModelSpec, actual: str) -> None:
    """Refuse a base whose bytes differ from the spec's sha256."""
    if base.sha256 and base.sha256 != actual:
        raise Refused(f"base model {base.uri} has sha256 {actual}, but baseModel.sha256 in the spec "
                      f"is {base.sha256}: refusing to train a different model than the one named")


def check_recorded_digest(uri: str, recorded: str | None, actual: str) -> None:
    """Refuse a base whose bytes changed since the run recorded their digest at its first
    start: checkpoints, baselines and the KL reference all assume one base."""
    if recorded and recorded != actual:
        raise Refused(f"base model {uri} has changed: its sha256 is now {actual}, but this run "
                      f"recorded sha256 {recorded} at its first start; the base is immutable, so "
                      "restore the original files or start a new run for the new base")


def model_source(base: BaseModelSpec, path: str) -> tuple[str, str | None]:
    """(directory to load from, GGUF file name in it or None) for a local base path."""
    if base.format == ModelFormat.gguf:
        p = Path(path)
        if not p.is_file():
            raise Refused(f"baseModel.uri {base.uri} must be a .gguf file for format gguf")
        return str(p.parent), p.name
    if not Path(path, "config.json").is_file():
        raise Refused(f"baseModel.uri {base.uri} is not a model directory (no config.json)")
    return path, None


def load_tokenizer(base: BaseModelSpec, tokenizer: TokenizerSpec | None = None,
                   base_path: str | None = None) -> PreTrainedTokenizerBase:
    """The tokenizer the run uses: `tokenizer.uri` when set, else the base's own."""
    if tokenizer is not None and tokenizer.uri:
        tok = AutoTokenizer.from_pretrained(local_copy(tokenizer.uri))
    else:
        directory, gguf = model_source(base, base_path or local_copy(base.uri))
        tok = AutoTokenizer.from_pretrained(directory, **({"gguf_file": gguf} if gguf else {}))
    if tok.eos_token is None:
        raise Refused("the tokenizer has no EOS token: packing needs one between documents")
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok


def attention_backend(requested: str, device: torch.device) -> str:
    """The kernel for `training.attention` on this device (see the spec for `auto`)."""
    if requested != "auto":
        return requested
    if device.type != "cuda":
        return "sdpa"
    import importlib.util

    return "flash_attention_2" if importlib.util.find_spec("flash_attn") else "flex_attention"


def load_model(directory: str, *, dtype: torch.dtype = torch.float32, attention: str = "sdpa",
               gguf_file: str | None = None) -> PreTrainedModel:
    extra = {"gguf_file": gguf_file} if gguf_file else {}
    model = AutoModelForCausalLM.from_pretrained(directory, dtype=dtype,
                                                 attn_implementation=attention, **extra)
    if gguf_file:
        # The GGUF tensors are dequantised on load: what we train and save is a plain model, but
        # transformers keeps the GGUF quantizer attached and would refuse save_pretrained.
        # torch types Module.__setattr__ for tensors and modules; any attribute may be set
        model.hf_quantizer = None  # type: ignore[assignment]
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
    # Training never uses a KV cache, and with one transformers would not derive the
    # per-document attention mask from packed position ids.
    model.config.use_cache = False
    return model


def skeleton(directory: str, *, attention: str = "sdpa",
             dtype: torch.dtype = torch.float32) -> PreTrainedModel:
    """The architecture in `directory/config.json` with its parameters on the meta device (no
    memory, no random init): the weights come later, straight into each rank's shards. Buffers
    (rotary frequencies) are real: `materialize` keeps them."""
    from accelerate import init_empty_weights

    config = AutoConfig.from_pretrained(directory)
    with init_empty_weights(include_buffers=False):
        # from_config is unannotated in transformers
        model: PreTrainedModel = AutoModelForCausalLM.from_config(  # type: ignore[no-untyped-call]
            config, dtype=dtype, attn_implementation=attention)
    model.tie_weights()  # built empty, the head is a separate tensor until tied
    model.config.use_cache = False
    return model


def is_meta(model: torch.nn.Module) -> bool:
    return any(p.is_meta for p in model.parameters())


def materialize(model: torch.nn.Module, device: torch.device | str) -> None:
    """Allocate a skeleton's tensors on `device` (uninitialised; a checkpoint load fills them)
    without losing the buffers its modules computed when they were built."""
    buffers = [(m, name, b.detach().clone()) for m in model.modules()
               for name, b in m._buffers.items() if b is not None and not b.is_meta]
    holders: dict[int, list[tuple[torch.nn.Module, str]]] = {}
    for m in model.modules():
        for name, p in m._parameters.items():
            if p is not None:
                holders.setdefault(id(p), []).append((m, name))
    model.to_empty(device=device)
    with torch.no_grad():
        for module, name, value in buffers:
            module._buffers[name].copy_(value)  # type: ignore[union-attr]
    # to_empty gives every holder of a tied parameter (embedding and head) its own tensor
    for (first, first_name), *others in holders.values():
        for module, name in others:
            module._parameters[name] = first._parameters[first_name]


def load_checkpoint_model(directory: str, *, attention: str = "sdpa",
                          dtype: torch.dtype = torch.float32) -> PreTrainedModel:
    """The whole model of a (verified, local) checkpoint directory in this one process: for
    tools and frozen copies; training ranks load only their shards (`Checkpointer.load_model`)."""
    import torch.distributed.checkpoint as dcp

    model = skeleton(directory, attention=attention, dtype=dtype)
    materialize(model, "cpu")
    # torch.distributed.checkpoint re-exports load without __all__ (no explicit export)
    dcp.load(model.state_dict(), checkpoint_id=os.path.join(directory, MODEL_DIR),  # type: ignore[attr-defined]
             no_dist=True)
    return model


def load_base(base: BaseModelSpec, tokenizer: TokenizerSpec | None = None, *,
              dtype: torch.dtype = torch.float32, attention: str = "sdpa",
              ) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """The base model and tokenizer named by the spec (the base is only read, never written)."""
    if base.format == ModelFormat.checkpoint:
        from .checkpoint import fetch, local_path

        problems, path = fetch(base.uri, (MODEL_DIR,)), local_path(base.uri)
        if problems:
            raise Refused(f"base checkpoint {base.uri} is not usable: {'; '.join(problems)}")
        return (load_checkpoint_model(path, attention=attention, dtype=dtype),
                load_tokenizer(base, tokenizer, path))
    path = local_copy(base.uri)
    if not os.path.exists(path):
        raise Refused(f"baseModel.uri {base.uri} does not exist")
    if base.sha256:
        check_digest(base, base_digest(base.uri))
    directory, gguf = model_source(base, path)
    model = load_model(directory, dtype=dtype, attention=attention, gguf_file=gguf)
    return model, load_tokenizer(base, tokenizer, path)
