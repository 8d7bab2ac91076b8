"""Learning-rate schedules: what a phase's (CLLM4Rec) or stage's (A-LLMRec) learning rate is multiplied by at each
of its steps.

The factor is a function of the step's place in its phase and of nothing else: a resumed run, which restores
that place with the rest of the coordinator's state, steps at the same rates, with no scheduler state to save.
"""

from __future__ import annotations

import math

LR_SCHEDULES = ("constant", "cosine")


def lr_factor(schedule: str, step: int, steps: int, warmup_fraction: float = 0.0, min_ratio: float = 0.0) -> float:
    """The multiplier at step ``step`` (0-based) of a phase of ``steps`` steps.

    The first ``int(warmup_fraction * steps)`` steps ramp linearly up to 1 (the first step at 1 / warm-up steps,
    never at 0: a step at lr 0 would only spend time); then "constant" stays at 1 and "cosine" falls along a half
    cosine from 1 at the first step after the warm-up to ``min_ratio`` at the phase's last step."""
    if schedule not in LR_SCHEDULES:
        raise ValueError(f"unknown learning-rate schedule {schedule!r}: one of {', '.join(LR_SCHEDULES)}")
    warmup = int(warmup_fraction * steps)
    if step < warmup:
        return (step + 1) / warmup
    decaying = steps - warmup - 1  # steps after the first post-warm-up one
    if schedule == "constant" or decaying <= 0:
        return 1.0
    progress = min(step - warmup, decaying) / decaying
    return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))
