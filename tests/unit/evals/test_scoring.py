"""The generation scoring rules on fixed strings (no model involved)."""
from __future__ import annotations

import pytest

from cpt_trainer.errors import Refused
from cpt_trainer.evals.scoring import (follows_format, has_json_object, keyword_refusal,
                                       load_classifier, rate)


@pytest.mark.parametrize("text, expected", [
    pytest.param('{"a": 1}', True, id="a bare object counts"),
    pytest.param('Sure! ```json\n{"name": "x", "tags": [1, 2]}\n``` done', True,
                 id="an object inside prose and a code fence counts"),
    pytest.param('{"a": } then {"b": null}', True, id="a later object counts after a broken one"),
    pytest.param('{"outer": {"inner": 1}', True, id="a complete inner object counts"),
    pytest.param("[1, 2, 3]", False, id="an array is not an object"),
    pytest.param('"just a string"', False, id="a scalar is not an object"),
    pytest.param('{"a": 1', False, id="an unclosed object does not count"),
    pytest.param("{'a': 1}", False, id="python dict syntax is not JSON"),
    pytest.param("", False, id="nothing is not an object"),
])
def test_json_validity(text: str, expected: bool) -> None:
    assert has_json_object(text) is expected


@pytest.mark.parametrize("text, pattern, expected", [
    pytest.param("YES, because", r"(YES|NO)\b", True, id="the format may be followed by more text"),
    pytest.param("  \nNO", r"(YES|NO)\b", True, id="leading whitespace is ignored"),
    pytest.param("I think YES", r"(YES|NO)\b", False, id="the format must come first"),
    pytest.param("YES, because", r"(YES|NO)\s*\Z", False, id="an end anchor demands nothing after"),
    pytest.param("1. a\n2. b", r"1\. .*\n2\. ", True, id="dot matches newlines"),
])
def test_format_following(text: str, pattern: str, expected: bool) -> None:
    assert follows_format(text, pattern) is expected


@pytest.mark.parametrize("text, expected", [
    pytest.param("I'm sorry, but I can't help with that.", True, id="a plain refusal"),
    pytest.param("I can\u2019t do that.", True, id="a typographic apostrophe"),
    pytest.param("As an AI, I must decline.", True, id="upper case"),
    pytest.param("Here is the recipe: mix flour and water.", False, id="an answer"),
    pytest.param("x" * 300 + " I cannot", False, id="a phrase far into the answer is incidental"),
])
def test_keyword_refusal(text: str, expected: bool) -> None:
    assert keyword_refusal(text) is expected


def test_classifier_defaults_to_keywords_and_loads_a_dotted_path() -> None:
    assert load_classifier(None) is keyword_refusal
    assert load_classifier("cpt_trainer.evals.scoring:keyword_refusal") is keyword_refusal


@pytest.mark.parametrize("path, message", [
    pytest.param("no_colon", "expected 'module:callable'", id="missing colon"),
    pytest.param("no_such_module_xyz:f", "cannot be loaded", id="unknown module"),
    pytest.param("cpt_trainer.evals.scoring:nope", "cannot be loaded", id="unknown attribute"),
    pytest.param("cpt_trainer.evals.scoring:REFUSAL_WINDOW", "not a callable", id="not callable"),
])
def test_bad_classifier_paths_are_refused(path: str, message: str) -> None:
    with pytest.raises(Refused, match=message):
        load_classifier(path)


def test_rate_is_the_share_of_true() -> None:
    assert rate([True, False, True, True]) == 0.75
