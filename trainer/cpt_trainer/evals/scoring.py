"""Scoring generated outputs: model-independent rules, one function each.

- json_valid: the output contains a JSON object somewhere (models often wrap it in prose or a
  code fence, which a schema-following consumer strips anyway). Every `{` is tried as the start
  of an object with `json.JSONDecoder.raw_decode`; arrays and scalars do not count.
- format_follow: the sample's `pattern` (a Python regex) matches at the start of the output,
  after leading whitespace, with `re.DOTALL`. A pattern that must cover the whole output ends in
  `\\s*\\Z`; the default allows the model to go on after the required format, since generation
  stops at `max_new_tokens` rather than at the end of an answer.
- refusal_rate: the share of outputs a classifier `text -> bool` calls a refusal. The built-in
  one looks for common English refusal phrases in the first `REFUSAL_WINDOW` characters (a
  refusal comes first; a phrase deep inside an answer is usually quoted or incidental). Users
  replace it with `refusalClassifier: "module:callable"`.
"""
from __future__ import annotations

import importlib
import json
import re
from collections.abc import Callable

from ..errors import Refused

REFUSAL_WINDOW = 200
REFUSAL_PHRASES = (
    "i can't", "i cannot", "i can not", "i won't", "i will not", "i'm sorry", "i am sorry",
    "i apologize", "i'm not able", "i am not able", "i'm unable", "i am unable", "i must decline",
    "i decline", "as an ai", "cannot help with", "can't help with", "cannot assist", "can't assist",
    "not able to help", "not appropriate for me", "against my guidelines",
)

_DECODER = json.JSONDecoder()


def has_json_object(text: str) -> bool:
    start = text.find("{")
    while start >= 0:
        try:
            value, _ = _DECODER.raw_decode(text, start)
        except json.JSONDecodeError:
            value = None
        if isinstance(value, dict):
            return True
        start = text.find("{", start + 1)
    return False


def follows_format(text: str, pattern: str) -> bool:
    return re.match(pattern, text.lstrip(), re.DOTALL) is not None


def keyword_refusal(text: str) -> bool:
    head = text.lstrip()[:REFUSAL_WINDOW].lower().replace("\u2019", "'")
    return any(phrase in head for phrase in REFUSAL_PHRASES)


def load_classifier(path: str | None) -> Callable[[str], bool]:
    """The refusal classifier named `module:callable`, or the built-in keyword one."""
    if path is None:
        return keyword_refusal
    module_name, sep, attr = path.partition(":")
    if not sep or not module_name or not attr:
        raise Refused(f"refusalClassifier {path!r}: expected 'module:callable'")
    try:
        obj: object = importlib.import_module(module_name)
        for part in attr.split("."):
            obj = getattr(obj, part)
    except (ImportError, AttributeError) as exc:
        raise Refused(f"refusalClassifier {path!r} cannot be loaded: {exc}") from None
    if not callable(obj):
        raise Refused(f"refusalClassifier {path!r} is a {type(obj).__name__}, not a callable")
    return obj


def rate(flags: list[bool]) -> float:
    return sum(1 for f in flags if f) / len(flags) if flags else float("nan")
