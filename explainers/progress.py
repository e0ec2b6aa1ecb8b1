"""How far a job has got, and the checkpoints where it can be stopped.

The engine runs a job's methods under a :class:`JobProgress`; the methods' chunk loops call :func:`step` inside
:func:`steps` blocks, which may nest (integrated gradients: passes over the path, each a run of target chunks), so
a method's fraction done is exact in its own units whatever its shape. No loop needs the tracker passed down:
it is installed for the job's thread in a context variable, and outside a job :func:`step` does nothing.

Each step costs a clock read; at most every ``interval`` seconds it also publishes the progress and learns
whether the job was cancelled (one Redis round trip, see explainers/worker.py), raising :class:`JobCancelled`
when it was; :func:`tick` does the same without advancing, inside a long step. A job is therefore stopped within
one interval plus the longest stretch between two checkpoints: one decoder layer of a group of targets' backward
pass (explainers/backprop.py steps per layer) or of a recorded forward pass over the path points, one batch of
perturbed sequences, or the first forward pass.

The fraction of the whole job weights each method by its predicted passes (its published cost model), the forward
pass counting one. The time left is, for a method under way, the time it has taken so far extrapolated over what
is left of it; for one not begun, its predicted passes times the seconds a pass took (the forward pass's, scaled
by how far the methods run so far were off their predictions).
"""

from __future__ import annotations

import contextlib
import contextvars
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

from sightline.v1 import types_pb2

# Before the record is final the published fraction stays below 1, which only SUCCEEDED reports.
MAX_UNFINISHED_FRACTION = 0.999


class JobCancelled(Exception):
    """The job's record asks for it to stop; ``cancelled_by`` says who asked."""

    def __init__(self, cancelled_by: str) -> None:
        super().__init__(f"cancelled by {cancelled_by}")
        self.cancelled_by = cancelled_by


# Publishes a progress snapshot; returns who cancelled the job, or None while it should go on.
Publisher = Callable[[types_pb2.ExplanationProgress], str | None]


@dataclass
class Tracking:
    """What a job's progress is published through, and a first guess at a pass's seconds, which the engine
    replaces by its measurement when the job is done."""

    publish: Publisher
    seconds_per_pass: float
    interval: float = 0.25


@dataclass
class _MethodClock:
    name: str
    predicted_passes: float
    fraction: float = 0.0
    started: float | None = None
    finished: float | None = None

    def seconds_left(self, now: float, seconds_per_pass: float) -> float:
        if self.finished is not None:
            return 0.0
        if self.started is not None and self.fraction > 0:
            return (now - self.started) * (1 - self.fraction) / self.fraction
        return self.predicted_passes * seconds_per_pass


