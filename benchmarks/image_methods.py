"""Image attributions on the constructed VLM: time and peak memory of each method for one image question, and
whether the square's cells (the ground truth) rank first.

    .venv/bin/python benchmarks/image_methods.py [--steps 32] [--threads 1]
    .venv/bin/python benchmarks/image_methods.py --smoke        # 2 x 2 occlusion grid, no text occlusion, 4 IG steps

A red square covering 3 x 3 of the 7 x 7 cells on white; "What color is the square? Answer with one word."; the
colour token of the greedy answer is explained on the model's 7 x 7 grid, with the baselines the ground-truth test
uses (occlusion: the default mid-grey; integrated gradients: the white page and every text token the blank, with
the text). Each method runs in a forked child of the process that holds the loaded model, so its peak resident
memory (sampled every 5 ms: the model's pages plus what the method adds) is its own; the added memory is that peak
minus the resident size when the method starts. Reported per method: wall seconds, peak and added MiB, whether the
square's nine cells are the top nine (by magnitude for occlusion, whose other cells are exactly 0), the picture's
share of the attribution where the method scores text too, and integrated gradients' convergence_delta.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import threading
import time
import traceback
from collections.abc import Callable
from pathlib import Path

import bench_util
import torch
from bench_util import JsonDict

# The ground-truth pictures and the answer helper are the tests' own (tests/explainers/test_image_methods.py).
if str(bench_util.REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(bench_util.REPO_ROOT))

from explainers.constructed_vlm import GRID_SIDE, IMAGE_SIZE, prepare_vlm
from explainers.image_methods.grid import CellGrid
from explainers.image_methods.methods import (
    ImageAttribution,
    attention,
    input_x_gradient,
    integrated_gradients,
    logit_lens,
    occlusion,
    saliency,
)
from tests.explainers.test_image_methods import WHITE, answer, square_cells, top_cells
from tests.pictures import square_picture


def current_rss_mib() -> float:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


class PeakSampler:
    """The largest resident size seen while active, read every 5 ms by a thread (a fork's ru_maxrss is not the
    child's own peak on Linux, so it cannot be read after the method)."""

    def __init__(self) -> None:
        self.peak_mib = current_rss_mib()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def _sample(self) -> None:
        while not self._stop.wait(0.005):
            self.peak_mib = max(self.peak_mib, current_rss_mib())

    def __enter__(self) -> PeakSampler:
        self._thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        self._thread.join()
        self.peak_mib = max(self.peak_mib, current_rss_mib())


def measured(run: Callable[[], ImageAttribution], truth: set[tuple[int, int]]) -> JsonDict:
    """Run one method in a forked child; its measurements come back as JSON text over a pipe."""
    read_end, write_end = os.pipe()
    child = os.fork()
    if child == 0:
        os.close(read_end)
        start_mib = current_rss_mib()
        started = time.perf_counter()
        try:
            with PeakSampler() as sampler:
                result = run()
        except BaseException:
            traceback.print_exc()
            os._exit(1)
        seconds = time.perf_counter() - started
        share = result.image_share()
        ranked = result.cells[0, 0].abs() if result.method == "occlusion" else result.cells[0, 0]
        delta = result.convergence_delta
        measurements = {
            "seconds": round(seconds, 3),
            "peak_rss_mib": round(sampler.peak_mib, 1),
            "added_rss_mib": round(sampler.peak_mib - start_mib, 1),
            # Only on the model's 7 x 7 grid (the smoke run's occlusion grid is coarser).
            "square_cells_rank_first": top_cells(ranked, len(truth)) == truth if ranked.numel() > len(truth) else None,
            "image_share": None if share is None else round(float(share[0]), 4),
            "convergence_delta": None if delta is None else round(float(delta[0]), 5),
        }
        with os.fdopen(write_end, "w") as out:
            out.write(json.dumps(measurements))
        os._exit(0)
    os.close(write_end)
    with os.fdopen(read_end) as incoming:
        text = incoming.read()
    _, status = os.waitpid(child, 0)
    if status != 0 or not text:
        raise RuntimeError(f"the method's child process failed (wait status {status})")
    report: JsonDict = json.loads(text)
    return report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--steps", type=int, default=32, help="integrated-gradients steps (Gauss-Legendre)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--smoke", action="store_true")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    steps = 4 if args.smoke else args.steps

    from transformers import AutoProcessor, Idefics3ForConditionalGeneration

    model_dir = str(prepare_vlm().model_dir)
    processor = AutoProcessor.from_pretrained(model_dir, local_files_only=True)  # type: ignore[no-untyped-call]
    model = Idefics3ForConditionalGeneration.from_pretrained(model_dir, local_files_only=True).eval()  # type: ignore[no-untyped-call]
    loaded_mib = current_rss_mib()
    started = time.perf_counter()
    question, text = answer((model, processor), square_picture("red", 2, 3))
    answer_s = time.perf_counter() - started
    grid = CellGrid(GRID_SIDE, GRID_SIDE, IMAGE_SIZE, IMAGE_SIZE)
    occlusion_grid = CellGrid(2, 2, IMAGE_SIZE, IMAGE_SIZE) if args.smoke else grid
    blank = int(processor.tokenizer.encode(" ", add_special_tokens=False)[0])
    truth = square_cells(2, 3)
    text_id = None if args.smoke else blank  # the smoke run skips occluding the ~50 text tokens one by one
    runs: dict[str, Callable[[], ImageAttribution]] = {
        "occlusion": lambda: occlusion(model, question, occlusion_grid, batch_size=10, text_baseline_id=text_id),
        "saliency": lambda: saliency(model, question, grid),
        "input_x_gradient": lambda: input_x_gradient(model, question, grid),
        "integrated_gradients": lambda: integrated_gradients(
            model, question, grid, colour=WHITE, steps=steps, batch_size=8, with_text=True, text_baseline_id=blank
        ),
        "attention": lambda: attention(model, question, grid),
        "logit_lens": lambda: logit_lens(model, question, grid)[0],
    }
    methods: JsonDict = {}
    for name, run in runs.items():
        methods[name] = measured(run, truth)
        print(f"{name}: {methods[name]['seconds']:.2f} s", file=sys.stderr)
    result_json: JsonDict = {
        "benchmark": "image_methods",
        "command": bench_util.command_line("image_methods.py", sys.argv[1:] if argv is None else argv),
        "environment": bench_util.environment(),
        "answer": text,
        "answer_seconds_transformers": round(answer_s, 3),
        "model_loaded_rss_mib": round(loaded_mib, 1),
        "tokens": len(question.token_ids),
        "grid": [GRID_SIDE, GRID_SIDE],
        "occlusion_grid": [occlusion_grid.rows, occlusion_grid.cols],
        "integrated_gradients_steps": steps,
        "threads": args.threads,
        "methods": methods,
    }
    name = "image_methods_smoke.json" if args.smoke else "image_methods.json"
    bench_util.write_result(args.out or bench_util.RESULTS_DIR / name, result_json)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
