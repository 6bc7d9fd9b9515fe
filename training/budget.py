"""The time budget of a run: parse it, plan the optimizer steps that fit, and shape the learning rate.

``--time-budget 30m`` runs from the process start (read from ``/proc`` where
there is one) to the export being done. ``plan`` turns the measured cost of a
training step and of one validation into the number of steps, the validation
interval and the time held back for the export; ``Deadline`` answers "how much
is left" against an injectable clock, so the planner is tested with a fake one.
``lr_at`` is the schedule: linear warm-up, then cosine decay to a small
fraction of the peak, ending exactly at the planned last step.
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
import time
from collections.abc import Callable
from dataclasses import dataclass

MIN_BUDGET_S = 10.0
_UNITS = {"s": 1.0, "m": 60.0, "h": 3600.0}
_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([smh]?)\s*$")

# The timed probe of the step speed: this share of the budget, within 0.5 s and 4 s.
PROBE_SHARE = 0.005


def probe_seconds(budget_s: float) -> float:
    return min(4.0, max(0.5, PROBE_SHARE * budget_s))


# Validations take at most this share of the training time (the planner spaces them out).
VALIDATION_SHARE = 0.03
MIN_VALIDATIONS = 4
MAX_VALIDATIONS = 40
# Warm-up steps: this fraction of the plan, at least 20 and at most 500.
WARMUP_FRACTION = 0.03
# The decay ends at this fraction of the peak learning rate.
FINAL_LR_FRACTION = 0.05
# The "wsd" schedule decays over this last share of the steps (stable at the peak before);
# --decay-share overrides it.
DECAY_SHARE = 0.8
# Time held back for the export and the reloaded sample: a fixed part and a share of the budget.
EXPORT_RESERVE_S = 6.0
EXPORT_RESERVE_SHARE = 0.004


class BudgetError(ValueError):
    """A budget that cannot be used; the message names the flag and the value."""


def parse_duration(text: str) -> float:
    """``"90s"``, ``"30m"``, ``"2h"`` or plain seconds (``"600"``) -> seconds."""
    match = _DURATION.match(text)
    if not match:
        raise BudgetError(f"--time-budget must be a duration like 90s, 30m or 2h, got {text!r}")
    seconds = float(match.group(1)) * _UNITS[match.group(2) or "s"]
    if seconds < MIN_BUDGET_S:
        raise BudgetError(
            f"--time-budget must be at least {MIN_BUDGET_S:g}s (time to build, train and export), got {text!r}"
        )
    return seconds


def process_age(now: Callable[[], float] = time.time) -> float:
    """Seconds since this process started (from ``/proc/self/stat``), 0 where that cannot be read."""
    try:
        with open("/proc/self/stat", encoding="ascii") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        start_ticks = int(fields[19])  # field 22 (starttime), counted after the ")" of the command
        with open("/proc/uptime", encoding="ascii") as f:
            uptime = float(f.read().split()[0])
        return max(0.0, uptime - start_ticks / os.sysconf("SC_CLK_TCK"))
    except (OSError, ValueError, IndexError):
        return 0.0


class Deadline:
    """The end of the budget on a monotonic clock; ``clock`` is injectable for tests."""

    def __init__(self, budget_s: float, already_used_s: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.budget_s = budget_s
        self.clock = clock
        self.end = clock() + budget_s - already_used_s

    def remaining(self) -> float:
        return self.end - self.clock()

    def used(self) -> float:
        return self.budget_s - self.remaining()


@dataclass(frozen=True)
class Plan:
    """How a budgeted run spends its time."""

    total_steps: int  # optimizer steps in the whole run, including those already done
    validate_every: int  # steps between validations
    warmup_steps: int
    step_s: float  # measured seconds per training step
    validation_s: float  # measured seconds per validation
    reserve_s: float  # held back for the export and its sample

    def describe(self) -> dict[str, float | int]:
        return {
            "total_steps": self.total_steps,
            "validate_every": self.validate_every,
            "warmup_steps": self.warmup_steps,
            "step_seconds": round(self.step_s, 5),
            "validation_seconds": round(self.validation_s, 3),
            "export_reserve_seconds": round(self.reserve_s, 1),
        }


def export_reserve(budget_s: float) -> float:
    """Seconds held back for the export: a fixed part and a share, at most a fifth of a short budget."""
    return min(EXPORT_RESERVE_S + EXPORT_RESERVE_SHARE * budget_s, 0.2 * budget_s)


def plan(
    *,
    remaining_s: float,
    budget_s: float,
    steps_done: int,
    step_s: float,
    validation_s: float,
    reserve_s: float | None = None,
) -> Plan:
    """The steps that fit in ``remaining_s`` after the export reserve and the validations.

    With ``n`` validations of ``validation_s`` each and steps of ``step_s``, the
    training time is ``remaining - reserve - n * validation_s``; ``n`` is chosen
    so that validating costs about ``VALIDATION_SHARE`` of it (clamped to
    ``MIN_VALIDATIONS``..``MAX_VALIDATIONS``). Raises ``BudgetError`` when not
    even one validation interval of steps fits.
    """
    if step_s <= 0 or validation_s < 0:
        raise ValueError(f"step_s must be > 0 and validation_s >= 0, got {step_s}, {validation_s}")
    reserve = export_reserve(budget_s) if reserve_s is None else reserve_s
    usable = remaining_s - reserve
    share_n = VALIDATION_SHARE * usable / validation_s if validation_s > 0 else MAX_VALIDATIONS
    n_val = int(min(MAX_VALIDATIONS, max(MIN_VALIDATIONS, share_n)))
    train_s = usable - n_val * validation_s
    new_steps = int(train_s / step_s)
    if new_steps < n_val:
        raise BudgetError(
            f"--time-budget {budget_s:g}s: {remaining_s:.0f} s are left, but the export needs about {reserve:.0f} s, "
            f"{n_val} validations {n_val * validation_s:.0f} s and a step {step_s:.2f} s; raise --time-budget "
            "or make the model smaller"
        )
    total = steps_done + new_steps
    return Plan(
        total_steps=total,
        validate_every=max(1, math.ceil(new_steps / n_val)),
        warmup_steps=min(500, max(20, int(WARMUP_FRACTION * total))),
        step_s=step_s,
        validation_s=validation_s,
        reserve_s=reserve,
    )


def lr_at(
    step: int,
    *,
    peak: float,
    total_steps: int,
    warmup_steps: int,
    shape: str = "cosine",
    final_fraction: float = FINAL_LR_FRACTION,
    decay_share: float = DECAY_SHARE,
) -> float:
    """Learning rate for optimizer step ``step`` (0-based): linear warm-up, then down to ``final_fraction * peak``.

    ``cosine`` decays along a half cosine from the warm-up's end to ``total_steps``;
    ``wsd`` (warm-up, stable, decay) stays at the peak and decays linearly over
    the last ``decay_share`` of the steps; ``constant`` stays at the peak.
    """
    if shape == "constant":
        return peak
    if step < warmup_steps:
        return peak * (step + 1) / warmup_steps
    if shape == "wsd":
        decay_start = max(warmup_steps, total_steps - int(decay_share * total_steps))
        progress = min(1.0, max(0.0, (step - decay_start) / max(1, total_steps - decay_start)))
        return peak * (1.0 - (1.0 - final_fraction) * progress)
    span = max(1, total_steps - warmup_steps)
    progress = min(1.0, (step - warmup_steps) / span)
    return peak * (final_fraction + (1.0 - final_fraction) * 0.5 * (1.0 + math.cos(math.pi * progress)))


def replan(old: Plan, *, total_steps: int) -> Plan:
    """The same plan ending at ``total_steps`` (the schedule stretches or shrinks to it)."""
    return dataclasses.replace(old, total_steps=total_steps)


def plan_from_now(run_plan: Plan, deadline: Deadline, step: int, step_s: float, validation_s: float) -> int:
    """The total steps that end on time from ``step``, at the measured step and validation times.

    Every ``validate_every`` steps cost one validation, and the last step is
    followed by one more: solve ``n * step_s + ceil(n / every) * validation_s =
    remaining - reserve`` for ``n`` (at least one step).
    """
    usable = deadline.remaining() - run_plan.reserve_s
    every = run_plan.validate_every
    per_step = step_s + validation_s / every
    n = int(max(1.0, usable / per_step))
    return max(step + 1, step + n)
