"""Tokenizer extension: domain terms become single tokens (see `tokenizer.py`)."""
from .tokenizer import (CONFIG_KEY, Extension, NewToken, NewTokenData, build, extend_tokenizer,
                        mean_init, running_form, select_terms)

__all__ = ["CONFIG_KEY", "Extension", "NewToken", "NewTokenData", "build", "extend_tokenizer",
           "mean_init", "running_form", "select_terms"]
