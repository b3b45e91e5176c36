"""Warnings for a CPT recipe that is valid but known to go wrong (pure: the spec alone).

A weights-only start gives the base fresh AdamW moments: without a warm-up the first steps meet
the full LR with moments that know nothing (the "stability gap": loss and forgetting jump before
they recover), without replay nothing holds the base's general ability in place, and an LR far
above what such models were pretrained with undoes what the base knows. None of these is wrong
for every run, so they are warnings: `cptctl validate` and `cptctl run` print them, the operator
posts them as a Warning event and in the SpecValid condition's message.
"""
from __future__ import annotations

from cpt_api.spec import CptRunSpec, RestoreMode, SourceRole

PRETRAINING_PEAK_LR = 3e-4
"""The peak LR most 7-70 B open models were pretrained with (Llama 2 and 3: 3e-4 for 7-8 B,
1.5e-4 for 70 B; Mistral 7B 3e-4)."""
CPT_LR_SHARE = 1.0
"""A continued-pretraining peak above this share of `PRETRAINING_PEAK_LR` is warned about:
re-warming to the pretraining peak is already the top of what CPT studies use (Gupta et al.
2023, Ibrahim et al. 2024), and it forgets more than lower peaks."""


def recipe_warnings(spec: CptRunSpec) -> list[str]:
    """What to reconsider in a weights-only start (empty: nothing)."""
    if spec.base_model.restore_mode != RestoreMode.weights_only:
        return []
    warnings = []
    if spec.schedule.warmup_steps == 0:
        warnings.append("schedule.warmupSteps is 0 on a weightsOnly start: fresh AdamW moments meet the full "
                        "LR at the first step (the stability gap); warm up over ~1% of the steps")
    if not any(s.role == SourceRole.replay for s in spec.data.sources):
        warnings.append("no replay source: nothing holds the base's general ability in place; mix in 5-30% "
                        "general data like the base's pretraining data")
    ceiling = PRETRAINING_PEAK_LR * CPT_LR_SHARE
    if spec.optimizer.lr > ceiling:
        warnings.append(f"optimizer.lr {spec.optimizer.lr:g} is above {ceiling:g}, the peak most 7-70B models "
                        "were pretrained with: CPT at or below it forgets less (tiny test models excepted)")
    return warnings


__all__ = ["CPT_LR_SHARE", "PRETRAINING_PEAK_LR", "recipe_warnings"]
