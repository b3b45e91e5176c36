"""`python -m cpt_trainer --config trainer-config.json [--evaluate TARGET]` (what torchrun starts on
every rank: an attempt, or the separate evaluation of one checkpoint)."""
from __future__ import annotations

import argparse
import logging
import os
import sys

from cpt_api.trainer_config import TrainerConfig

from .hostmem import fix_mmap_threshold
from .lifetime import die_with_parent


def main(argv: list[str] | None = None) -> int:
    if "TORCHELASTIC_RUN_ID" in os.environ:
        # torchrun starts each worker in a session of its own, so a SIGKILL of the launcher's
        # process group (a local stop past its grace; a pod's PID 1 on a runtime without a PID
        # namespace) would leave the workers training on, beside the next attempt, into the
        # same checkpoint root. In a container the PID namespace takes them anyway.
        die_with_parent()
    parser = argparse.ArgumentParser(prog="cpt_trainer", description=__doc__)
    parser.add_argument("--config", required=True, help="resolved trainer config (JSON)")
    parser.add_argument("--evaluate", metavar="TARGET",
                        help="evaluate `base` or checkpoint TARGET (step-XXXXXXXX) of the config's "
                             "attempt folder instead of training (evaluation.placement: separate)")
    args = parser.parse_args(argv)
    rank = os.environ.get("RANK", "0")
    logging.basicConfig(level=logging.INFO if rank == "0" else logging.WARNING,
                        format=f"%(asctime)s rank{rank} %(levelname)s %(name)s: %(message)s")
    with open(args.config, encoding="utf-8") as f:
        cfg = TrainerConfig.model_validate_json(f.read())
    fix_mmap_threshold()  # before torch allocates anything: freed tensors leave the RSS
    from transformers.utils import logging as hf_logging

    # per-save bars would flood the trainer log
    hf_logging.disable_progress_bar()  # type: ignore[no-untyped-call]  # unannotated in transformers
    if args.evaluate:
        from .evaluate import run_evaluation

        return run_evaluation(cfg, args.evaluate)
    from .loop import run_attempt  # torch loads after the config is known to parse

    return run_attempt(cfg)


if __name__ == "__main__":
    sys.exit(main())
