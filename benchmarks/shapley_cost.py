"""Shapley sampling's cost: Sightline before and after its coalition scorer, occlusion, and Captum 0.9's
ShapleyValueSampling, on the same tokens.

    python benchmarks/shapley_cost.py [--smoke] [--samples N] [--threads N] [--before-ref REF] [--out DIR]

Workload: the France question (explainer_vs_peers.QUESTION) in the embedded SmolLM2-135M-Instruct's chat template
(37 prompt tokens with its default system prompt) and its greedy answer, up to 8 tokens, generated once with
transformers; every side explains every answer token from exactly these ids, with the method's default replacement
(`pad`: SmolLM2's `<|im_end|>`) as the removed-token id and as Captum's baseline. `--smoke`: the tiny random Llama of
explainer_vs_peers' smoke run, 4 generated tokens, 4 samples (well under 60 s).

Sides, one after the other,, each with torch.set_num_threads(--threads):

* sightline/before: shapley_sampling as it was at --before-ref (default: the commit before the coalition scorer),
  in a subprocess importing the explainers package of a `git worktree` of that commit.
* sightline/after: shapley_sampling of this checkout (this and the next two in this process).
* sightline/occlusion: occlusion (window 1) of this checkout, the same replacement.
* captum/shapley_value_sampling: `ShapleyValueSampling(forward).attribute(ids[:, :players], baselines=replacement,
  n_samples=samples, perturbations_per_eval=16)`, the players being the tokens before the last answer token (as in
  Sightline), forward = the model's log-probability of every answer token (one output per target: Captum's
  multi-output mode), logits only at the predicting positions. `torch.manual_seed(seed)` first: Captum then draws
  the same permutations as Sightline's seeded generator, so the two agree exactly up to float32 summation.

Each side: wall and CPU seconds of the attribution call alone (model loaded before), and the forward passes it ran,
counted by a hook on the decoder stack: calls, sequences (rows) and token positions computed. Correctness first:
before vs after, and after vs Captum, as max |difference| over the attribution matrix (targets x players).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import bench_util
from bench_util import JsonDict, markdown_table

# The last main commit before the coalition scorer: Shapley sampling one permutation per batch, every coalition
# from the unperturbed prefix.
BEFORE_REF = "4ac23f8c505577dcd8f3fcd8c7fa593ee3f925af"
ANSWER_TOKENS = 8
SMOKE_ANSWER_TOKENS = 4
SAMPLES = 25
SMOKE_SAMPLES = 4
SEED = 0
CAPTUM_PERTURBATIONS_PER_EVAL = 16
SIDES = ("sightline/before", "sightline/after", "sightline/occlusion", "captum/shapley_value_sampling")
# Sightline and Captum sum float32 scores in different orders.
AGREEMENT_TOLERANCE = 1e-4


@dataclass(frozen=True)
class Workload:
    model_dir: str
    model_name: str
    token_ids: list[int]
    prompt_length: int
    replacement_id: int
    samples: int
    seed: int
    threads: int


def build_workload(smoke: bool, scratch: Path, samples: int, threads: int) -> Workload:
    import torch
    from explainer_vs_peers import _build_smoke_model, _chat_prompt_ids
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from explainers.embedded_model import MODEL_NAME, prepare_model

    if smoke:
        model_dir = scratch / "tiny-llama"
        prompt_ids = _build_smoke_model(model_dir)
        model_name, answer_tokens = "tiny random Llama", SMOKE_ANSWER_TOKENS
    else:
        model_dir = prepare_model(model=MODEL_NAME).model_dir
        model_name, answer_tokens = MODEL_NAME, ANSWER_TOKENS
    tokenizer = AutoTokenizer.from_pretrained(model_dir, local_files_only=True)
    if not smoke:
        prompt_ids = _chat_prompt_ids(tokenizer)
    model: Any = AutoModelForCausalLM.from_pretrained(model_dir, local_files_only=True)
    model.train(False)
    with torch.no_grad():
        generated = model.generate(
            torch.tensor([prompt_ids]),
            attention_mask=torch.ones(1, len(prompt_ids), dtype=torch.long),
            max_new_tokens=answer_tokens,
            min_new_tokens=answer_tokens if smoke else 0,
            do_sample=False,
        )
    return Workload(
        model_dir=str(model_dir),
        model_name=model_name,
        token_ids=[int(token) for token in generated[0]],
        prompt_length=len(prompt_ids),
        replacement_id=int(tokenizer.pad_token_id),
        samples=samples,
        seed=SEED,
        threads=threads,
    )


# --------------------------------------------------------------------------------------------------------------
# Side: one subprocess, one attribution, timed and counted.


def run_side(side: str, workload: Workload) -> JsonDict:
    import torch

    from explainers.model import load_model
    from explainers.targets import Targets

    torch.set_num_threads(workload.threads)
    loaded = load_model(Path(workload.model_dir))
    token_ids = torch.tensor(workload.token_ids)
    positions = torch.arange(workload.prompt_length, len(token_ids))
    targets = Targets(positions=positions, token_ids=token_ids[positions], foil_ids=None)
    num_players = int(positions[-1])
    passes = {"calls": 0, "sequences": 0, "positions": 0}

    def count(module: Any, args: tuple[Any, ...], kwargs: dict[str, Any], output: Any) -> None:
        ids = kwargs["input_ids"]  # every side calls the model with input_ids=
        passes["calls"] += 1
        passes["sequences"] += int(ids.shape[0])
        passes["positions"] += int(ids.numel())

    attribute = _prepare(side, loaded, token_ids, workload, targets, num_players)
    loaded.model.base_model.register_forward_hook(count, with_kwargs=True)
    wall, cpu = time.perf_counter(), time.process_time()
    matrix = attribute()
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    return {
        "side": side,
        "wall_s": wall,
        "cpu_s": cpu,
        "forward_calls": passes["calls"],
        "sequences": passes["sequences"],
        "positions": passes["positions"],
        "attributions": matrix.tolist(),
    }


def _prepare(side: str, loaded: Any, token_ids: Any, workload: Workload, targets: Any, num_players: int) -> Any:
    """A no-argument callable that returns the side's attributions [num_targets, num_players] (float64)."""
    import torch

    from explainers.methods.base import AttributionContext

    ctx = AttributionContext(
        loaded=loaded,
        token_ids=token_ids,
        prompt_length=workload.prompt_length,
        targets=targets,
        hidden_states=torch.empty(0),
    )
    if side in ("sightline/before", "sightline/after"):
        from explainers.methods.shapley_sampling import ShapleySampling

        params = ShapleySampling().parse_params({"samples": workload.samples, "seed": workload.seed})
        return lambda: ShapleySampling().attributions(ctx, params)[:, :num_players].double()
    if side == "sightline/occlusion":
        from explainers.methods.occlusion import Occlusion

        return lambda: Occlusion().attributions(ctx, Occlusion().parse_params({}))[:, :num_players].double()
    from captum.attr import ShapleyValueSampling

    predicting = targets.predicting_positions

    def log_probs(inputs: torch.Tensor) -> torch.Tensor:
        logits = loaded.model(input_ids=inputs, logits_to_keep=predicting).logits  # [batch, num_targets, vocab]
        return torch.log_softmax(logits, dim=-1).gather(-1, targets.token_ids.expand(len(inputs), -1)[..., None])[
            ..., 0
        ]

    def captum() -> torch.Tensor:
        torch.manual_seed(workload.seed)  # Captum's permutations: the global generator's randperm, one per sample
        with torch.no_grad():
            attributions = ShapleyValueSampling(log_probs).attribute(
                token_ids[None, :num_players],
                baselines=workload.replacement_id,
                n_samples=workload.samples,
                perturbations_per_eval=CAPTUM_PERTURBATIONS_PER_EVAL,
            )
        # [1, num_targets, num_players] in multi-output mode; a player at or after a target contributes 0 to it.
        matrix = attributions.reshape(len(targets), num_players).double()
        return torch.where(torch.arange(num_players)[None, :] < targets.positions[:, None], matrix, 0.0)

    return captum


