"""Tokenizer surgery: domain terms become single tokens, with mean-initialised rows.

The rule for a new token. A term `u` is added in its running-text form: the one pre-token the
tokenizer's own normaliser and pre-tokeniser make of `u` after a space (`"a u"` minus `"a"`),
which is `Ġu` for byte-level BPE (GPT-2, Llama 3, Qwen, SmolLM) and `▁u` for a word-splitting
Metaspace. That string becomes an ordinary BPE vocabulary entry (not an added or special
token) and the BPE model maps a pre-token found whole in its vocabulary to that entry
(`ignore_merges`). So the new token replaces exactly the occurrences of `u` that
`fragmentation.py` counts (a word after a space, as running text uses it) and nothing else:
`sublicensable,` and `x sublicensable` use it; `sublicensablex`, `(sublicensable` and a line
that starts with the term keep their old pieces. Added tokens would not do: they are matched in
the raw text before pre-tokenisation, so `" license"` would also swallow the start of
`" licensed"`, and `single_word` rejects the leading space it needs.

`ignore_merges` changes nothing else only if every old vocabulary entry is also what the merges
make of it; that is checked (it holds for trained BPE vocabularies) and surgery refuses
otherwise. A term whose running form is several pre-tokens (`max-len`) cannot be one token:
named terms are refused, top-K candidates skipped. Terms that are already one token are
skipped.

Rows. Each new row of the input embedding is the mean of the OLD rows of the term's pieces
(the split the base tokenizer gave the running form); an untied output head gets the same for
its rows (and bias). A tied head stays tied: it is the same tensor. New ids follow the largest
id in use; a model with padded rows (more rows than ids) reuses its spare rows before growing.
Text without new terms keeps its ids and, right after surgery, its logits over the old vocab.

Identity. The extension is a pure function of the base tokenizer, `tokenizer.extend` and (for
top K) the domain sample, so a restore rebuilds the identical tokenizer and its hash matches
the checkpoint's. It is saved once as `<checkpointUri>/tokenizer-<hash12>/` (the tokenizer and
`extension.json`: terms, ids, pieces) beside the `step-*` directories; every checkpoint holds
the same files too. The weights record which extension their rows implement in
`config.cpt_tokenizer_extension`, so loading extended weights never applies the surgery twice.

Under-trained rows (shared/MISSION.md §6, failure story 2):
- Oversampling, by rejection: during the first `oversampleSteps` steps a drawn window with no
  new token is kept with probability 1/`oversampleFactor`, one with a new token always, so the
  latter are drawn `factor` times as often relative to the rest. Rejected windows are skipped
  data (the stream moves on). The coin is a function of (seed, rank, draw number) and the draw
  counters live in the data state, so a fullState resume continues exactly.
- Per-new-token loss and count seen (as a target), summed over ranks every step, exported to
  Prometheus and written into each checkpoint's metrics (`new_token.<term>.loss|seen` for the
  first `REPORTED` tokens plus `new_tokens.loss|seen|unseen` over all). The counters ride in the
  data state: fullState continues them, weightsOnly starts them anew with its data stream.
- An eval slice: the evaluation texts (held out and decontaminated by construction) that
  contain a new token, as `new_terms.perplexity`.
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
import numpy as np
import torch
from transformers import AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from cpt_operator.api.spec import RestoreMode, SourceRole, TokenizerExtensionSpec
from cpt_operator.api.trainer_config import TrainerConfig

from ..data import Batch
from ..data.tokenizer_hash import tokenizer_hash
from ..errors import Refused
from ..fragmentation import analyze

log = logging.getLogger(__name__)

CONFIG_KEY = "cpt_tokenizer_extension"
EXTENSION_FILE = "extension.json"
SAMPLE_BYTES = 64 << 20
"""Domain bytes read for top-K analysis (whole files, in listing order): frequent terms show up
long before that, and a restore has to read it again."""
REPORTED = 64
"""New tokens with their own keys in checkpoint metrics; the status of a run must stay small."""
_ANCHOR = "a"
IGNORE = -100


@dataclass(frozen=True)
class NewToken:
    term: str
    token: str
    """The vocabulary entry (the running-text form, e.g. `Ġterm`)."""
    id: int
    pieces: tuple[int, ...]
    """Ids of the base tokenizer's split of the running form (the rows averaged)."""


# ---------------------------------------------------------------------------- term selection

