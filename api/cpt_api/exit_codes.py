"""Exit codes of the trainer process: what the control plane learns from how an attempt ended.

The local runner reads them from its torchrun child, the operator from the terminated state of
a trainer pod's container; the trainer returns them and `cpt_trainer.launch` carries them
through torchrun (which itself exits 1 whatever its workers returned).
"""
from __future__ import annotations

EXIT_REFUSED = 2
"""The trainer refused its config (a missing data path, a tokenizer mismatch...): the same
attempt would fail the same way, so the control plane spends no restart on it."""
EXIT_ANOMALY = 3
"""Training stopped on an anomaly rule (non-finite or spiking loss, too many in a row)."""
EXIT_PEER_STOPPED = 4
"""The trainer stopped after a checkpoint because another rank was signalled, not this one (that
rank's pod was deleted, its node drained): not an end of the attempt. Under torchrun it counts as
a failure, so torchrun restarts this trainer in place (stopPolicy.maxInPlaceRestarts) to go on with
the signalled rank's replacement, and its pod never completes an index the attempt still needs."""