# --------------------------------------------------------------------------------------------------------------
# Driver.


def before_side(workload_path: Path, out_path: Path, code_root: Path) -> JsonDict:
    """sightline/before in a subprocess that imports the explainers package from code_root (the before worktree)."""
    command = [
        bench_util.PYTHON,
        __file__,
        "--side",
        "sightline/before",
        "--code-root",
        str(code_root),
        "--workload",
        str(workload_path),
        "--side-out",
        str(out_path),
    ]
    subprocess.run(command, check=True, cwd=code_root)
    result: JsonDict = json.loads(out_path.read_text())
    return result


def _read(path: Path) -> Workload:
    return Workload(**json.loads(path.read_text()))


def before_worktree(scratch: Path, ref: str) -> Path:
    path = scratch / "before"
    subprocess.run(
        ["git", "-C", str(bench_util.REPO_ROOT), "worktree", "add", "--detach", "--quiet", str(path), ref], check=True
    )
    return path


def max_difference(a: list[list[float]], b: list[list[float]]) -> float:
    return max(abs(x - y) for row_a, row_b in zip(a, b, strict=True) for x, y in zip(row_a, row_b, strict=True))


def summarize(workload: Workload, sides: dict[str, JsonDict], before_commit: str, smoke: bool) -> JsonDict:
    from explainer_vs_peers import QUESTION

    after = sides["sightline/after"]
    num_players = len(after["attributions"][0])
    agreement = {
        "before_vs_after": max_difference(sides["sightline/before"]["attributions"], after["attributions"]),
        "captum_vs_after": max_difference(
            sides["captum/shapley_value_sampling"]["attributions"], after["attributions"]
        ),
        "largest_attribution": max(abs(value) for row in after["attributions"] for value in row),
        "tolerance": AGREEMENT_TOLERANCE,
    }
    agreement["agree"] = max(agreement["before_vs_after"], agreement["captum_vs_after"]) <= AGREEMENT_TOLERANCE
    rows = []
    for name, side in sides.items():
        rows.append(
            {
                "side": name,
                "wall_s": round(side["wall_s"], 2),
                "cpu_s": round(side["cpu_s"], 2),
                "forward_calls": side["forward_calls"],
                "sequences": side["sequences"],
                "positions": side["positions"],
                "full_sequence_passes": round(side["positions"] / num_players, 1),
                "wall_vs_after": round(side["wall_s"] / after["wall_s"], 2),
            }
        )
    workload_info = {k: v for k, v in asdict(workload).items() if k not in ("token_ids", "model_dir")}
    return {
        "benchmark": "shapley_cost",
        "command": bench_util.command_line("shapley_cost.py", ["--smoke"] if smoke else []),
        "environment": bench_util.environment(),
        "workload": {
            **workload_info,
            "question": QUESTION,
            "answer_tokens": len(workload.token_ids) - workload.prompt_length,
            "players": num_players,
            "before_commit": before_commit,
        },
        "agreement": agreement,
        "sides": rows,
    }


