"""Image attributions on the constructed VLM: time and peak memory of each method for one image question, and how
much of the attribution the square's cells get (the ground truth).

    .venv/bin/python benchmarks/image_methods.py [--steps 32] [--threads 1]
    .venv/bin/python benchmarks/image_methods.py --smoke        # 8 integrated-gradients steps: checks it runs

A red square covering 3 x 3 of the 7 x 7 cells on white; "What color is the square? Answer with one word."; the
colour token of the greedy answer is explained on the model's 7 x 7 grid. Reported per method: wall time, the
process's peak resident memory after it (ru_maxrss, which only grows, so read it in order), whether the square's
nine cells are the top nine, and the picture's share of the attribution where the method scores text too.
"""

from __future__ import annotations

import argparse
import resource
import sys
import time
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
from tests.explainers.test_image_methods import answer, square_cells, square_picture, top_cells


def peak_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--steps", type=int, default=32)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--smoke", action="store_true")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    steps = 8 if args.smoke else args.steps

    from transformers import AutoProcessor, Idefics3ForConditionalGeneration

    model_dir = str(prepare_vlm().model_dir)
    processor = AutoProcessor.from_pretrained(model_dir, local_files_only=True)  # type: ignore[no-untyped-call]
    model = Idefics3ForConditionalGeneration.from_pretrained(model_dir, local_files_only=True).eval()  # type: ignore[no-untyped-call]
    loaded_mib = peak_mib()
    started = time.perf_counter()
    question, text = answer((model, processor), square_picture("red", 2, 3))
    answer_s = time.perf_counter() - started
    grid = CellGrid(GRID_SIDE, GRID_SIDE, IMAGE_SIZE, IMAGE_SIZE)
    truth = square_cells(2, 3)
    runs = {
        "occlusion": lambda: occlusion(model, question, grid, batch_size=10),
        "saliency": lambda: saliency(model, question, grid),
        "input_x_gradient": lambda: input_x_gradient(model, question, grid),
        "integrated_gradients": lambda: integrated_gradients(model, question, grid, steps=steps, with_text=True),
        "attention": lambda: attention(model, question, grid),
        "logit_lens": lambda: logit_lens(model, question, grid)[0],
    }
    methods: JsonDict = {}
    for name, run in runs.items():
        started = time.perf_counter()
        result: ImageAttribution = run()
        seconds = time.perf_counter() - started
        share = result.image_share()
        methods[name] = {
            "seconds": round(seconds, 3),
            "peak_rss_mib_after": round(peak_mib(), 1),
            "square_cells_rank_first": top_cells(result.cells[0, 0], len(truth)) == truth,
            "image_share": None if share is None else round(float(share[0]), 4),
        }
        print(f"{name}: {seconds:.2f} s", file=sys.stderr)
    result_json: JsonDict = {
        "benchmark": "image_methods",
        "command": bench_util.command_line("image_methods.py", sys.argv[1:] if argv is None else argv),
        "environment": bench_util.environment(),
        "answer": text,
        "answer_seconds_transformers": round(answer_s, 3),
        "model_loaded_peak_rss_mib": round(loaded_mib, 1),
        "tokens": len(question.token_ids),
        "integrated_gradients_steps": steps,
        "methods": methods,
    }
    name = "image_methods_smoke.json" if args.smoke else "image_methods.json"
    bench_util.write_result(args.out or bench_util.RESULTS_DIR / name, result_json)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