def running_form(tokenizer: PreTrainedTokenizerBase, term: str) -> str:
    """The single pre-token of `term` after a space; raises ValueError when there is none."""
    backend = tokenizer.backend_tokenizer
    if backend.pre_tokenizer is None:
        raise ValueError("the tokenizer has no pre-tokeniser, so it has no notion of a word")

    def pretokens(text: str) -> list[str]:
        if backend.normalizer is not None:
            text = backend.normalizer.normalize_str(text)
        return [p for p, _ in backend.pre_tokenizer.pre_tokenize_str(text)]

    anchor, pieces = pretokens(_ANCHOR), pretokens(f"{_ANCHOR} {term}")
    rest = pieces[len(anchor):]
    if pieces[:len(anchor)] != anchor or len(rest) != 1:
        raise ValueError(f"{term!r} is {len(rest)} pre-tokens {rest} in running text, not one")
    return rest[0]


def select_terms(spec: TokenizerExtensionSpec, tokenizer: PreTrainedTokenizerBase,
                 domain: Sequence[str] = (), general: Sequence[str] | None = None) -> list[str]:
    """Named terms in spec order, then the top K analysis candidates (largest saving first)
    that can become one token. Deterministic for the same tokenizer and sample."""
    vocab = tokenizer.get_vocab()
    chosen: list[str] = []
    for term in dict.fromkeys(spec.terms):
        try:
            form = running_form(tokenizer, term)
        except ValueError as exc:
            raise Refused(f"tokenizer.extend.terms: {exc}: it cannot become one token") from exc
        if form in vocab:
            log.info("term %r is already one token (%s)", term, form)
        else:
            chosen.append(term)
    if spec.top_k:
        report = analyze(tokenizer, domain, general, top=4 * spec.top_k,
                         max_terms=max(500, 8 * spec.top_k))
        picked = 0
        for cand in report.candidates:
            if picked == spec.top_k:
                break
            if cand.term in chosen or not _eligible(tokenizer, cand.term, vocab):
                continue
            chosen.append(cand.term)
            picked += 1
    return chosen


def _eligible(tokenizer: PreTrainedTokenizerBase, term: str, vocab: dict[str, int]) -> bool:
    try:
        return running_form(tokenizer, term) not in vocab
    except ValueError:
        return False


# --------------------------------------------------------------------------- the tokenizer

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


# ------------------------------------------------------------------------------- the model

def _tied(model: PreTrainedModel) -> bool:
    out = model.get_output_embeddings()
    return out is not None and out.weight is model.get_input_embeddings().weight


@torch.no_grad()
def mean_init(model: PreTrainedModel, tokens: Sequence[NewToken]) -> None:
    """Resize to hold the new ids and set each new row to the mean of its old piece rows."""
    if not tokens:
        return
    tied = _tied(model)
    old_in = model.get_input_embeddings().weight.detach().clone()
    head = model.get_output_embeddings()
    old_out = head.weight.detach().clone() if head is not None and not tied else None
    old_bias = head.bias.detach().clone() if old_out is not None and head.bias is not None else None
    rows = max(t.id for t in tokens) + 1
    if rows > old_in.shape[0]:
        model.resize_token_embeddings(rows, mean_resizing=False)
    weight = model.get_input_embeddings().weight
    head = model.get_output_embeddings()
    for t in tokens:
        pieces = torch.tensor(t.pieces, device=old_in.device)
        weight[t.id] = old_in[pieces].mean(0)
        if old_out is not None:
            head.weight[t.id] = old_out[pieces].mean(0)
            if old_bias is not None:
                head.bias[t.id] = old_bias[pieces].mean(0)
    if tied and not _tied(model):
        model.tie_weights()


# --------------------------------------------------------------------------- the extension

