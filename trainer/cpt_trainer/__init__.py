"""cpt-trainer: the data plane (training loop, data, checkpoints, evals, metrics)."""
__version__ = "0.1.0"


def code_version(image: str | None = None) -> str:
    """What wrote a checkpoint: this package's version and, on a cluster, the image it ran in
    (a digest only when the image is referenced by one)."""
    return f"cpt-trainer {__version__}" + (f" in {image}" if image else "")
