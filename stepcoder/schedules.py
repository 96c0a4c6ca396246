"""Learning-rate schedules, as a factor of the base rate per training step (``LambdaLR``)."""
from __future__ import annotations

import math

KINDS = ("constant", "linear", "cosine")


def learning_rate_factor(step: int, total_steps: int, warmup_steps: int, kind: str) -> float:
    """Linear warm-up over `warmup_steps` (reaching 1 at step warmup_steps - 1), then constant, or a
    linear or cosine decay that reaches 0 at `total_steps`."""
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {', '.join(KINDS)}, got {kind!r}")
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    if kind == "constant":
        return 1.0
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    if kind == "linear":
        return 1.0 - progress
    return 0.5 * (1.0 + math.cos(math.pi * progress))
