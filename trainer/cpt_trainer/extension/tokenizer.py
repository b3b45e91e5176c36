"""The extended tokenizer and its identity: one vocabulary entry per term, and a hash.

Each term's running form (`terms.py`) becomes an ordinary BPE vocabulary entry (not an added
or special token) and the BPE model maps a pre-token found whole in its vocabulary to that
entry (`ignore_merges`). `ignore_merges` changes nothing else only if every old vocabulary
entry is also what the merges make of it; that is checked (it holds for trained BPE
vocabularies) and the extension refuses otherwise.

Identity. The extension is a pure function of the base tokenizer, `tokenizer.extend` and (for
top K) the domain sample, so a restore rebuilds the identical tokenizer and its hash matches
the checkpoint's. It is saved once as `<checkpointUri>/tokenizer-<hash12>/` (the tokenizer and
`extension.json`: terms, ids, pieces) beside the `step-*` directories; every checkpoint holds
the same files too. The weights record which extension their rows implement in
`config.cpt_tokenizer_extension`, so loading extended weights never fits the rows twice.
"""
from __future__ import annotations

import json
import logging
import os
import posixpath
import tempfile
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import fsspec
import torch
from transformers import AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from cpt_api.spec import RestoreMode, TokenizerExtensionSpec
from cpt_api.trainer_config import TrainerConfig

from .. import distributed
from ..data.tokenizer_hash import tokenizer_hash
from ..errors import Refused
from .rows import fill_rows, grow, grown_names
from .terms import domain_sample, running_form, select_terms

log = logging.getLogger(__name__)

CONFIG_KEY = "cpt_tokenizer_extension"
EXTENSION_FILE = "extension.json"


@dataclass(frozen=True)
class NewToken:
    term: str
    token: str
    """The vocabulary entry (the running-text form, e.g. `Ġterm`)."""
    id: int
    pieces: tuple[int, ...]
    """Ids of the base tokenizer's split of the running form (the rows averaged)."""


def _check_merges_reproduce_vocab(model: dict[str, Any], added: set[str], backend: Any) -> None:
    """ignore_merges must not change any old word's tokens (see the module docstring)."""
    if model.get("ignore_merges"):
        return
    odd = [t for t in model["vocab"] if t not in added
           and [x.value for x in backend.model.tokenize(t)] != [t]]
    if odd:
        raise Refused(f"tokenizer extension needs every vocabulary entry to be what the BPE "
                      f"merges make of it; {len(odd)} are not (e.g. {odd[:5]}), so mapping whole "
                      "words to new entries would change how other text tokenises")


def extend_tokenizer(tokenizer: PreTrainedTokenizerBase, terms: Sequence[str],
                     directory: str) -> tuple[PreTrainedTokenizerBase, list[NewToken]]:
    """The base tokenizer plus one vocabulary entry per term, saved to and loaded from
    `directory` (so the tokenizer in memory is the one a later process loads)."""
    backend = tokenizer.backend_tokenizer
    doc = json.loads(backend.to_str())
    model = doc["model"]
    if model.get("type") != "BPE":
        raise Refused(f"tokenizer extension supports BPE tokenizers; this one is {model.get('type')}")
    _check_merges_reproduce_vocab(model, {t["content"] for t in doc["added_tokens"]}, backend)
    next_id = max(tokenizer.get_vocab().values()) + 1
    new: list[NewToken] = []
    for term in terms:
        form = running_form(tokenizer, term)
        pieces = tuple(t.id for t in backend.model.tokenize(form))
        new.append(NewToken(term, form, next_id + len(new), pieces))
        model["vocab"][form] = new[-1].id
    model["ignore_merges"] = True
    tokenizer.save_pretrained(directory)
    with open(os.path.join(directory, "tokenizer.json"), "w", encoding="utf-8") as f:
        json.dump(doc, f, ensure_ascii=False)
    extended = AutoTokenizer.from_pretrained(directory)
    if extended.pad_token is None:
        extended.pad_token = extended.eos_token
    return extended, new