@dataclass
class Extension:
    spec: TokenizerExtensionSpec
    base_hash: str
    tokenizer: PreTrainedTokenizerBase
    tokens: list[NewToken]
    hash: str = ""
    ids: torch.Tensor = field(default_factory=lambda: torch.zeros(0, dtype=torch.long))
    _eval_docs: list[list[int]] | None = None

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
        """Give `model` the new rows unless its weights already carry this extension."""
        carried = getattr(model.config, CONFIG_KEY, None)
        if carried == self.hash:
            return model
        if carried is not None:
            raise Refused(f"the weights carry tokenizer extension {carried}, this run builds "
                          f"{self.hash}")
        mean_init(model, self.tokens)
        setattr(model.config, CONFIG_KEY, self.hash)
        return model

    def accepts(self, checkpoint_hash: str, mode: RestoreMode) -> bool:
        """A checkpoint trained before the extension may start it (its weights get the
        surgery), but only as a new experiment: its optimizer state has the old shapes."""
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

    # under-trained token care
    def oversample(self, data: Any, cfg: TrainerConfig, rank: int) -> NewTokenData:
        steps = self.spec.oversample_steps * cfg.spec.training.grad_accumulation
        return NewTokenData(data, self, factor=self.spec.oversample_factor, batches=steps,
                            seed=cfg.spec.data.seed, rank=rank)

    def eval_docs(self, evaluator: Any) -> list[list[int]]:
        from ..evals.perplexity import document_ids

        docs = document_ids(self.tokenizer, evaluator.texts())
        new = set(self.ids.tolist())
        return [d for d in docs if new.intersection(d)]

    def evaluate(self, model: torch.nn.Module, evaluator: Any) -> dict[str, float]:
        """`new_terms.perplexity` over the evaluation texts that hold a new token."""
        from ..evals.generation import unwrap
        from ..evals.perplexity import token_nll
        from ..evals.runtime import inference

        if self._eval_docs is None:
            self._eval_docs = self.eval_docs(evaluator)
            if not self._eval_docs:
                log.warning("no evaluation text contains a new token: new_terms is not measured")
        if not self._eval_docs:
            return {}
        model = unwrap(model)
        with inference(model, evaluator.device, evaluator.autocast_dtype):
            result = token_nll(model, self._eval_docs, seq_len=evaluator.seq_len,
                               device=evaluator.device, pad_id=int(self.tokenizer.pad_token_id))
        return {"new_terms.perplexity": result.perplexity}


def domain_sample(cfg: TrainerConfig) -> tuple[list[str], list[str]]:
    """(domain, replay) texts for the analysis: whole units (files, JSONL ranges, row groups)
    in listing order up to SAMPLE_BYTES read per role, with the data pipeline's own reader."""
    from ..data.report import CurationReport
    from ..data.sources import SourceReader

    out: dict[SourceRole, list[str]] = {SourceRole.domain: [], SourceRole.replay: []}
    for role, texts in out.items():
        budget = SAMPLE_BYTES
        for source in (s for s in cfg.spec.data.sources if s.role == role):
            reader = SourceReader(source, CurationReport())
            for unit in reader.units:
                if reader.bytes_read >= budget:
                    break
                texts.extend(d.text for d in reader.documents(unit))
            budget -= reader.bytes_read
    return out[SourceRole.domain], out[SourceRole.replay]


def build(cfg: TrainerConfig, tokenizer: PreTrainedTokenizerBase, *,
          is_main: bool = True) -> Extension | None:
    """The run's extension of `tokenizer`, or None without `tokenizer.extend`. Rank 0 picks
    the terms (top K reads the domain sample); `distributed.broadcast_object` hands them on."""
    from .. import distributed

    spec = cfg.spec.tokenizer.extend if cfg.spec.tokenizer else None
    if spec is None:
        return None
    terms = None
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
    return ext


# ------------------------------------------------------------------------ new-token data

