"""The time budget's parts without TensorFlow: durations, the schedule's shape, the planner on a fake clock."""

from __future__ import annotations

import math

import pytest

from training import budget
from training.budget import BudgetError, Deadline, lr_at, parse_duration, plan, plan_from_now, process_age


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.mark.parametrize("text,seconds", [("90s", 90), ("30m", 1800), ("2h", 7200), ("600", 600), ("1.5h", 5400)])
def test_durations(text: str, seconds: float) -> None:
    assert parse_duration(text) == seconds


@pytest.mark.parametrize("text", ["", "m", "30x", "-5m", "5s", "ten minutes"])
def test_bad_durations_name_the_flag_and_the_value(text: str) -> None:
    with pytest.raises(BudgetError, match="--time-budget") as info:
        parse_duration(text)
    assert repr(text) in str(info.value)


def test_the_schedule_warms_up_linearly_then_decays_by_a_cosine_to_the_final_fraction() -> None:
    peak, total, warmup = 0.004, 1000, 50
    lrs = [lr_at(s, peak=peak, total_steps=total, warmup_steps=warmup) for s in range(total)]
    assert lrs[0] == pytest.approx(peak / warmup)
    assert all(b > a for a, b in zip(lrs[: warmup - 1], lrs[1:warmup], strict=True))  # rising
    assert lrs[warmup - 1] == pytest.approx(peak) and lrs[warmup] == pytest.approx(peak)
    assert all(b <= a for a, b in zip(lrs[warmup:], lrs[warmup + 1 :], strict=False))  # never rising again
    halfway = warmup + (total - warmup) // 2
    assert lrs[halfway] == pytest.approx(peak * (budget.FINAL_LR_FRACTION + 1) / 2, rel=1e-2)
    end = lr_at(total, peak=peak, total_steps=total, warmup_steps=warmup)
    assert end == pytest.approx(peak * budget.FINAL_LR_FRACTION)
    assert lr_at(10 * total, peak=peak, total_steps=total, warmup_steps=warmup) == pytest.approx(end)


def test_the_plan_fills_the_budget_after_the_reserve_and_the_validations() -> None:
    p = plan(remaining_s=1790.0, budget_s=1800.0, steps_done=10, step_s=0.25, validation_s=2.0)
    reserve = budget.export_reserve(1800.0)
    assert p.reserve_s == reserve
    validations = math.ceil((p.total_steps - 10) / p.validate_every)
    spent = (p.total_steps - 10) * p.step_s + validations * p.validation_s + reserve
    assert 1790.0 - 2 * p.step_s - p.validation_s <= spent <= 1790.0 + p.validation_s
    assert budget.MIN_VALIDATIONS <= validations <= budget.MAX_VALIDATIONS
    assert 20 <= p.warmup_steps <= 500


def test_slow_validations_are_spaced_out_to_their_share() -> None:
    fast = plan(remaining_s=600.0, budget_s=600.0, steps_done=0, step_s=0.1, validation_s=0.5)
    slow = plan(remaining_s=1800.0, budget_s=1800.0, steps_done=0, step_s=0.1, validation_s=10.0)
    assert slow.validate_every > fast.validate_every
    validations = math.ceil(slow.total_steps / slow.validate_every)
    assert budget.MIN_VALIDATIONS < validations
    assert validations * 10.0 <= budget.VALIDATION_SHARE * 1800.0 + 10.0
    # Validations that would take more than their share still happen MIN_VALIDATIONS times.
    slower = plan(remaining_s=600.0, budget_s=600.0, steps_done=0, step_s=0.1, validation_s=10.0)
    assert math.ceil(slower.total_steps / slower.validate_every) == budget.MIN_VALIDATIONS


def test_a_budget_too_small_for_one_interval_is_an_error_naming_the_flag() -> None:
    with pytest.raises(BudgetError, match="--time-budget"):
        plan(remaining_s=15.0, budget_s=30.0, steps_done=0, step_s=2.0, validation_s=1.0)


def test_the_deadline_counts_time_already_used_and_the_clock() -> None:
    clock = FakeClock()
    deadline = Deadline(600.0, already_used_s=100.0, clock=clock)
    assert deadline.remaining() == 500.0 and deadline.used() == 100.0
    clock.now += 200.0
    assert deadline.remaining() == 300.0 and deadline.used() == 300.0


def test_planning_again_on_a_slower_clock_ends_on_time() -> None:
    """A machine that slows down mid-run: the next plan has fewer steps, and they fit in what is left."""
    clock = FakeClock()
    deadline = Deadline(600.0, already_used_s=0.0, clock=clock)
    first = plan(remaining_s=deadline.remaining(), budget_s=600.0, steps_done=0, step_s=0.1, validation_s=1.0)
    clock.now += 150.0  # 1000 steps took 150 s instead of 100 s
    again = plan_from_now(first, deadline, 1000, step_s=0.15, validation_s=1.0)
    assert 1000 < again < first.total_steps
    n = again - 1000
    spent = n * 0.15 + math.ceil(n / first.validate_every) * 1.0
    assert spent <= deadline.remaining() - first.reserve_s + 1.0
    assert spent >= deadline.remaining() - first.reserve_s - 0.15 - 1.0
    faster = plan_from_now(first, deadline, 1000, step_s=0.05, validation_s=1.0)
    assert faster > first.total_steps  # a faster machine gets more steps


def test_past_the_deadline_one_more_step_is_planned_not_zero() -> None:
    clock = FakeClock()
    deadline = Deadline(60.0, already_used_s=0.0, clock=clock)
    first = plan(remaining_s=60.0, budget_s=60.0, steps_done=0, step_s=0.01, validation_s=0.1)
    clock.now += 100.0
    assert plan_from_now(first, deadline, 500, step_s=0.01, validation_s=0.1) == 501


def test_process_age_is_this_process_age() -> None:
    age = process_age()
    assert 0.0 < age < 24 * 3600


@pytest.mark.parametrize("share", [budget.DECAY_SHARE, 0.2, 0.9])
def test_wsd_holds_the_peak_then_decays_linearly_over_the_decay_share(share: float) -> None:
    peak, total, warmup = 0.01, 1000, 30
    lrs = [
        lr_at(s, peak=peak, total_steps=total, warmup_steps=warmup, shape="wsd", decay_share=share)
        for s in range(total + 1)
    ]
    assert lrs[0] == pytest.approx(peak / warmup) and lrs[warmup - 1] == pytest.approx(peak)
    decay_start = total - int(share * total)
    assert lrs[decay_start + 1] < peak
    assert all(lr == pytest.approx(peak) for lr in lrs[warmup : decay_start + 1])
    steps = [b - a for a, b in zip(lrs[decay_start:], lrs[decay_start + 1 :], strict=False)]
    assert all(d == pytest.approx(steps[0]) for d in steps) and steps[0] < 0  # a straight line down
    assert lrs[total] == pytest.approx(peak * budget.FINAL_LR_FRACTION)
    assert lr_at(5, peak=peak, total_steps=total, warmup_steps=warmup, shape="constant") == peak
