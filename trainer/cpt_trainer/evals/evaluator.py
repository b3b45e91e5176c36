"""The evaluator the training loop calls: every suite of the spec, one `suite.metric` each.

Samples are read, checked and tokenised once, when the evaluator is built (a broken suite stops
the run before the first step, not at the first evaluation); `evaluate` then only runs the model.
The drift suites' base responses are generated once, on first use, from the reference model.

Under torchrun every rank calls `evaluate` (it is a collective) and every rank returns the same
results. Each rank runs the model on its share of each suite (`sharing.py`: rank-strided, in
lock step where the model is sharded) and the shares are combined (`collective.py`): NLL and KL
by their sums and counts, generation suites by per-sample verdicts gathered in sample order.
The base responses of drift suites are generated the same way, once, and kept on every rank.
"""
from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Sequence

import torch
from transformers import PreTrainedTokenizerBase

from cpt_api.evaluation import TEXT_METRICS, EvaluationSpec, Metric, SuiteSpec
from cpt_api.metrics import metric_key

from ..errors import Refused
from .collective import in_order, share_of, summed
from .benchmark import Benchmark
from .code import pass_at, passes
from .data import Sample, load_samples, suite_digest
from .drift import kl_sum
from .generation import decode, greedy, prompt_rows, sampled, unwrap
from .perplexity import NllResult, document_ids, token_nll
from .runtime import inference
from .scoring import follows_format, has_json_object, load_classifier, rate
from .sharing import Share


