"""Tokenizer extension: domain terms become single tokens, with mean-initialised rows.

- `terms.py`: which terms, and the running-text form each one is added in;
- `tokenizer.py`: the extended tokenizer, its hash, and what weights and checkpoints carry it;
- `rows.py`: the new embedding rows, the mean of the pieces they replace;
- `data.py`: oversampling of new-token windows and per-new-token loss counters;
- `evaluation.py`: `new_terms.perplexity` over the evaluation texts with a new token;
- `hook.py`: all of it as the training loop's `RunHook`.
"""
from .data import NewTokenData
from .evaluation import NewTermsEvaluation
from .hook import ExtensionHook, build_hook
from .rows import mean_init
from .terms import running_form, select_terms
from .tokenizer import CONFIG_KEY, Extension, NewToken, build, extend_tokenizer

__all__ = ["CONFIG_KEY", "Extension", "ExtensionHook", "NewTermsEvaluation", "NewToken",
           "NewTokenData", "build", "build_hook", "extend_tokenizer", "mean_init", "running_form",
           "select_terms"]
