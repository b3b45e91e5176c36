"""`cptctl diagnose` on the real demo model (SmolLM2-135M-Instruct): CPT indicated for a language
the base barely knows, not for a domain it already models well, judged per byte.

German is the language: the German manual pages Debian's own packages install (apt, dpkg,
passwd, ...) against their English originals, the same texts in two languages, rendered with
groff as `man` shows them. The licence texts of /usr/share/common-licenses are the domain the
base already knows (among the most copied texts on the web).
"""
from __future__ import annotations

import gzip
import subprocess
from pathlib import Path

import pytest
import torch

from cpt_api.spec import BaseModelSpec
from cpt_trainer.diagnose import Thresholds, perplexity, recommend
from cpt_trainer.fragmentation import analyze
from cpt_trainer.model import load_base
from tests.integration.test_demo_judges import demo_base  # noqa: F401  (the fixture)

pytestmark = pytest.mark.slow

PAGES = 16
TOKENS = 2048
MAN = Path("/usr/share/man")


def render(page: Path) -> str:
    """A manual page as `man` shows it (UTF-8, no overstrike)."""
    source = gzip.decompress(page.read_bytes())
    return subprocess.run(["groff", "-k", "-man", "-Tutf8", "-P-c", "-P-b", "-P-u"], input=source,
                          capture_output=True, check=True).stdout.decode("utf-8", errors="replace")


@pytest.fixture(scope="module")
def manuals() -> tuple[list[str], list[str]]:
    """(German, English) renderings of the same pages."""
    pairs = [(de, MAN / de.parent.name / de.name) for de in sorted((MAN / "de").glob("man[1-8]/*.gz"))]
    pairs = [(de, en) for de, en in pairs if en.exists()][:PAGES]
    if len(pairs) < PAGES:
        pytest.skip(f"this machine has {len(pairs)} German manual pages with English originals in {MAN}, "
                    f"not {PAGES} (a system installed without them)")
    return [render(de) for de, _ in pairs], [render(en) for _, en in pairs]


def test_a_language_the_base_barely_knows_warrants_cpt_and_a_domain_it_knows_does_not(
        demo_base: Path, manuals: tuple[list[str], list[str]]) -> None:  # noqa: F811
    german, english = manuals
    licences = [p.read_text(errors="replace") for p in sorted(Path("/usr/share/common-licenses").glob("*"))
                if p.is_file()][:PAGES]
    model, tokenizer = load_base(BaseModelSpec(uri=str(demo_base), format="gguf"), None)
    cpu = torch.device("cpu")

    def score(texts: list[str]) -> dict[str, float]:
        return perplexity(model, tokenizer, texts, seq_len=256, max_tokens=TOKENS, device=cpu)

    de, en, legal = score(german), score(english), score(licences)
    th = Thresholds()
    language = recommend(de["bits_per_byte"], en["bits_per_byte"], analyze(tokenizer, german, english), th)
    known = recommend(legal["bits_per_byte"], en["bits_per_byte"], analyze(tokenizer, licences, english), th)
    figures = {name: {k: round(v, 3) for k, v in m.items()} for name, m in
               (("german", de), ("english", en), ("licences", legal))}
    print(figures, language, known)

    assert (language.verdict, language.decided_by) == ("cpt", "bits per byte"), (figures, language)
    assert known.verdict == "not-cpt", (figures, known)
    # a German word (many pieces, each easier) costs the base far more than an English one
    assert de["word_perplexity"] > 10 * en["word_perplexity"]
