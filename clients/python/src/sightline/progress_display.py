"""How the command line shows an explanation's progress: a bar redrawn in place on a terminal, plain lines
(one per state change or tenth of the work) when the output is a pipe or a file, so logs stay readable."""

from __future__ import annotations

import math
from typing import TextIO

from sightline.types import Explanation, ExplanationState

BAR_WIDTH = 30
# In plain-line mode, a line for each state change and each time the work done passes another tenth.
PLAIN_STEPS = 10


def _duration(seconds: float) -> str:
    if not math.isfinite(seconds) or seconds < 0:
        return "?"
    if seconds < 60:
        return f"{seconds:.0f}s"
    minutes, secs = divmod(round(seconds), 60)
    if minutes < 60:
        return f"{minutes}m{secs:02d}s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m"


def describe(explanation: Explanation) -> str:
    """One line: state, percentage done, time left and the method under way."""
    progress = explanation.progress
    if progress is None:  # not started yet, failed, or from a server that reports no progress
        done = 100.0 if explanation.state is ExplanationState.SUCCEEDED else 0.0
        return f"{explanation.state.value} {done:5.1f}%"
    running = next((m for m in progress.methods if 0 < m.fraction < 1), None)
    where = f", {running.method}" if running else ""
    left = "" if explanation.finished else f", about {_duration(progress.seconds_left)} left"
    return f"{explanation.state.value} {progress.fraction * 100:5.1f}%{left}{where}"


class ProgressDisplay:
    """Called with each update of a watched explanation (``Client.wait_for_explanation``'s ``on_progress``)."""

    def __init__(self, stream: TextIO) -> None:
        self._stream = stream
        self._terminal = stream.isatty()
        self._last_plain: tuple[str, int] | None = None
        self._drawn = False

    def __call__(self, explanation: Explanation) -> None:
        if self._terminal:
            self._draw(explanation)
        else:
            self._line(explanation)

    def close(self) -> None:
        """End the bar's line, so what is printed next starts on a line of its own."""
        if self._drawn:
            self._stream.write("\n")
            self._stream.flush()
            self._drawn = False

    def _draw(self, explanation: Explanation) -> None:
        fraction = explanation.progress.fraction if explanation.progress else 0.0
        filled = round(fraction * BAR_WIDTH)
        bar = "#" * filled + "-" * (BAR_WIDTH - filled)
        # \r returns to the line's start and \x1b[K clears what a longer previous line left.
        self._stream.write(f"\r[{bar}] {describe(explanation)}\x1b[K")
        self._stream.flush()
        self._drawn = True

    def _line(self, explanation: Explanation) -> None:
        fraction = explanation.progress.fraction if explanation.progress else 0.0
        key = (explanation.state.value, math.floor(fraction * PLAIN_STEPS))
        if key != self._last_plain:
            self._last_plain = key
            self._stream.write(f"{explanation.explanation_id}: {describe(explanation)}\n")
            self._stream.flush()
