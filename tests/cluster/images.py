"""The real node's images: OCI archives built by images.sh (buildah, no registry)."""

from __future__ import annotations

import subprocess
from dataclasses import dataclass
from pathlib import Path

from .cluster import ComponentError

IMAGES_SH = Path(__file__).resolve().parent / "images.sh"


@dataclass(frozen=True)
class Image:
    name: str
    ref: str  # what a pod spec's `image:` says
    archive: Path


def build_images(*names: str, timeout: float = 1800.0) -> dict[str, Image]:
    """Build (or find cached) the named images; name -> Image."""
    proc = subprocess.run(["bash", str(IMAGES_SH), *names], capture_output=True, text=True,
                          timeout=timeout)
    if proc.returncode != 0:
        raise ComponentError(f"images.sh {' '.join(names)} exited {proc.returncode}:\n"
                             + "\n".join(proc.stderr.splitlines()[-40:]))
    images = {}
    for line in proc.stdout.splitlines():
        name, ref, archive = line.split()
        images[name] = Image(name, ref, Path(archive))
    return images


def pause_archive() -> Path:
    return build_images("pause")["pause"].archive