def render_markdown(result: JsonDict) -> str:
    w, agreement = result["workload"], result["agreement"]
    table = markdown_table(
        ["side", "wall s", "CPU s", "forward calls", "sequences", "positions", "≈ full passes", "wall / after"],
        [
            [
                row["side"],
                row["wall_s"],
                row["cpu_s"],
                row["forward_calls"],
                row["sequences"],
                row["positions"],
                row["full_sequence_passes"],
                row["wall_vs_after"],
            ]
            for row in result["sides"]
        ],
    )
    return (
        f"{w['model_name']}, {w['prompt_length']} prompt + {w['answer_tokens']} answer tokens "
        f"({w['players']} players), "
        f"{w['samples']} samples, seed {w['seed']}, {w['threads']} thread(s); before = {w['before_commit'][:10]}.\n\n"
        f"{table}\n\nmax |before - after| = {agreement['before_vs_after']:.2e}, max |Captum - after| = "
        f"{agreement['captum_vs_after']:.2e} (largest value {agreement['largest_attribution']:.3g}; "
        f"{'agree' if agreement['agree'] else 'DISAGREE'} within {agreement['tolerance']:g})."
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--smoke", action="store_true")
    parser.add_argument("--samples", type=int, default=None)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--before-ref", default=BEFORE_REF)
    parser.add_argument("--out", type=Path, default=bench_util.RESULTS_DIR)
    parser.add_argument("--side", choices=SIDES, help=argparse.SUPPRESS)
    parser.add_argument("--workload", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--side-out", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--code-root", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.side:
        # Before anything imports the explainers package (explainer_vs_peers would import this checkout's).
        sys.path[:0] = [str(args.code_root), str(args.code_root / "clients/python/src")]
        args.side_out.write_text(json.dumps(run_side(args.side, _read(args.workload))))
        return

    samples = args.samples or (SMOKE_SAMPLES if args.smoke else SAMPLES)
    with tempfile.TemporaryDirectory(prefix="shapley-cost-") as scratch_dir:
        scratch = Path(scratch_dir)
        workload = build_workload(args.smoke, scratch, samples, args.threads)
        workload_path = scratch / "workload.json"
        workload_path.write_text(json.dumps(asdict(workload)))
        before = before_worktree(scratch, args.before_ref)
        sides: dict[str, JsonDict] = {}
        try:
            before_commit = subprocess.run(
                ["git", "-C", str(before), "rev-parse", "HEAD"], capture_output=True, text=True, check=True
            ).stdout.strip()
            for side in SIDES:
                print(f"== {side}", file=sys.stderr, flush=True)
                if side == "sightline/before":
                    sides[side] = before_side(workload_path, scratch / "before.json", before)
                else:  # this checkout's code, in this process
                    sides[side] = run_side(side, workload)
                print(f"== {side}: {sides[side]['wall_s']:.1f} s wall", file=sys.stderr, flush=True)
        finally:
            subprocess.run(
                ["git", "-C", str(bench_util.REPO_ROOT), "worktree", "remove", "--force", str(before)], check=False
            )
        result = summarize(workload, sides, before_commit, args.smoke)
    bench_util.write_result(args.out / f"shapley_cost{'_smoke' if args.smoke else ''}.json", result)
    print(render_markdown(result))
    if not result["agreement"]["agree"]:
        sys.exit("Sightline before/after and Captum disagree beyond the tolerance")


if __name__ == "__main__":
    main()
