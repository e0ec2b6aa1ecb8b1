"""The progress tracker's arithmetic and rate bound, on a hand-driven clock (the real stack is in
tests/e2e/test_progress_and_cancel.py)."""

from __future__ import annotations

import pytest
from sightline.v1 import types_pb2

from explainers import progress
from explainers.progress import MAX_UNFINISHED_FRACTION, JobCancelled, JobProgress


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


class Published:
    """What the tracker published, and who (if anyone) has cancelled the job."""

    def __init__(self) -> None:
        self.snapshots: list[types_pb2.ExplanationProgress] = []
        self.cancelled_by: str | None = None

    def __call__(self, snapshot: types_pb2.ExplanationProgress) -> str | None:
        self.snapshots.append(snapshot)
        return self.cancelled_by


def test_nested_steps_give_a_monotonic_fraction_weighted_by_predicted_passes() -> None:
    clock, published = Clock(), Published()
    # The forward pass counts 1 pass, the method 9: the method is 90 % of the job.
    tracker = JobProgress([("integrated_gradients", 9.0)], published, seconds_per_pass=1.0, interval=0.0, clock=clock)
    with tracker.forward_pass():
        clock.now += 1.0
    assert published.snapshots[-1].fraction == pytest.approx(0.1)
    with tracker.method(0), progress.steps(2):
        for _ in range(2):
            with progress.steps(4):
                for _ in range(4):
                    clock.now += 0.5
                    progress.step()
            progress.step()
    fractions = [s.fraction for s in published.snapshots]
    assert fractions == sorted(fractions)
    # One outer step of two, each of four inner steps: eighths of the method.
    method_fractions = [
        s.methods[0].fraction for s in published.snapshots[3:-1]
    ]  # after the forward pass and the method's start
    assert method_fractions[:4] == pytest.approx([0.125, 0.25, 0.375, 0.5])
    assert published.snapshots[-1].fraction == MAX_UNFINISHED_FRACTION  # 1 is only for the final record
    assert published.snapshots[-1].seconds_left == 0.0


def test_time_left_is_predicted_then_extrapolated_from_the_finished_chunks() -> None:
    clock, published = Clock(), Published()
    tracker = JobProgress([("saliency", 10.0)], published, seconds_per_pass=5.0, interval=0.0, clock=clock)
    with tracker.forward_pass():
        clock.now += 2.0  # the forward pass calibrates a pass at 2 s
    assert published.snapshots[-1].methods[0].seconds_left == pytest.approx(20.0)
    with tracker.method(0), progress.steps(4):
        clock.now += 3.0
        progress.step()  # a quarter in 3 s: 9 s to go
        assert published.snapshots[-1].seconds_left == pytest.approx(9.0)


def test_publishing_is_bounded_by_the_interval_and_a_cancel_stops_at_the_next_publish() -> None:
    clock, published = Clock(), Published()
    tracker = JobProgress([("occlusion", 1.0)], published, seconds_per_pass=1.0, interval=0.25, clock=clock)
    with tracker.method(0), progress.steps(1000):
        for _ in range(100):
            clock.now += 0.01  # 100 steps in 1 s
            progress.step()
    # Start and end of the method, plus at most one per 0.25 s between.
    assert len(published.snapshots) <= 2 + 4 + 1

    published.cancelled_by = "tenant t (CancelExplanation)"
    tracker = JobProgress([("occlusion", 1.0)], published, seconds_per_pass=1.0, interval=0.25, clock=clock)
    steps_taken = 0
    with pytest.raises(JobCancelled) as raised, tracker.method(0), progress.steps(10):
        for _ in range(10):
            steps_taken += 1
            progress.step()
    assert raised.value.cancelled_by == "tenant t (CancelExplanation)"
    assert steps_taken == 0  # the method's opening checkpoint already asks


def test_steps_outside_a_job_do_nothing() -> None:
    with progress.steps(3):
        progress.step()
    progress.checkpoint()
