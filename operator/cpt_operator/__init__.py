"""cpt-operator: the control plane for continued-pretraining runs (no torch imports here)."""
__version__ = "0.1.0"
