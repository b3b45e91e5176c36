"""The new-terms evaluation slice: `new_terms.perplexity` over the evaluation texts (held out
and decontaminated by construction) that contain a new token. It tells whether the new rows
learnt their terms, which the run's other evaluations average away. It is measured the way the
evaluator measures perplexity (`Evaluator.nll`): over the ranks, each on its share."""
from __future__ import annotations

import logging
from typing import Any

import torch
from transformers import PreTrainedTokenizerBase

log = logging.getLogger(__name__)


class NewTermsEvaluation:
    def __init__(self, tokenizer: PreTrainedTokenizerBase, ids: torch.Tensor):
        self.tokenizer, self.ids = tokenizer, ids
        self._docs: list[list[int]] | None = None
        """The slice, cut once from the evaluator's texts on first use."""

    def docs(self, evaluator: Any) -> list[list[int]]:
        from ..evals.perplexity import document_ids

        docs = document_ids(self.tokenizer, evaluator.texts())
        new = set(self.ids.tolist())
        return [d for d in docs if new.intersection(d)]

    def __call__(self, model: torch.nn.Module, evaluator: Any) -> dict[str, float]:
        """A collective like the evaluator's own suites: every rank calls it, each measures its
        share of the slice and every rank returns the same value."""
        from ..evals.generation import unwrap
        from ..evals.runtime import inference

        if self._docs is None:
            self._docs = self.docs(evaluator)
            if not self._docs:
                log.warning("no evaluation text contains a new token: new_terms is not measured")
        if not self._docs:
            return {}
        model = unwrap(model)
        with inference(model, evaluator.device, evaluator.autocast_dtype):
            result = evaluator.nll(model, self._docs)
        return {"new_terms.perplexity": result.perplexity}


__all__ = ["NewTermsEvaluation"]
