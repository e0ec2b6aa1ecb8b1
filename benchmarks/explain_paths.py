"""Fast path vs general path: the same explanations of the embedded model (SmolLM2, a Llama), once through the
hand-written backward pass (explainers.backprop) and once through autograd over the Hugging Face module
(explainers.general_path), which explains GPT-NeoX and GPT-2 and any config the fast path does not cover.

    .venv/bin/python benchmarks/explain_paths.py [--generated 32] [--repeats 2] [--threads 1]
    .venv/bin/python benchmarks/explain_paths.py --smoke        # 8 generated tokens, 1 repeat: checks it runs
    .venv/bin/python benchmarks/explain_paths.py --random-config gemma-3-270m   # Gemma 3 270M's shape, random weights
    .venv/bin/python benchmarks/explain_paths.py --paths fast --methods saliency,attention   # one path, some methods

`--random-config gemma-3-270m` builds a Gemma3ForCausalLM with Gemma 3 270M's config (hidden 640, 18 layers of 4
query heads of 256 in one key/value group, MLP 2,048, vocabulary 262,144, sliding window 512 on five layers of
six, GELU-tanh, q/k norms, tied embeddings) and random weights, in memory, with a word-level tokenizer of its
vocabulary: the speed of the paths does not depend on the weights. `--paths fast` alone times one path, e.g. to
compare two checkouts' fast path (run the script once with each on PYTHONPATH, alternating).

Both paths run `explainers.engine.explain` (no cache) on one model object loaded with `load_model` (float32, SDPA),
the general one as `dataclasses.replace(loaded, force_general_path=True)`, alternating per repeat so that a burst of
other work on the machine hits both. A sequence is a prompt of 64 fixed random token ids (numpy seed 0, from [100,
vocab)) followed by `--generated` ones, all explained. Reported per method: median wall time of each path and the
ratio general / fast, each also in the process's CPU time (on a machine shared with other work, CPU time is what
the path itself spent; wall time adds whatever the scheduler gave to others), and the largest difference between
the two paths' attributions relative to the largest attribution (the paths are both exact: this is float32
rounding). Perturbation methods share their code between the paths (both run the module with its KV cache), so
their ratio shows the cost of the forward passes only.
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING

import bench_util
import numpy as np
import torch
from bench_util import JsonDict, markdown_table

if TYPE_CHECKING:
    from explainers.model import LoadedModel

PROMPT_TOKENS = 64
PATHS = ("fast", "general")
RANDOM_CONFIGS = ("gemma-3-270m",)
METHODS: tuple[tuple[str, dict[str, object]], ...] = (
    ("saliency", {}),
    ("input_x_gradient", {}),
    ("integrated_gradients", {"steps": 8}),
    ("gradient_x_activation", {"layer": 15}),
    ("occlusion", {"replacement": "unk"}),
    ("attention", {}),
    ("logit_lens", {}),
)


def measure(loaded: LoadedModel, generated: int, repeats: int, methods: list[str], paths: list[str]) -> JsonDict:
    from explainers.engine import explain

    by_path = {"fast": loaded, "general": dataclasses.replace(loaded, force_general_path=True)}
    rng = np.random.default_rng(0)
    ids = rng.integers(100, loaded.vocab_size, PROMPT_TOKENS + generated).tolist()
    prompt, output = ids[:PROMPT_TOKENS], ids[PROMPT_TOKENS:]
    rows = []
    for method, params in METHODS:
        if method not in methods:
            continue
        if method == "gradient_x_activation":
            params = {"layer": loaded.num_layers // 2}
        seconds: dict[str, list[float]] = {name: [] for name in paths}
        cpu_seconds: dict[str, list[float]] = {name: [] for name in paths}
        results: dict[str, np.ndarray] = {}
        for _ in range(repeats):
            for name in paths:
                started, cpu_started = time.perf_counter(), time.process_time()
                explanation = explain(by_path[name], None, prompt, output, [(method, params)], None)
                seconds[name].append(time.perf_counter() - started)
                cpu_seconds[name].append(time.process_time() - cpu_started)
                result = explanation.results[0]
                packed = result.attributions if result.HasField("attributions") else result.extras["target_logprobs"]
                results[name] = np.array(packed.float_values, dtype=np.float32)
        row: JsonDict = {"method": method, "params": params, "all_seconds": seconds, "all_cpu_seconds": cpu_seconds}
        for name in paths:
            row[f"{name}_s"] = statistics.median(seconds[name])
            row[f"{name}_cpu_s"] = statistics.median(cpu_seconds[name])
        if len(paths) == 2:
            scale = float(np.abs(results["fast"]).max()) or 1.0
            row["general_over_fast"] = row["general_s"] / row["fast_s"]
            row["general_over_fast_cpu"] = row["general_cpu_s"] / row["fast_cpu_s"]
            row["max_relative_difference"] = float(np.abs(results["fast"] - results["general"]).max()) / scale
        rows.append(row)
        timings = (f"{name} {row[name + '_s']:.3f} s ({row[name + '_cpu_s']:.3f} s CPU)" for name in paths)
        print(f"{method}: " + ", ".join(timings), file=sys.stderr)
    return {
        "model": loaded.model_name,
        "architecture": loaded.architecture.model_type,
        "paths": paths,
        "prompt_tokens": PROMPT_TOKENS,
        "generated": generated,
        "methods": rows,
    }


def random_gemma_3_270m() -> LoadedModel:
    """A Gemma3ForCausalLM of Gemma 3 270M's shape (its published config) with random weights, float32, loaded as
    load_model loads a directory, but built in memory (its float32 checkpoint would be 1.07 GB)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import AutoModelForCausalLM, Gemma3TextConfig, PreTrainedTokenizerFast

    from explainers.model import LoadedModel, attention_implementation

    config = Gemma3TextConfig(
        vocab_size=262144,
        hidden_size=640,
        intermediate_size=2048,
        num_hidden_layers=18,
        num_attention_heads=4,
        num_key_value_heads=1,
        head_dim=256,
        max_position_embeddings=32768,
        sliding_window=512,
        query_pre_attn_scalar=256,
        # Rotary bases: transformers' defaults, 10^6 for the full layers and 10^4 for the sliding ones, as 270M has.
        rms_norm_eps=1e-6,
        tie_word_embeddings=True,
    )
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(  # type: ignore[no-untyped-call]
        config, attn_implementation=attention_implementation(config)
    )
    model.train(False)
    model.requires_grad_(False)
    words = Tokenizer(models.WordLevel(vocab={f"w{i}": i for i in range(config.vocab_size)}, unk_token="w0"))
    words.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=words, unk_token="w0")  # type: ignore[no-untyped-call]
    return LoadedModel(
        model=model,
        tokenizer=tokenizer,
        weights_digest="random",
        model_name="gemma-3-270m config, random weights",
        num_layers=config.num_hidden_layers,
    )


