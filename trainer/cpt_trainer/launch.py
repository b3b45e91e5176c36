"""`python -m cpt_trainer.launch <torchrun arguments>`: torchrun, exiting with the trainer's code.

torchrun exits 1 whenever a worker fails, whatever the worker returned; a pod's exit code is
all the operator sees of how an attempt ended, so a refused config (`EXIT_REFUSED`) would look
like a crash and be retried. This runs torchrun's own entry point and, when a worker refused,
exits with that code instead.

It also has each rendezvous round's workers meet in a store of their own. torchrun otherwise
shares one store across rounds, and the process group's keys from before an in-place restart
(`--max-restarts`) are still in it: the restarted workers read the dead workers' addresses and
wait on them until the collective timeout (seen with gloo on torch 2.10).
"""
from __future__ import annotations

import os
import sys

from cpt_api.exit_codes import EXIT_REFUSED


FRESH_STORE_ENV = "TORCH_DISABLE_SHARE_RDZV_TCP_STORE"


def main(argv: list[str] | None = None) -> int:
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import main as torchrun

    os.environ.setdefault(FRESH_STORE_ENV, "1")
    try:
        torchrun(argv)
    except ChildFailedError as exc:
        codes = {failure.exitcode for failure in exc.failures.values()}
        return EXIT_REFUSED if EXIT_REFUSED in codes else 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
