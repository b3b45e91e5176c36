"""Evaluation suites run during training and at every checkpoint (see `evaluator.Evaluator`).

Metrics: perplexity / mean NLL on held-out text, json_valid and format_follow on greedy
generations, refusal_rate with a replaceable classifier, and kl_to_base (chat drift against the
base model). Each result is reported as `suite.metric`.
"""
from .data import EvalDataError
from .evaluator import Evaluator

__all__ = ["Evaluator", "EvalDataError"]
