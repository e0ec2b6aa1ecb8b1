"""Progress of the embedded model's one-off conversion (explainers/embedded_model.py), on stderr.

The conversion's stages run inside transformers with no progress of their own to read, so the bar advances with
the time each stage is expected to take (measured here: about 30 s on 2 threads for the 98 MB GGUF, most of it
dequantising and writing the 540 MB of float32 weights) and jumps to each stage's end as it finishes; it never
claims 100 % before the conversion is done. On a terminal it is redrawn in place twice a second; otherwise each
stage gets one line, so logs stay readable.
"""

from __future__ import annotations

import contextlib
import sys
import threading
import time
from collections.abc import Iterator
from typing import TextIO

# Seconds per MB of GGUF each stage took here (2 threads): reading and dequantising; writing the float32 weights and
# the tokenizer; hashing the written files for the manifest.
STAGE_SECONDS_PER_MB = {"dequantising": 0.15, "writing float32 weights": 0.12, "hashing the weights": 0.03}
BAR_WIDTH = 30
REDRAW_SECONDS = 0.5


class PreparationProgress:
    """The conversion's stages, in order, each entered with :meth:`stage`."""

    def __init__(self, source_mb: float, stream: TextIO = sys.stderr) -> None:
        self._stream = stream
        self._terminal = stream.isatty()
        self._expected = {name: rate * source_mb for name, rate in STAGE_SECONDS_PER_MB.items()}
        self._total = sum(self._expected.values())
        self._done_seconds = 0.0  # expected seconds of the stages finished
        self._current = ""
        self._stage_started = self._started = time.monotonic()
        self._lock = threading.Lock()
        self._say(
            f"preparing the embedded model: dequantising a {source_mb:.0f} MB GGUF into float32 weights "
            f"(about {source_mb * 5.5:.0f} MB), about {self._total:.0f} s"
        )

    @contextlib.contextmanager
    def stage(self, name: str) -> Iterator[None]:
        """Stage ``name`` (a key of STAGE_SECONDS_PER_MB) runs in the block."""
        with self._lock:
            self._current, self._stage_started = name, time.monotonic()
        if not self._terminal:
            self._say(f"  {name} …")
        stop = threading.Event()
        ticker = threading.Thread(target=self._tick, args=(stop,), daemon=True) if self._terminal else None
        if ticker:
            ticker.start()
        try:
            yield
        finally:
            stop.set()
            if ticker:
                ticker.join()
            with self._lock:
                self._done_seconds += self._expected[name]
        self._draw()

    def finish(self) -> None:
        elapsed = time.monotonic() - self._started
        if self._terminal:
            self._stream.write("\n")
        self._say(f"embedded model prepared in {elapsed:.1f} s")

    def _tick(self, stop: threading.Event) -> None:
        while not stop.wait(REDRAW_SECONDS):
            self._draw()

    def _fraction(self) -> float:
        with self._lock:
            in_stage = min(time.monotonic() - self._stage_started, self._expected.get(self._current, 0.0) * 0.95)
            return min((self._done_seconds + in_stage) / self._total, 0.99) if self._total else 0.0

    def _draw(self) -> None:
        if not self._terminal:
            return
        fraction = self._fraction()
        elapsed = time.monotonic() - self._started
        left = max(self._total * (1 - fraction), 0.0)
        filled = round(fraction * BAR_WIDTH)
        self._stream.write(
            f"\r[{'#' * filled}{'-' * (BAR_WIDTH - filled)}] {fraction * 100:3.0f}% {self._current}, "
            f"{elapsed:.0f} s elapsed, about {left:.0f} s left\x1b[K"
        )
        self._stream.flush()

    def _say(self, line: str) -> None:
        self._stream.write(line + "\n")
        self._stream.flush()