@dataclass
class Extension:
    """The extended tokenizer, its new tokens and hash, and how weights and checkpoints made
    with or without it are told apart."""

    spec: TokenizerExtensionSpec
    base_hash: str
    tokenizer: PreTrainedTokenizerBase
    tokens: list[NewToken]
    hash: str = ""
    ids: torch.Tensor = field(default_factory=lambda: torch.zeros(0, dtype=torch.long))

    def __post_init__(self) -> None:
        self.hash = tokenizer_hash(self.tokenizer)
        self.ids = torch.tensor([t.id for t in self.tokens], dtype=torch.long)

    def describe(self, base: str) -> str:
        return (f"{base} extended with {len(self.tokens)} terms by tokenizer.extend (base "
                f"tokenizer hash {self.base_hash})")

    def carried_by(self, model: PreTrainedModel) -> bool:
        """The weights (or a skeleton's config) already have this extension's rows."""
        return getattr(model.config, CONFIG_KEY, None) == self.hash

    def fit(self, model: PreTrainedModel) -> PreTrainedModel:
        """Give a whole `model` the new rows unless its weights already carry this extension."""
        if self.grow(model):
            fill_rows(model, self.tokens)
        return model

    def grow(self, model: PreTrainedModel) -> list[str]:
        """Make room for the new rows (a skeleton is fine) unless the weights carry this
        extension; returns the names of the tensors that grew (`fill_rows` must follow once
        the old rows are loaded), empty when nothing is to fill."""
        carried = getattr(model.config, CONFIG_KEY, None)
        if carried == self.hash:
            return []
        if carried is not None:
            raise Refused(f"the weights carry tokenizer extension {carried}, this run builds "
                          f"{self.hash}")
        grow(model, self.tokens)
        setattr(model.config, CONFIG_KEY, self.hash)
        return grown_names(model)

    def fill_rows(self, model: PreTrainedModel) -> None:
        """The new rows' mean initialisation, on every rank (a collective when sharded)."""
        fill_rows(model, self.tokens)

    def accepts(self, checkpoint_hash: str, mode: RestoreMode) -> bool:
        """A checkpoint trained before the extension may start it (its weights get the
        new rows), but only as a new experiment: its optimizer state has the old shapes."""
        if checkpoint_hash != self.base_hash:
            return checkpoint_hash == self.hash
        if mode == RestoreMode.full_state:
            raise Refused("fullState restore of a checkpoint trained with the base tokenizer "
                          f"({self.base_hash}) into a run that extends it: its optimizer state "
                          "has the old vocabulary's shapes; use restoreMode weightsOnly")
        return True

    def record(self) -> dict[str, Any]:
        return {"hash": self.hash, "baseTokenizerHash": self.base_hash,
                "spec": self.spec.model_dump(by_alias=True),
                "tokens": [asdict(t) for t in self.tokens]}

    def save(self, checkpoint_uri: str) -> str:
        """`<checkpoint_uri>/tokenizer-<hash12>/` (once: the content is fixed by the hash)."""
        target = posixpath.join(checkpoint_uri.rstrip("/"), f"tokenizer-{self.hash[:12]}")
        fs, path = fsspec.core.url_to_fs(target)
        if fs.exists(f"{path}/{EXTENSION_FILE}"):
            return target
        with tempfile.TemporaryDirectory(prefix="cpt-tok-") as tmp:
            self.tokenizer.save_pretrained(tmp)
            with open(os.path.join(tmp, EXTENSION_FILE), "w", encoding="utf-8") as f:
                json.dump(self.record(), f, indent=1, ensure_ascii=False)
            fs.makedirs(path, exist_ok=True)
            names = sorted(os.listdir(tmp), key=lambda n: n == EXTENSION_FILE)  # marker last
            for name in names:
                fs.put_file(os.path.join(tmp, name), f"{path}/{name}")
        return target


def build(cfg: TrainerConfig, tokenizer: PreTrainedTokenizerBase, *,
          is_main: bool = True) -> Extension | None:
    """The run's extension of `tokenizer`, or None without `tokenizer.extend`. Rank 0 picks
    the terms (top K reads the domain sample); `distributed.broadcast_object` hands them on."""
    spec = cfg.spec.tokenizer.extend if cfg.spec.tokenizer else None
    if spec is None:
        return None
    terms = None
    domain: list[str] = []
    if is_main:
        domain, general = domain_sample(cfg) if spec.top_k else ([], [])
        terms = select_terms(spec, tokenizer, domain, general or None)
    shared = distributed.broadcast_object(terms)
    assert isinstance(shared, list)
    terms = shared
    with tempfile.TemporaryDirectory(prefix="cpt-tok-") as tmp:
        extended, tokens = extend_tokenizer(tokenizer, terms, tmp)
    ext = Extension(spec, tokenizer_hash(tokenizer), extended, tokens)
    log.info("tokenizer extended with %d terms: %s", len(tokens), ", ".join(terms[:20]))
    if domain:
        before, after = (sum(len(ids) for ids in tok(domain, add_special_tokens=False)["input_ids"])
                         for tok in (tokenizer, extended))
        log.info("the new terms cut the domain sample from %d to %d tokens (%.1f%% fewer)",
                 before, after, 100 * (before - after) / max(before, 1))
    return ext


__all__ = ["CONFIG_KEY", "EXTENSION_FILE", "Extension", "NewToken", "build", "extend_tokenizer"]
