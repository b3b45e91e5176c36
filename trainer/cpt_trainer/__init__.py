"""cpt-trainer: the data plane (training loop, data, checkpoints, evals, metrics)."""
__version__ = "0.1.0"
