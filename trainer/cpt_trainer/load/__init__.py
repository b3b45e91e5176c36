"""Loading weights without ever holding a whole model on a rank (see `weights.py`)."""