class NewTokenData:
    """The data pipeline with oversampling of new-token windows and the new-token counters
    (see the module docstring); everything else is the pipeline's."""

    def __init__(self, pipeline: Any, ext: Extension, *, factor: float, batches: int, seed: int,
                 rank: int):
        self.pipeline, self.ext = pipeline, ext
        self.factor, self.batches, self.seed, self.rank = factor, batches, seed, rank
        self.drawn = 0
        """Micro-batches handed out (oversampling applies to the first `batches`)."""
        self.draws = 0
        """Windows drawn while oversampling (the coin's index)."""
        n = len(ext.tokens)
        self.seen = np.zeros(n, dtype=np.int64)
        self.window = np.zeros((2, n), dtype=np.float64)
        """Loss sum and count per new token since the last checkpoint."""
        self._local: torch.Tensor | None = None
        self._lookup: torch.Tensor | None = None

    def __getattr__(self, name: str) -> Any:
        return getattr(self.pipeline, name)

    def next_batch(self, batch_size: int) -> Batch:
        if self.drawn >= self.batches or self.factor <= 1.0:
            self.drawn += 1
            plain: Batch = self.pipeline.next_batch(batch_size)
            return plain
        kept: list[Batch] = []
        while len(kept) < batch_size:
            window = self.pipeline.next_batch(1)
            coin = np.random.default_rng([self.seed, self.rank, self.draws]).random()
            self.draws += 1
            if coin * self.factor < 1.0 or bool(torch.isin(window.input_ids, self.ext.ids).any()):
                kept.append(window)
        self.drawn += 1
        return _concat(kept)

    # counters
    def observe(self, batch: Batch, nll: torch.Tensor) -> None:
        """Add one micro-batch's per-token NLL [B, T-1] at new-token targets."""
        labels = batch.labels.to(nll.device)[:, 1:]
        if self._lookup is None or self._lookup.device != nll.device:
            size = int(self.ext.ids.max()) + 1 if len(self.ext.ids) else 1
            self._lookup = torch.full((size,), -1, dtype=torch.long, device=nll.device)
            self._lookup[self.ext.ids.to(nll.device)] = torch.arange(len(self.ext.ids),
                                                                     device=nll.device)
            self._local = torch.zeros(2, len(self.ext.ids), dtype=torch.float64, device=nll.device)
        assert self._local is not None
        sel = (labels >= 0) & (labels < self._lookup.numel())
        index = torch.full_like(labels, -1)
        index[sel] = self._lookup[labels[sel]]
        hit = index >= 0
        self._local[0].index_add_(0, index[hit], nll[hit].double())
        self._local[1].index_add_(0, index[hit], torch.ones_like(nll[hit], dtype=torch.float64))

    def end_step(self, metrics: Any) -> None:
        """Sum this step's counters over ranks (collective) and export them."""
        from .. import distributed

        if self._local is None:
            self._local = torch.zeros(2, len(self.ext.ids), dtype=torch.float64)
        distributed.all_reduce_sum(self._local)
        step = self._local.cpu().numpy().copy()  # .cpu() of a CPU tensor shares its memory
        self._local.zero_()
        self.window += step
        self.seen += step[1].astype(np.int64)
        for i, t in enumerate(self.ext.tokens):
            count = int(step[1, i])
            if count:
                metrics.new_token(t.term, loss=self.window[0, i] / self.window[1, i], seen=count)

    def checkpoint_metrics(self) -> dict[str, float]:
        """Metrics for the checkpoint being written; starts the next interval."""
        out: dict[str, float] = {}
        sums, counts = self.window
        for i, t in enumerate(self.ext.tokens[:REPORTED]):
            out[f"new_token.{t.term}.seen"] = float(self.seen[i])
            if counts[i]:
                out[f"new_token.{t.term}.loss"] = float(sums[i] / counts[i])
        out["new_tokens.seen"] = float(self.seen.sum())
        out["new_tokens.unseen"] = float((self.seen == 0).sum())
        if counts.sum():
            out["new_tokens.loss"] = float(sums.sum() / counts.sum())
        self.window[:] = 0
        return out

    # state
    def state_dict(self) -> dict[str, Any]:
        return {**self.pipeline.state_dict(),
                "newTokens": {"drawn": self.drawn, "draws": self.draws,
                              "seen": self.seen.tolist(), "window": self.window.tolist()}}

    def load_state_dicts(self, states: Sequence[dict[str, Any]]) -> None:
        """Every saved rank's state (see DataPipeline.load_state_dicts). On another world size
        the counters are rank 0's (they are summed over ranks every step) and the draw
        counters the largest, so no new rank reuses a coin."""
        if len(states) == self.pipeline.world_size:
            self.load_state_dict(states[self.pipeline.rank])
            return
        self.pipeline.load_state_dicts(states)
        mine = [s["newTokens"] for s in states if "newTokens" in s]
        if mine:
            self._load_counters({**mine[0], "drawn": max(int(m["drawn"]) for m in mine),
                                 "draws": max(int(m["draws"]) for m in mine)})

    def load_state_dict(self, state: dict[str, Any], *, strict: bool = True) -> None:
        self.pipeline.load_state_dict(state, strict=strict)
        if state.get("newTokens") is not None:
            self._load_counters(state["newTokens"])

    def _load_counters(self, mine: dict[str, Any]) -> None:
        self.drawn, self.draws = int(mine["drawn"]), int(mine["draws"])
        if len(mine["seen"]) == len(self.seen):
            self.seen = np.array(mine["seen"], dtype=np.int64)
            self.window = np.array(mine["window"], dtype=np.float64)


def _concat(batches: Sequence[Batch]) -> Batch:
    return Batch(input_ids=torch.cat([b.input_ids for b in batches]),
                 labels=torch.cat([b.labels for b in batches]),
                 position_ids=torch.cat([b.position_ids for b in batches]),
                 source_ids=torch.cat([b.source_ids for b in batches]),
                 num_tokens=sum(b.num_tokens for b in batches))


__all__ = ["Extension", "NewToken", "NewTokenData", "build", "extend_tokenizer", "mean_init",
           "running_form", "select_terms"]