@dataclass
class JobProgress:
    """Progress of one job over its methods, published at most every ``interval`` seconds."""

    methods: list[tuple[str, float]]  # (name, predicted passes), in run order
    publish: Publisher
    # A first guess at a pass's seconds, until the job's own forward pass is timed (e.g. on a cache hit).
    seconds_per_pass: float
    interval: float = 0.25
    clock: Callable[[], float] = time.monotonic
    _forward: _MethodClock = field(init=False)
    _clocks: list[_MethodClock] = field(init=False)
    _current: _MethodClock | None = field(init=False, default=None)
    _frames: list[list[float]] = field(init=False, default_factory=list)  # [done, total] per open steps block
    _next_publish: float = field(init=False, default=0.0)
    _published: float = field(init=False, default=0.0)

    def __post_init__(self) -> None:
        self._forward = _MethodClock("forward", 1.0)
        self._clocks = [_MethodClock(name, max(passes, 1e-3)) for name, passes in self.methods]

    @contextlib.contextmanager
    def forward_pass(self) -> Iterator[list[bool]]:
        """The job's forward pass: its time calibrates the seconds of one pass, unless the block sets the list it
        is given to [True] (the hidden states came from the cache: no pass was run)."""
        cache_hit = [False]

        def calibrate(elapsed: float) -> None:
            if elapsed > 0 and not cache_hit[0]:
                self.seconds_per_pass = elapsed

        with self._running(self._forward, calibrate):
            yield cache_hit

    @contextlib.contextmanager
    def method(self, index: int) -> Iterator[None]:
        """Method ``index`` (of ``methods``) runs in the block."""
        clock = self._clocks[index]

        def calibrate(taken: float) -> None:
            # How far this method was off its prediction corrects the guesses for the ones still to run.
            predicted = clock.predicted_passes * self.seconds_per_pass
            if taken > 0 and predicted > 0:
                self.seconds_per_pass *= taken / predicted

        with self._running(clock, calibrate):
            yield

    @contextlib.contextmanager
    def _running(self, clock: _MethodClock, calibrate: Callable[[float], None]) -> Iterator[None]:
        """``clock``'s work runs in the block; ``calibrate`` gets its seconds before the closing publish."""
        clock.started = self.clock()
        self._current, self._frames = clock, []
        # Rate-limited like any step (the job's first checkpoint always publishes): a job of quick methods costs a
        # round trip or two, not four per method.
        self.checkpoint()
        token = _ACTIVE.set(self)
        try:
            yield
        finally:
            _ACTIVE.reset(token)
            self._current = None
        clock.fraction, clock.finished = 1.0, self.clock()
        calibrate(clock.finished - clock.started)
        self.checkpoint()

    def snapshot(self) -> types_pb2.ExplanationProgress:
        now = self.clock()
        weights = [self._forward.predicted_passes] + [c.predicted_passes for c in self._clocks]
        fractions = [self._forward.fraction] + [c.fraction for c in self._clocks]
        done = sum(w * f for w, f in zip(weights, fractions, strict=True)) / sum(weights)
        # Never backwards, and 1 only once the record is final.
        self._published = max(self._published, min(done, MAX_UNFINISHED_FRACTION))
        methods = [
            types_pb2.MethodProgress(
                method=c.name, fraction=c.fraction, seconds_left=c.seconds_left(now, self.seconds_per_pass)
            )
            for c in self._clocks
        ]
        left = self._forward.seconds_left(now, self.seconds_per_pass) + sum(m.seconds_left for m in methods)
        return types_pb2.ExplanationProgress(fraction=self._published, seconds_left=left, methods=methods)

    def checkpoint(self, *, force: bool = False) -> None:
        """Publish and check for cancellation, if ``interval`` has passed since the last time (or ``force``)."""
        now = self.clock()
        if not force and now < self._next_publish:
            return
        self._next_publish = now + self.interval
        cancelled_by = self.publish(self.snapshot())
        if cancelled_by is not None:
            raise JobCancelled(cancelled_by)

    def _enter_steps(self, total: int) -> None:
        self._frames.append([0.0, float(max(total, 1))])

    def _exit_steps(self) -> None:
        self._frames.pop()

    def _step(self) -> None:
        if not self._frames or self._current is None:
            return
        self._frames[-1][0] += 1
        # Each open block's done steps, plus the inner blocks' share of its current step.
        fraction = 0.0
        for done, total in reversed(self._frames):
            fraction = min(done + fraction, total) / total
        self._current.fraction = max(self._current.fraction, min(fraction, 1.0))
        self.checkpoint()


_ACTIVE: contextvars.ContextVar[JobProgress | None] = contextvars.ContextVar("sightline_job_progress", default=None)


@contextlib.contextmanager
def steps(total: int) -> Iterator[None]:
    """A loop of ``total`` steps in the running method; nested blocks divide the enclosing block's current step."""
    progress = _ACTIVE.get()
    if progress is None:
        yield
        return
    progress._enter_steps(total)
    try:
        yield
    finally:
        progress._exit_steps()


def step() -> None:
    """One step of the innermost :func:`steps` block is done: a checkpoint, where a cancelled job stops."""
    progress = _ACTIVE.get()
    if progress is not None:
        progress._step()


def tick() -> None:
    """A checkpoint inside a long step, advancing nothing: publishes and checks for a cancel if the interval has
    passed (a clock read otherwise)."""
    progress = _ACTIVE.get()
    if progress is not None:
        progress.checkpoint()


def checkpoint() -> None:
    """Where a cancelled job must stop before going on (e.g. before writing to the cache): always asks."""
    progress = _ACTIVE.get()
    if progress is not None:
        progress.checkpoint(force=True)
