"""Quality rules (datatrove's Gopher and FineWeb filters) per source, and the dropped-share limit."""
from __future__ import annotations

import random

import pytest

from cpt_api.spec import QualitySpec
from cpt_trainer.data.curation import JUDGED_AFTER, dropped_shares, starvation, starved_sources
from cpt_trainer.data.quality import RegexWords, check

PROSE = ("The package provides the tools that are needed to build and install the software, and it "
         "keeps a record of what was installed so that an upgrade can remove the files that have gone. "
         "Most of the work is done by the shell scripts of the build system, which read their settings "
         "from a file with one line for each option and the value to use.")
GERMAN = ("Das Programm liest die Einträge der Datei und gibt sie in der Reihenfolge aus, die mit der "
          "Option angegeben wurde. Wenn keine Datei angegeben ist, wird von der Standardeingabe gelesen, "
          "und die Ausgabe erfolgt auf die Standardausgabe, die mit einer Umleitung in eine Datei "
          "geschrieben werden kann.")
GERMAN_STOP_WORDS = ["der", "die", "das", "und", "ist", "nicht", "mit", "von", "zu", "ein"]


def junk(seed: int, chars: int = 600) -> str:
    """The random-symbol source of a broken curriculum."""
    rng = random.Random(seed)
    return "".join(rng.choice("qxzj#@%&*~^|<>}{ ") for _ in range(chars))


def test_random_symbols_fail_and_prose_passes_with_the_defaults() -> None:
    verdict = check(QualitySpec())
    assert verdict(PROSE) is None
    rule, reason = verdict(junk(0)) or ("", "")
    assert rule.startswith("gopher_") and "GopherQualityFilter" in reason


def test_another_language_needs_its_own_stop_words() -> None:
    spec = QualitySpec(min_words=20)
    assert check(spec)(GERMAN) == ("gopher_enough_stop_words", "GopherQualityFilter: gopher_enough_stop_words")
    assert check(spec.model_copy(update={"stop_words": GERMAN_STOP_WORDS}))(GERMAN) is None


def test_a_null_threshold_turns_its_rule_off() -> None:
    short = "Install the package and run it with the options of the manual."
    assert check(QualitySpec())(short)[0] == "gopher_short_doc"  # type: ignore[index]
    assert check(QualitySpec(min_words=None))(short) is None


def test_fineweb_rules_run_only_when_asked() -> None:
    listing = "\n".join(f"item {i} of the list with the words" for i in range(60))
    spec = QualitySpec(min_stop_words=None)
    assert check(spec)(listing) is None
    assert check(spec.model_copy(update={"fineweb": True}))(listing)[0] == "line_punct_ratio"  # type: ignore[index]


def test_words_are_letter_runs_and_symbol_runs() -> None:
    assert RegexWords().word_tokenize("Don't drop x-ray, Übersetzung!? #@%") == \
        ["Don't", "drop", "x-ray", ",", "Übersetzung", "!?", "#@%"]


@pytest.mark.parametrize("read,kept,starved", [
    ({"junk": 100, "good": 100}, {"junk": 5, "good": 99}, {"junk": pytest.approx(0.95)}),
    ({"junk": 100}, {"junk": 10}, {}),  # exactly at the limit: kept
    ({"junk": JUDGED_AFTER - 1}, {"junk": 0}, {}),  # too few read to judge
    ({"junk": JUDGED_AFTER}, {}, {"junk": 1.0}),  # nothing kept at all
])
def test_a_source_is_starved_when_more_than_the_limit_is_dropped(read, kept, starved) -> None:
    assert starved_sources(read, kept, 0.9) == starved


def test_the_refusal_names_each_starved_source_its_share_and_top_rules() -> None:
    read, kept = {"web": 40.0, "legal": 100.0}, {"web": 2.0, "legal": 99.0}
    assert dropped_shares(read, kept) == {"web": pytest.approx(0.95), "legal": pytest.approx(0.01)}
    message = starvation(read, kept, 0.9, {"web": {"gopher_short_doc": 3, "gopher_below_avg_threshold": 35}})
    assert message.startswith("source 'web': curation dropped 95% of 40 documents read "
                              "(most by: gopher_below_avg_threshold 35, gopher_short_doc 3)")
    assert "legal" not in message and "maxDroppedShare 90%" in message

