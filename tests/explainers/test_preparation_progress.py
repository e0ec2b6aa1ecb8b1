"""The embedded model's preparation progress, as a terminal and as a log file see it."""

from __future__ import annotations

import io
import re
import time

from explainers.preparation_progress import PreparationProgress


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_a_log_gets_one_line_per_stage_with_sizes_and_the_time_estimate() -> None:
    log = io.StringIO()
    progress = PreparationProgress(98.0, log)
    for stage in ("dequantising", "writing float32 weights", "hashing the weights"):
        with progress.stage(stage):
            pass
    progress.finish()
    lines = log.getvalue().splitlines()
    assert re.fullmatch(
        r"preparing the embedded model: dequantising a 98 MB GGUF .*about 539 MB\), about 29 s", lines[0]
    )
    assert lines[1:4] == ["  dequantising …", "  writing float32 weights …", "  hashing the weights …"]
    assert re.fullmatch(r"embedded model prepared in \d+\.\d s", lines[4])
    assert "\r" not in log.getvalue()


def test_a_terminal_gets_a_bar_that_advances_and_never_shows_100_before_the_end() -> None:
    terminal = Terminal()
    progress = PreparationProgress(10.0, terminal)  # 3 s expected in all
    with progress.stage("dequantising"):
        time.sleep(1.2)
    with progress.stage("writing float32 weights"):
        pass
    bars = re.findall(r"\r\[([#-]{30})\] +(\d+)% ([a-z0-9 ]+), \d+ s elapsed, about (\d+) s left", terminal.getvalue())
    percents = [int(percent) for _, percent, _, _ in bars]
    assert len(bars) >= 3 and percents == sorted(percents)
    assert 0 < percents[0] < percents[-1] < 100
    assert bars[-1][2] == "writing float32 weights"
