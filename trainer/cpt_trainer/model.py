"""Loading the starting weights: an HF model directory, a GGUF file, or one of our checkpoints.

Remote URIs (any fsspec URL) are copied into a local cache first, because transformers loads
from local files; the base itself is only ever read. Every load is checked against the spec's
`baseModel.sha256` when one is given, so a run never silently trains another model.

The base digest is the sha256 of the file (GGUF) or, for a directory, the sha256 over the
sorted `name:sha256` lines of its files: stable across copies, sensitive to any byte.
"""
from __future__ import annotations

import hashlib
import logging
import os
from pathlib import Path

import fsspec
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from cpt_operator.api.spec import BaseModelSpec, ModelFormat, TokenizerSpec

from .errors import Refused

log = logging.getLogger(__name__)

_CHUNK = 8 << 20


def cache_root() -> Path:
    return Path(os.environ.get("CPT_CACHE_DIR", Path.home() / ".cache" / "cpt-operator")) / "remote"


def local_copy(uri: str) -> str:
    """A local path holding `uri` (itself when it is already local)."""
    fs, path = fsspec.core.url_to_fs(uri)
    protocols = fs.protocol if isinstance(fs.protocol, tuple) else (fs.protocol,)
    if "file" in protocols or "local" in protocols:
        return path
    target = cache_root() / hashlib.sha256(uri.encode()).hexdigest()[:16] / Path(path).name
    done = target.with_name(target.name + ".complete")
    if not done.exists():
        log.info("copying %s to %s", uri, target)
        target.parent.mkdir(parents=True, exist_ok=True)
        fs.get(path, str(target), recursive=fs.isdir(path))
        done.touch()
    return str(target)


def _file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def digest(path: str) -> str:
    p = Path(path)
    if p.is_file():
        return _file_sha256(p)
    lines = [f"{f.relative_to(p).as_posix()}:{_file_sha256(f)}"
             for f in sorted(p.rglob("*")) if f.is_file()]
    return hashlib.sha256("\n".join(lines).encode()).hexdigest()


def check_digest(base: BaseModelSpec, actual: str) -> None:
    """Refuse a base whose bytes differ from the spec's sha256."""
    if base.sha256 and base.sha256 != actual:
        raise Refused(f"base model {base.uri} has sha256 {actual}, but baseModel.sha256 in the spec "
                      f"is {base.sha256}: refusing to train a different model than the one named")


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


def load_model(directory: str, *, dtype: torch.dtype = torch.float32, attention: str = "sdpa",
               gguf_file: str | None = None) -> PreTrainedModel:
    extra = {"gguf_file": gguf_file} if gguf_file else {}
    model = AutoModelForCausalLM.from_pretrained(directory, dtype=dtype,
                                                 attn_implementation=attention, **extra)
    if gguf_file:
        # The GGUF tensors are dequantised on load: what we train and save is a plain model, but
        # transformers keeps the GGUF quantizer attached and would refuse save_pretrained.
        model.hf_quantizer = None
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
    # Training never uses a KV cache, and with one transformers would not derive the
    # per-document attention mask from packed position ids.
    model.config.use_cache = False
    return model


def load_base(base: BaseModelSpec, tokenizer: TokenizerSpec | None = None, *,
              dtype: torch.dtype = torch.float32, attention: str = "sdpa",
              ) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """The base model and tokenizer named by the spec (the base is only read, never written)."""
    path = local_copy(base.uri)
    if not os.path.exists(path):
        raise Refused(f"baseModel.uri {base.uri} does not exist")
    if base.sha256:
        check_digest(base, digest(path))
    if base.format == ModelFormat.checkpoint:
        from .checkpoint import problems_of

        _, problems = problems_of(path)
        if problems:
            raise Refused(f"base checkpoint {base.uri} is not usable: {'; '.join(problems)}")
    directory, gguf = model_source(base, path)
    model = load_model(directory, dtype=dtype, attention=attention, gguf_file=gguf)
    return model, load_tokenizer(base, tokenizer, path)