class Evaluator:
    def __init__(self, spec: EvaluationSpec, tokenizer: PreTrainedTokenizerBase, *,
                 device: torch.device, seq_len: int, autocast_dtype: torch.dtype | None = None,
                 reference: torch.nn.Module | None = None):
        if spec.needs_reference and reference is None:
            raise Refused("a kl_to_base evaluation suite needs the base model as reference")
        self.spec, self.tokenizer, self.device = spec, tokenizer, device
        self.seq_len, self.autocast_dtype, self.reference = seq_len, autocast_dtype, reference
        self.samples: dict[str, list[Sample]] = {s.name: load_samples(s) for s in spec.suites
                                                 if s.benchmark is None}
        self._benchmarks = {s.name: Benchmark(s) for s in spec.suites if s.benchmark is not None}
        self.digests = {s.name: self._benchmarks[s.name].digest() if s.benchmark else
                        suite_digest(s, self.samples[s.name]) for s in spec.suites}
        """Suite name -> what exactly it measures (`suite_digest`, `Benchmark.digest`), for lineage."""
        self.stderr: dict[str, float] = {}
        """Benchmark suite -> the standard error of its latest value (reported beside it)."""
        self._classifiers: dict[str, Callable[[str], bool]] = {
            s.name: load_classifier(s.refusal_classifier)
            for s in spec.suites if s.metric == Metric.refusal_rate}
        self._docs = {s.name: document_ids(tokenizer, [x.text for x in self.samples[s.name]],
                                           predict_first=s.metric == Metric.bits_per_byte)
                      for s in spec.suites if s.metric in TEXT_METRICS}
        self._bytes = {s.name: sum(len(x.text.encode("utf-8")) for x in self.samples[s.name])
                       for s in spec.suites if s.metric == Metric.bits_per_byte}
        self._prompts = {s.name: prompt_rows(tokenizer, [x.text for x in self.samples[s.name]],
                                             seq_len=seq_len, max_new_tokens=s.max_new_tokens)
                         for s in spec.suites if s.metric not in TEXT_METRICS and s.benchmark is None}
        self._drift_rows: dict[str, list[tuple[list[int], int]]] = {}
        self.last_generations: dict[str, list[str]] = {}
        """Decoded outputs of the latest `evaluate`, per generation suite (for logs and
        debugging a surprising rate)."""

    def texts(self) -> list[str]:
        """Every evaluation text, prompt and given response (training data is decontaminated
        against these)."""
        out = []
        for suite in self.spec.suites:
            for sample in self.samples.get(suite.name, []):
                out.append(sample.text)
                if sample.response:
                    out.append(sample.response)
                if sample.test:  # a code suite's tests hold its answers
                    out.append(sample.test)
        return out

    def evaluate(self, model: torch.nn.Module) -> dict[str, float]:
        """Every suite's metric; a collective under torchrun (every rank calls it and gets the
        same results)."""
        # The bare module: a DDP wrapper's forward would add collectives of its own.
        model = unwrap(model)
        with contextlib.ExitStack() as stack:
            stack.enter_context(inference(model, self.device, self.autocast_dtype))
            if self.reference is not None:
                stack.enter_context(inference(self.reference, self.device, self.autocast_dtype))
            results = {metric_key(s): self._suite(s, model) for s in self.spec.suites}
        results.update({f"{metric_key(s)}_stderr": self.stderr[s.name] for s in self.spec.suites
                        if s.name in self.stderr})
        return results

    def nll(self, model: torch.nn.Module, docs: Sequence[Sequence[int]]) -> NllResult:
        """The NLL of `docs` over all ranks' shares (a collective); call inside `inference`."""
        part = token_nll(model, docs, seq_len=self.seq_len, device=self.device,
                         pad_id=self._pad_id(), share=share_of(model))
        nll_sum, tokens = summed([part.nll_sum, part.tokens])
        return NllResult(nll_sum, int(tokens))

    def _suite(self, suite: SuiteSpec, model: torch.nn.Module) -> float:
        if suite.benchmark is not None:
            value, self.stderr[suite.name] = self._benchmarks[suite.name].run(
                model, self.tokenizer, seq_len=self.seq_len, device=self.device)
            return value
        if suite.metric in TEXT_METRICS:
            result = self.nll(model, self._docs[suite.name])
            if suite.metric == Metric.bits_per_byte:
                return result.nll_sum / math.log(2) / max(self._bytes[suite.name], 1)
            return result.perplexity if suite.metric == Metric.perplexity else result.nll
        if suite.metric == Metric.kl_to_base:
            return self._kl(suite, model)
        samples = self.samples[suite.name]
        share = share_of(model)
        if suite.code is not None and suite.code.samples > 1:
            return self._sampled_code(suite, model, share)
        outputs = self._generate(model, self._prompts[suite.name], suite.max_new_tokens, share)
        texts = [decode(self.tokenizer, ids) for ids in outputs]
        scored = in_order(list(zip(texts, self._score(suite, texts, share.take(samples)))))
        self.last_generations[suite.name] = [text for text, _ in scored]
        return rate([verdict for _, verdict in scored])

    def _sampled_code(self, suite: SuiteSpec, model: torch.nn.Module, share: Share) -> float:
        """pass@1 or pass@k from `code.samples` sampled completions of each problem: each rank
        samples and runs its share of the problems; the counts of passing programs are gathered."""
        code = suite.code
        assert code is not None
        mine = sampled(model, self.tokenizer, self._prompts[suite.name], n=code.samples,
                       temperature=code.temperature, top_p=code.top_p, seed=code.seed,
                       max_new_tokens=suite.max_new_tokens, device=self.device, share=share)
        problems = share.take(self.samples[suite.name])
        correct = [sum(passes(problem, decode(self.tokenizer, ids), code) for ids in completions)
                   for problem, completions in zip(problems, mine)]
        k = code.k if suite.metric == Metric.pass_at_k else 1
        return pass_at(in_order(correct), code.samples, k)

    def _kl(self, suite: SuiteSpec, model: torch.nn.Module) -> float:
        reference = self._reference()
        part = kl_sum(model, reference, self._drift(suite), seq_len=self.seq_len,
                      device=self.device, pad_id=self._pad_id(), share=share_of(model, reference))
        total, count = summed(part)
        return total / count if count else math.nan

    def _score(self, suite: SuiteSpec, outputs: list[str], samples: list[Sample]) -> list[bool]:
        if suite.code is not None:  # each rank runs the programs of its own share
            return [passes(s, t, suite.code) for t, s in zip(outputs, samples)]
        if suite.metric == Metric.json_valid:
            return [has_json_object(t) for t in outputs]
        if suite.metric == Metric.format_follow:
            return [follows_format(t, s.pattern or "") for t, s in zip(outputs, samples)]
        classify = self._classifiers[suite.name]
        return [bool(classify(t)) for t in outputs]

    def _drift(self, suite: SuiteSpec) -> list[tuple[list[int], int]]:
        """(prompt + response ids, prompt length) per sample; base responses generated once."""
        if suite.name not in self._drift_rows:
            samples, prompts = self.samples[suite.name], self._prompts[suite.name]
            missing = [i for i, s in enumerate(samples) if not s.response]
            reference = self._reference()
            mine = self._generate(reference, [prompts[i] for i in missing], suite.max_new_tokens,
                                  share_of(reference))
            generated = dict(zip(missing, in_order(mine)))
            rows = []
            for i, (sample, prompt) in enumerate(zip(samples, prompts)):
                response = generated.get(i) or self._encode(sample.response or "")
                ids = (prompt + response)[-self.seq_len:]
                rows.append((ids, max(1, len(ids) - len(response))))
            self._drift_rows[suite.name] = rows
        return self._drift_rows[suite.name]

    def _generate(self, model: torch.nn.Module, rows: list[list[int]], max_new_tokens: int,
                  share: Share) -> list[list[int]]:
        """Outputs for this rank's share of `rows`."""
        return greedy(model, self.tokenizer, rows, max_new_tokens=max_new_tokens,
                      device=self.device, seq_len=self.seq_len, share=share)

    def _encode(self, text: str) -> list[int]:
        return list(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def _reference(self) -> torch.nn.Module:
        assert self.reference is not None  # guaranteed by __init__ for drift suites
        return self.reference

    def _pad_id(self) -> int:
        tok = self.tokenizer
        pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
        return int(pad or 0)