def render_markdown(result: JsonDict) -> str:
    paths = result.get("paths", list(PATHS))
    both = len(paths) == 2
    rows = [
        [
            row["method"],
            *(bench_util.fmt(row[f"{name}_s"], 3) for name in paths),
            *(bench_util.fmt(row.get(f"{name}_cpu_s"), 3) for name in paths),
            *(
                (
                    bench_util.fmt(row["general_over_fast"], 2),
                    bench_util.fmt(row.get("general_over_fast_cpu"), 2),
                    f"{row['max_relative_difference']:.1e}",
                )
                if both
                else ()
            ),
        ]
        for row in result["methods"]
    ]
    heading = (
        f"{result['model']}, {result['prompt_tokens']} prompt + {result['generated']} generated tokens, all explained; "
        f"median of {result['repeats']}, {result['threads']} thread(s)."
    )
    columns = [f"{name} path (s)" for name in paths] + [f"{name} path, CPU (s)" for name in paths]
    columns += ["general / fast", "general / fast, CPU", "max rel. diff"] if both else []
    return heading + "\n\n" + markdown_table(["method", *columns], rows)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--generated", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--model-dir", type=Path, default=None)
    parser.add_argument("--random-config", choices=RANDOM_CONFIGS, default=None, help="a model of this shape, random")
    parser.add_argument("--methods", default=",".join(method for method, _ in METHODS), help="comma-separated")
    parser.add_argument("--paths", default=",".join(PATHS), help="fast, general or both (comma-separated)")
    parser.add_argument("--smoke", action="store_true", help="8 generated tokens, 1 repeat; no timing claims")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    from explainers.embedded_model import default_model_dir
    from explainers.model import load_model

    torch.set_num_threads(args.threads)
    generated, repeats = (8, 1) if args.smoke else (args.generated, args.repeats)
    methods, paths = args.methods.split(","), [path for path in PATHS if path in args.paths.split(",")]
    loaded = random_gemma_3_270m() if args.random_config else load_model(args.model_dir or default_model_dir())
    result: JsonDict = {
        "benchmark": "explain_paths",
        "command": bench_util.command_line("explain_paths.py", sys.argv[1:] if argv is None else argv),
        "environment": bench_util.environment(),
        "smoke": args.smoke,
        "repeats": repeats,
        "threads": args.threads,
        **measure(loaded, generated, repeats, methods, paths),
    }
    name = "explain_paths_smoke.json" if args.smoke else "explain_paths.json"
    if args.random_config and not args.smoke:
        name = f"explain_paths_{args.random_config}.json"
    bench_util.write_result(args.out or bench_util.RESULTS_DIR / name, result)
    print(render_markdown(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
