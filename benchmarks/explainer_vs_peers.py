"""Sightline's explainer against Inseq 0.7.1 and Captum 0.9 on the same token ids, side by side.

    python benchmarks/explainer_vs_peers.py [--smoke] [--model NAME] [--repeats N] [--out DIR]

Workload: the France question ("What is the capital of France?") rendered with the embedded model's chat template
(SmolLM2-135M-Instruct, 37 prompt tokens with its default system prompt), then a forced continuation of 24 tokens
generated greedily once with transformers (`min_new_tokens` keeps it from stopping early). Every side attributes
every one of the 24 generated tokens to the tokens before it, from exactly these ids: Sightline gets them as ids,
Inseq and Captum get the decoded text and their tokenisation is checked to give back the same ids (the run fails
otherwise). The peers treat the tokenizer's pad token as padding, and SmolLM2's pad is `<|im_end|>`, which the chat
template uses, so the peers get pad = unk = `<|endoftext|>` (id 0), which the sequence never contains (checked).

`--model gemma-3-270m` runs the same on the second embedded model, Gemma 3 270M, a base model without chat template:
the prompt is the completion "Question: What is the capital of France?\nAnswer:" with the <bos> its tokenizer
prepends (13 tokens). The peers get the text without that <bos> (their tokenizers prepend it again; the ids are
checked as above), pad = unk = `<unk>` (id 3), and the baseline / replacement token is that unk too.

Sides, each in a fresh subprocess (`--smoke`: all in one, to stay fast) with torch.set_num_threads(2):

* Sightline `explain()` with cache=None: saliency, input_x_gradient, integrated_gradients (16 Gauss-Legendre steps
  from a baseline of token 0, as Inseq's and Captum's defaults), attention (mean over layers and heads), occlusion
  (replacement token 0, as Inseq's and Captum's baselines). And attention_warm: attention again, with a
  HiddenStateCache on a redis-server started for the run, filled by one call at setup, so every timed call is a
  cache hit (the explainer's path for a generation explained again).
* Inseq: the same five methods, target log-probability (`attributed_fn="probability", logprob=True`),
  `include_eos_baseline=True` (else its baseline keeps `<|im_end|>` where the input has it), Captum's IG with
  `n_steps=16`. The model is loaded with eager attention, as `inseq.load_model` does by default.
* Captum: `LLMGradientAttribution(LayerIntegratedGradients)` on the embedding layer (16 steps),
  `LLMAttribution(FeatureAblation)` with `use_cached_outputs=False` (token by token, its default; and
  `forward_in_tokens=False`, one pass over prompt + target), and `InputXGradient` on the input embeddings, one call
  per generated token. Captum's LLM wrappers attribute to the prompt tokens only, never to earlier generated ones.

Correctness: every peer result is compared with Sightline's on the same cells before any time is compared, raw,
before any normalisation: saliency as the L2 norm over the hidden dimension, input x gradient and IG summed over
it, attention averaged over layers and heads; Inseq's occlusion is |score change| (it takes the absolute value),
so it is compared with |Sightline|. Captum's LayerIntegratedGradients keeps earlier generated tokens at their real
embeddings (only the prompt is interpolated), so only its first target means the same as Sightline's IG and only
that row is compared. A check passes when max |Sightline - peer| <= tolerance x max |peer| over the compared cells.
A ratio counts towards a target only when its check passed.

Timing: one warm-up call (counted as a timed call when it takes over 20 s), then the median of --repeats calls
(fewer once a method's sides have spent --group-budget-s on repeats) of each side's attribution (Sightline: the whole
`explain()`, step scores and fidelity included; peers: their `attribute()` call). Memory: ru_maxrss of the side's
own process (imports and model load included), and its growth over the RSS right after setup.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, cast

import bench_util

REPO_ROOT = Path(__file__).resolve().parent.parent
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

from explainers.embedded_model import EMBEDDED_MODELS, MODEL_NAME, prepare_model  # noqa: E402

QUESTION = "What is the capital of France?"
# A base model's prompt (no chat template): the same question as a completion.
COMPLETION_PROMPT = f"Question: {QUESTION}\nAnswer:"
NUM_OUTPUT_TOKENS = 24
SMOKE_OUTPUT_TOKENS = 4
IG_STEPS = 16
NUM_THREADS = 2
# A warm-up call longer than this is also a timed call (see run_group).
LONG_CALL_S = 20.0
# The baseline / replacement token every side uses: Inseq's baseline is the tokenizer's unk token, Captum's
# TextTokenInput defaults to id 0 (and is given the unk id), and Sightline takes it as a parameter. SmolLM2's and the
# smoke model's unk is 0; Gemma's is 3 (Workload.baseline_token_id).
# A check passes when max |sightline - peer| <= tolerance * max |peer| over the compared cells.
TOLERANCE = 1e-3
# Sightline's attention reads hidden states at the cache's bfloat16 precision (explainers/engine.py).
ATTENTION_TOLERANCE = 5e-3

# The issue's targets: minimum peer_time / sightline_time.
TARGETS: dict[tuple[str, str], float] = {
    ("saliency", "inseq/saliency"): 5.0,
    ("input_x_gradient", "inseq/input_x_gradient"): 5.0,
    ("integrated_gradients", "inseq/integrated_gradients"): 3.0,
    ("integrated_gradients", "captum/layer_integrated_gradients"): 3.0,
    ("occlusion", "inseq/occlusion"): 25.0,
    ("occlusion", "captum/feature_ablation"): 15.0,
    ("attention", "inseq/attention"): 1.0,
    ("attention_warm", "inseq/attention"): 2.0,
}


@dataclass(frozen=True)
class Workload:
    model_dir: str
    prompt_ids: list[int]
    output_ids: list[int]
    prompt_text: str
    full_text: str
    repeats: int
    warm_up: bool
    group_budget_s: float
    smoke: bool
    redis_url: str  # the warm-cache side's hidden-state cache
    model_name: str
    # The tokenizer's unk token: the peers' pad and every side's baseline / replacement token.
    baseline_token_id: int


@dataclass(frozen=True)
class Comparison:
    """One peer side checked and timed against one Sightline method."""

    method: str  # Sightline's method name
    peer: str  # side name
    # Which targets (rows) the two sides define identically; None: all.
    rows: int | None = None
    absolute: bool = False  # compare |sightline| (the peer reports absolute values)
    tolerance: float = TOLERANCE
    note: str = ""


COMPARISONS = (
    Comparison("saliency", "inseq/saliency", note="L2 over hidden"),
    Comparison("input_x_gradient", "inseq/input_x_gradient", note="sum over hidden"),
    Comparison("input_x_gradient", "captum/input_x_gradient", note="sum over hidden"),
    Comparison("integrated_gradients", "inseq/integrated_gradients", note="sum over hidden"),
    Comparison(
        "integrated_gradients",
        "captum/layer_integrated_gradients",
        rows=1,
        note="sum over hidden; first target only (Captum interpolates the prompt only), prompt columns",
    ),
    Comparison("attention", "inseq/attention", tolerance=ATTENTION_TOLERANCE, note="mean over layers and heads"),
    Comparison("attention_warm", "inseq/attention", tolerance=ATTENTION_TOLERANCE, note="mean over layers and heads"),
    Comparison("occlusion", "inseq/occlusion", absolute=True, note="Inseq returns |score change|"),
    Comparison("occlusion", "captum/feature_ablation", note="prompt columns"),
    Comparison("occlusion", "captum/feature_ablation_by_seq", note="prompt columns"),
)
SIGHTLINE_METHODS = ("saliency", "input_x_gradient", "integrated_gradients", "attention", "occlusion")


# --------------------------------------------------------------------------------------------------------------
# Worker side: one process runs one or more sides and reports times, memory and attribution matrices.


@dataclass
class Prepared:
    """A side ready to run: `run` is what is timed, `to_matrix` turns its output into Sightline's layout
    [num_targets, num_tokens - 1] (NaN where the side computes nothing)."""

    run: Callable[[], object]
    to_matrix: Callable[[object], Any]  # -> torch.Tensor
    config: dict[str, object] = field(default_factory=dict)


def _quiet() -> None:
    warnings.filterwarnings("ignore")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import transformers

    transformers.utils.logging.set_verbosity_error()  # type: ignore[no-untyped-call]
    transformers.utils.logging.disable_progress_bar()  # type: ignore[no-untyped-call]


def _peer_model(workload: Workload, attn_implementation: str) -> tuple[Any, Any]:
    """(model, tokenizer) loaded with transformers for a peer, pad = unk (see the module docstring)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(workload.model_dir, local_files_only=True)
    model = AutoModelForCausalLM.from_pretrained(
        workload.model_dir, local_files_only=True, attn_implementation=attn_implementation
    )
    model.train(False)
    if tokenizer.unk_token_id != workload.baseline_token_id:
        raise RuntimeError(f"expected unk token id {workload.baseline_token_id}, got {tokenizer.unk_token_id}")
    tokenizer.pad_token = tokenizer.unk_token
    model.config.pad_token_id = tokenizer.unk_token_id
    if workload.baseline_token_id in workload.prompt_ids + workload.output_ids:
        raise RuntimeError(f"token {workload.baseline_token_id} (the peers' pad) occurs in the sequence")
    return model, tokenizer


def _sightline(method: str, warm_cache: bool = False) -> Callable[[Workload], Prepared]:
    """Sightline's explain() of `method`, cold (no cache: the engine's own forward pass every call) or, with
    warm_cache, on a hidden-state cache filled before the timed calls (every timed call a hit)."""

    def prepare(workload: Workload) -> Prepared:
        import numpy as np
        import redis
        import torch

        from explainers.engine import explain
        from explainers.hidden_cache import HiddenStateCache
        from explainers.model import load_model

        loaded = load_model(Path(workload.model_dir))
        cache = HiddenStateCache(redis.Redis.from_url(workload.redis_url), 3600, "bench") if warm_cache else None
        params: dict[str, object] = {
            "integrated_gradients": {
                "steps": IG_STEPS,
                "baseline": "token",
                "baseline_token_id": workload.baseline_token_id,
                "quadrature": "gausslegendre",
            },
            "occlusion": {"replacement": "token", "replacement_token_id": workload.baseline_token_id},
        }.get(method, {})

        def run() -> object:
            explanation = explain(loaded, cache, workload.prompt_ids, workload.output_ids, [(method, params)], None)
            if warm_cache and not explanation.cache_hit:
                raise RuntimeError(f"sightline/{method} with a warm cache missed it")
            return explanation

        def to_matrix(output: object) -> torch.Tensor:
            packed = cast(Any, output).results[0].attributions
            values = np.array(packed.float_values, dtype=np.float32).reshape(tuple(packed.shape))
            return torch.from_numpy(values.astype(np.float64))

        if warm_cache:
            explain(loaded, cache, workload.prompt_ids, workload.output_ids, [(method, params)], None)
        cache_config = "warm: filled by one call at setup, every timed call a hit" if warm_cache else None
        return Prepared(run, to_matrix, {"params": params, "attn_implementation": "sdpa", "cache": cache_config})

    return prepare


def _inseq(method: str) -> Callable[[Workload], Prepared]:
    def prepare(workload: Workload) -> Prepared:
        import inseq
        import torch

        model, tokenizer = _peer_model(workload, "eager")
        attribution_model = inseq.load_model(model, method, tokenizer=tokenizer)
        encoded = attribution_model.encode(workload.full_text).input_ids[0].tolist()
        expected = workload.prompt_ids + workload.output_ids
        if encoded != expected:
            raise RuntimeError(f"Inseq tokenises the text differently:\n{encoded}\n!=\n{expected}")
        kwargs: dict[str, object] = {}
        if method != "attention":
            kwargs.update(attributed_fn="probability", logprob=True)
        if method in ("integrated_gradients", "occlusion"):
            kwargs["include_eos_baseline"] = True
        if method == "integrated_gradients":
            # Captum's IG integrates with Gauss-Legendre by default; Inseq's own `method` argument is taken.
            kwargs["n_steps"] = IG_STEPS

        def run() -> object:
            return attribution_model.attribute(
                input_texts=workload.prompt_text,
                generated_texts=workload.full_text,
                show_progress=False,
                **kwargs,
            )

        def to_matrix(output: object) -> torch.Tensor:
            sequence = cast(Any, output).sequence_attributions[0]
            ids = [token.id for token in sequence.target]
            if ids != expected or sequence.attr_pos_start != len(workload.prompt_ids):
                raise RuntimeError(f"Inseq attributed other ids or positions: {ids}, {sequence.attr_pos_start}")
            raw = sequence.target_attributions.to(torch.float64)  # [num_tokens, num_targets, ...]
            num_prompt, num_targets = len(workload.prompt_ids), len(workload.output_ids)
            matrix = torch.zeros(num_targets, len(expected) - 1, dtype=torch.float64)
            for target in range(num_targets):
                cells = raw[: num_prompt + target, target]
                if method == "saliency":
                    row = torch.linalg.vector_norm(cells, dim=-1)
                elif method == "attention":
                    row = cells.mean(dim=(-2, -1))
                elif method == "occlusion":
                    row = cells
                else:
                    row = cells.sum(dim=-1)
                matrix[target, : num_prompt + target] = row
            return matrix

        config: dict[str, object] = {"attn_implementation": "eager", **kwargs}
        return Prepared(run, to_matrix, config)

    return prepare


def _captum_llm_matrix(workload: Workload, token_attr: Any) -> Any:
    import torch

    num_prompt = len(workload.prompt_ids)
    matrix = torch.full(
        (len(workload.output_ids), num_prompt + len(workload.output_ids) - 1), math.nan, dtype=torch.float64
    )
    matrix[:, :num_prompt] = token_attr.to(torch.float64)
    return matrix


def _captum_text_input(workload: Workload, tokenizer: Any) -> Any:
    from captum.attr import TextTokenInput

    text_input = TextTokenInput(workload.prompt_text, tokenizer, baselines=workload.baseline_token_id)
    if text_input.inp_tensor[0].tolist() != workload.prompt_ids:
        raise RuntimeError(f"Captum tokenises the prompt differently: {text_input.inp_tensor[0].tolist()}")
    return text_input


def _captum_lig(workload: Workload) -> Prepared:
    import torch
    from captum.attr import LayerIntegratedGradients, LLMGradientAttribution

    model, tokenizer = _peer_model(workload, "sdpa")
    attribution = LLMGradientAttribution(LayerIntegratedGradients(model, model.get_input_embeddings()), tokenizer)
    text_input = _captum_text_input(workload, tokenizer)
    target = torch.tensor(workload.output_ids)

    def run() -> object:
        return attribution.attribute(text_input, target=target, n_steps=IG_STEPS, method="gausslegendre")

    def to_matrix(output: object) -> Any:
        return _captum_llm_matrix(workload, cast(Any, output).token_attr)

    config = {"n_steps": IG_STEPS, "method": "gausslegendre", "baselines": f"token {workload.baseline_token_id}"}
    return Prepared(run, to_matrix, config)


def _captum_feature_ablation(forward_in_tokens: bool) -> Callable[[Workload], Prepared]:
    def prepare(workload: Workload) -> Prepared:
        import torch
        from captum.attr import FeatureAblation, LLMAttribution

        model, tokenizer = _peer_model(workload, "sdpa")
        attribution = LLMAttribution(FeatureAblation(model), tokenizer)
        text_input = _captum_text_input(workload, tokenizer)
        target = torch.tensor(workload.output_ids)

        def run() -> object:
            # FeatureAblation runs its forward passes under torch.no_grad() itself.
            return attribution.attribute(
                text_input, target=target, use_cached_outputs=False, forward_in_tokens=forward_in_tokens
            )

        def to_matrix(output: object) -> Any:
            return _captum_llm_matrix(workload, cast(Any, output).token_attr)

        config: dict[str, object] = {"use_cached_outputs": False, "forward_in_tokens": forward_in_tokens}
        return Prepared(run, to_matrix, config)

    return prepare


def _captum_input_x_gradient(workload: Workload) -> Prepared:
    import torch
    from captum.attr import InputXGradient

    model, _ = _peer_model(workload, "sdpa")
    sequence = torch.tensor([workload.prompt_ids + workload.output_ids])
    num_prompt = len(workload.prompt_ids)

    def target_log_prob(inputs_embeds: torch.Tensor, target_id: int) -> torch.Tensor:
        logits = model(inputs_embeds=inputs_embeds).logits[:, -1]
        return torch.log_softmax(logits, dim=-1)[:, target_id]

    input_x_gradient = InputXGradient(target_log_prob)

    def run() -> object:
        rows = []
        for target, target_id in enumerate(workload.output_ids):
            with torch.no_grad():
                embeddings = model.get_input_embeddings()(sequence[:, : num_prompt + target])
            attributions = input_x_gradient.attribute(embeddings, additional_forward_args=(target_id,))
            rows.append(attributions[0].sum(dim=-1).detach())
        return rows

    def to_matrix(output: object) -> torch.Tensor:
        rows = cast(list[torch.Tensor], output)
        matrix = torch.zeros(len(rows), sequence.shape[1] - 1, dtype=torch.float64)
        for target, row in enumerate(rows):
            matrix[target, : len(row)] = row.to(torch.float64)
        return matrix

    return Prepared(run, to_matrix, {"one call per target": True})


SIDES: dict[str, Callable[[Workload], Prepared]] = {
    **{f"sightline/{method}": _sightline(method) for method in SIGHTLINE_METHODS},
    "sightline/attention_warm": _sightline("attention", warm_cache=True),
    **{f"inseq/{method}": _inseq(method) for method in SIGHTLINE_METHODS},
    "captum/layer_integrated_gradients": _captum_lig,
    "captum/feature_ablation": _captum_feature_ablation(forward_in_tokens=True),
    "captum/feature_ablation_by_seq": _captum_feature_ablation(forward_in_tokens=False),
    "captum/input_x_gradient": _captum_input_x_gradient,
}
# Each Sightline method with its peers; a group's sides run interleaved (see run_group).
GROUPS = (
    ("sightline/saliency", "inseq/saliency"),
    ("sightline/input_x_gradient", "inseq/input_x_gradient", "captum/input_x_gradient"),
    ("sightline/integrated_gradients", "inseq/integrated_gradients", "captum/layer_integrated_gradients"),
    ("sightline/attention", "sightline/attention_warm", "inseq/attention"),
    ("sightline/occlusion", "inseq/occlusion", "captum/feature_ablation", "captum/feature_ablation_by_seq"),
)


def _current_rss_kib() -> int:
    with open("/proc/self/statm") as statm:
        resident_pages = int(statm.read().split()[1])
    return resident_pages * os.sysconf("SC_PAGE_SIZE") // 1024


def run_worker(workload_path: Path) -> None:
    """Serve one JSON command per stdin line, one JSON reply per stdout line: setup / run / finish a side, exit.

    Library output that would go to stdout goes to stderr, so the protocol stream stays clean.
    """
    protocol = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)
    _quiet()
    import torch

    torch.set_num_threads(NUM_THREADS)
    workload = Workload(**json.loads(workload_path.read_text()))
    prepared: dict[str, Prepared] = {}
    outputs: dict[str, object] = {}
    rss_after_setup: dict[str, int] = {}
    for line in sys.stdin:
        command, side = json.loads(line)
        reply: dict[str, object] = {}
        if command == "setup":
            prepared[side] = SIDES[side](workload)
            rss_after_setup[side] = _current_rss_kib()
        elif command == "run":
            wall, cpu = time.perf_counter(), time.process_time()
            outputs[side] = prepared[side].run()
            reply = {"wall_s": time.perf_counter() - wall, "cpu_s": time.process_time() - cpu}
        elif command == "finish":
            peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
            reply = {
                "matrix": prepared[side].to_matrix(outputs[side]).tolist(),
                "peak_rss_mib": peak / 1024,
                "rss_after_setup_mib": rss_after_setup[side] / 1024,
                "rss_growth_mib": (peak - rss_after_setup[side]) / 1024,
                "config": prepared[side].config,
            }
        else:
            break
        protocol.write(json.dumps(reply) + "\n")


class Worker:
    """A worker subprocess (run_worker) hosting one or more sides."""

    def __init__(self, workload_path: Path) -> None:
        command = [sys.executable, str(Path(__file__).resolve()), "--worker", "--workload", str(workload_path)]
        env = {**os.environ, "OMP_NUM_THREADS": str(NUM_THREADS), "MKL_NUM_THREADS": str(NUM_THREADS)}
        self.process = subprocess.Popen(
            command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env, cwd=REPO_ROOT
        )

    def call(self, command: str, side: str = "") -> dict[str, Any]:
        assert self.process.stdin is not None and self.process.stdout is not None
        self.process.stdin.write(json.dumps([command, side]) + "\n")
        self.process.stdin.flush()
        line = self.process.stdout.readline()
        if not line:
            raise RuntimeError(f"worker for {side} died during {command!r} (exit code {self.process.wait()})")
        return cast(dict[str, Any], json.loads(line))

    def close(self) -> None:
        assert self.process.stdin is not None
        self.process.stdin.write(json.dumps(["exit", ""]) + "\n")
        self.process.stdin.close()
        self.process.wait()


def run_group(group: list[str], workload: Workload, workload_path: Path, shared: Worker | None) -> dict[str, Any]:
    """Set every side of the group up, warm each up once, then run them in rounds (side order rotating each
    round), so that each round's sides see about the same background load; then collect their results.

    A warm-up call longer than LONG_CALL_S also counts as that side's first timed call (first-call costs are well
    under a second), and rounds stop early once the group has spent workload.group_budget_s on them, when every
    side has at least one timed call: a peer taking minutes per call gets fewer repeats, not a longer run.
    """
    workers = {side: shared or Worker(workload_path) for side in group}
    try:
        for side in group:
            workers[side].call("setup", side)
        load_before = os.getloadavg()
        runs: dict[str, list[dict[str, float]]] = {side: [] for side in group}
        warm_up: dict[str, float | None] = dict.fromkeys(group)
        if workload.warm_up:
            for side in group:
                call = workers[side].call("run", side)
                warm_up[side] = call["wall_s"]
                if call["wall_s"] > LONG_CALL_S:
                    runs[side].append({**call, "round": -1})
        rounds_started = time.perf_counter()
        for round_index in range(workload.repeats):
            if min(map(len, runs.values())) >= 1 and time.perf_counter() - rounds_started > workload.group_budget_s:
                break
            for offset in range(len(group)):
                side = group[(round_index + offset) % len(group)]
                if len(runs[side]) < workload.repeats:
                    runs[side].append({**workers[side].call("run", side), "round": round_index})
        results = {}
        for side in group:
            walls = [run["wall_s"] for run in runs[side]]
            cpus = [run["cpu_s"] for run in runs[side]]
            results[side] = {
                "warm_up_s": warm_up[side],
                "wall_s": walls,
                "cpu_s": cpus,
                "rounds": [run["round"] for run in runs[side]],
                "median_s": statistics.median(walls),
                "median_cpu_s": statistics.median(cpus),
                "load_average_before": load_before,
                **workers[side].call("finish", side),
            }
            print(f"  {side}: median {results[side]['median_s']:.3f} s of {walls}", file=sys.stderr, flush=True)
        return results
    finally:
        if shared is None:
            for worker in workers.values():
                worker.close()


# --------------------------------------------------------------------------------------------------------------
# Parent side: the workload, the subprocesses, the checks, the report.


def _chat_prompt_ids(tokenizer: Any) -> list[int]:
    rendered = tokenizer.apply_chat_template(
        [{"role": "user", "content": QUESTION}], add_generation_prompt=True, tokenize=True
    )
    ids = rendered["input_ids"] if not isinstance(rendered, list) else rendered
    return [int(token) for token in ids]


def _build_smoke_model(model_dir: Path) -> list[int]:
    """A tiny random Llama with a word-level tokenizer saved to model_dir; returns prompt ids.

    Ids 0, 1, 2 are <unk>, <s>, </s>; id i >= 3 is the word "w{i}".
    """
    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import AutoModelForCausalLM, LlamaConfig, PreTrainedTokenizerFast

    vocab_size = 64
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{f"w{i}": i for i in range(3, vocab_size)}}
    word_level = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    word_level.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = PreTrainedTokenizerFast(  # type: ignore[no-untyped-call]
        tokenizer_object=word_level, unk_token="<unk>", bos_token="<s>", eos_token="</s>", pad_token="<unk>"
    )
    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        initializer_range=0.3,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
    )
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config)  # type: ignore[no-untyped-call]
    model.save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    return [3, 17, 42, 8, 61, 25]


def build_workload(
    smoke: bool,
    repeats: int,
    scratch: Path,
    redis_url: str,
    group_budget_s: float = 300.0,
    model_name: str = MODEL_NAME,
    num_output: int = NUM_OUTPUT_TOKENS,
) -> Workload:
    """The prompt ids and a greedy continuation generated once; every side attributes exactly these ids."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if smoke:
        model_dir = scratch / "tiny-llama"
        prompt_ids = _build_smoke_model(model_dir)
        num_output = SMOKE_OUTPUT_TOKENS
        model_name = "tiny random Llama"
    else:
        model_dir = prepare_model(model=model_name).model_dir
        prompt_ids = []
    tokenizer = AutoTokenizer.from_pretrained(model_dir, local_files_only=True)
    model: Any = AutoModelForCausalLM.from_pretrained(model_dir, local_files_only=True)
    model.train(False)
    if not smoke:
        # An instruction model's chat template, else (a base model) the completion prompt, <bos> included.
        prompt_ids = _chat_prompt_ids(tokenizer) if tokenizer.chat_template else tokenizer(COMPLETION_PROMPT).input_ids
    with torch.no_grad():
        generated = model.generate(
            torch.tensor([prompt_ids]),
            attention_mask=torch.ones(1, len(prompt_ids), dtype=torch.long),
            max_new_tokens=num_output,
            min_new_tokens=num_output,
            do_sample=False,
            # The peers' pad token must not occur (see the module docstring); greedy never picks it on the
            # embedded model, so this only matters for the random smoke model.
            suppress_tokens=[tokenizer.unk_token_id],
        )
    output_ids = [int(token) for token in generated[0, len(prompt_ids) :]]
    # The peers encode the text with the special tokens their tokenizer adds: where that is a leading <bos> (Gemma),
    # the text leaves it out, or they would attribute from two.
    adds_bos = tokenizer("a").input_ids[:1] == [tokenizer.bos_token_id]
    skipped = 1 if adds_bos and prompt_ids[:1] == [tokenizer.bos_token_id] else 0

    def decode(ids: list[int]) -> str:
        text = tokenizer.decode(ids[skipped:], skip_special_tokens=False, clean_up_tokenization_spaces=False)
        return str(text)

    return Workload(
        model_dir=str(model_dir),
        prompt_ids=prompt_ids,
        output_ids=output_ids,
        prompt_text=decode(prompt_ids),
        full_text=decode(prompt_ids + output_ids),
        repeats=repeats,
        # The smoke run only checks that every side still executes; it skips the warm-up to stay under a minute.
        warm_up=not smoke,
        group_budget_s=group_budget_s,
        smoke=smoke,
        redis_url=redis_url,
        model_name=model_name,
        baseline_token_id=int(tokenizer.unk_token_id),
    )


def check(comparison: Comparison, sides: dict[str, dict[str, Any]], workload: Workload) -> dict[str, object]:
    import torch

    ours = torch.tensor(sides[f"sightline/{comparison.method}"]["matrix"], dtype=torch.float64)
    peer = torch.tensor(sides[comparison.peer]["matrix"], dtype=torch.float64)
    if comparison.absolute:
        ours = ours.abs()
    rows = comparison.rows or ours.shape[0]
    positions = len(workload.prompt_ids) + torch.arange(ours.shape[0])
    # A target's own and later positions are 0 by definition on both sides; the peer may leave cells out (NaN).
    compared = (torch.arange(ours.shape[1])[None, :] < positions[:, None]) & ~peer.isnan()
    compared[rows:] = False
    difference = float((ours - peer).abs()[compared].max())
    scale = float(peer.abs()[compared].max())
    allowed = comparison.tolerance * scale
    return {
        "passed": difference <= allowed,
        "max_abs_diff": difference,
        "max_abs_peer": scale,
        "tolerance": comparison.tolerance,
        "allowed_abs_diff": allowed,
        "targets_compared": rows,
        "cells_compared": int(compared.sum()),
        "aggregation": comparison.note,
    }


def _same_round_ratio(peer: dict[str, Any], ours: dict[str, Any]) -> float:
    """Median of peer / Sightline over the rounds (the warm-up round is -1) both sides ran a timed call in; the
    ratio of medians when they share none."""
    ours_by_round = dict(zip(ours["rounds"], ours["wall_s"], strict=True))
    ratios = [
        wall / ours_by_round[r] for r, wall in zip(peer["rounds"], peer["wall_s"], strict=True) if r in ours_by_round
    ]
    return statistics.median(ratios) if ratios else float(peer["median_s"] / ours["median_s"])


def report(sides: dict[str, dict[str, Any]], workload: Workload, smoke: bool) -> dict[str, Any]:
    rows = []
    for comparison in COMPARISONS:
        if f"sightline/{comparison.method}" not in sides:
            continue
        ours = sides[f"sightline/{comparison.method}"]
        peer = sides[comparison.peer]
        correctness = check(comparison, sides, workload)
        ratio = peer["median_s"] / ours["median_s"]
        # Same-round ratios: robust to background load that drifts between rounds.
        paired = _same_round_ratio(peer, ours)
        target = TARGETS.get((comparison.method, comparison.peer))
        rows.append(
            {
                "method": comparison.method,
                "peer": comparison.peer,
                "sightline_median_s": ours["median_s"],
                "peer_median_s": peer["median_s"],
                "ratio_peer_over_sightline": ratio,
                "median_same_round_ratio": paired,
                "cpu_time_ratio": peer["median_cpu_s"] / ours["median_cpu_s"],
                "target_ratio": target,
                "target_met": None if target is None else bool(correctness["passed"]) and ratio >= target,
                "check": correctness,
            }
        )
    return {
        "workload": {
            "model": workload.model_name,
            "model_dir": workload.model_dir,
            "prompt_tokens": len(workload.prompt_ids),
            "output_tokens": len(workload.output_ids),
            "prompt_ids": workload.prompt_ids,
            "output_ids": workload.output_ids,
            "continuation": workload.full_text[len(workload.prompt_text) :],
            "smoke": smoke,
        },
        "settings": {
            "torch_threads": NUM_THREADS,
            "repeats": workload.repeats,
            "warm_up_calls": int(workload.warm_up),
            "ig_steps": IG_STEPS,
            "baseline_token_id": workload.baseline_token_id,
            "timing": "wall clock of one attribution call; a group's sides alternate in rounds (rotating order); "
            "ratio_peer_over_sightline = median(peer) / median(sightline); cpu_s = process CPU time of the call",
            "rss": "ru_maxrss of the side's own fresh process (imports and model load included); growth = that "
            "minus the RSS right after setup"
            if not smoke
            else "all sides share one process: ru_maxrss is cumulative",
        },
        "environment": _environment(),
        "comparisons": rows,
        "sides": {name: {k: v for k, v in side.items() if k != "matrix"} for name, side in sides.items()},
    }


def _environment() -> dict[str, object]:
    import importlib.metadata

    versions = {name: importlib.metadata.version(name) for name in ("torch", "transformers", "captum", "inseq")}
    return {
        "python": platform.python_version(),
        "cpu_count": os.cpu_count(),
        "load_average_at_end": os.getloadavg(),
        **versions,
    }


def markdown(results: dict[str, Any]) -> str:
    workload = results["workload"]
    lines = [
        f"Workload: {workload.get('model', MODEL_NAME)}, {workload['prompt_tokens']} prompt tokens + "
        f"{workload['output_tokens']} forced output tokens, "
        f"every output token attributed; {results['settings']['torch_threads']} torch threads; median of "
        f"{results['settings']['repeats']} after {results['settings']['warm_up_calls']} warm-up call(s).",
        "",
        "| method | peer | Sightline (s) | peer (s) | peer / Sightline | same-round / CPU-time ratio | target | met "
        "| check: max abs diff (allowed) | Sightline / peer peak RSS (MiB) |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: | --- | --- | ---: |",
    ]
    for row in results["comparisons"]:
        target = "" if row["target_ratio"] is None else f">= {row['target_ratio']:g}x"
        met = {None: "", True: "yes", False: "**no**"}[row["target_met"]]
        correctness = row["check"]
        verdict = "pass" if correctness["passed"] else "**FAIL**"
        ours = results["sides"][f"sightline/{row['method']}"]
        peer = results["sides"][row["peer"]]
        lines.append(
            f"| {row['method']} | {row['peer']} | {row['sightline_median_s']:.3f} | {row['peer_median_s']:.3f} | "
            f"{row['ratio_peer_over_sightline']:.2f}x | {row['median_same_round_ratio']:.2f}x / "
            f"{row['cpu_time_ratio']:.2f}x | {target} | {met} | {verdict}: "
            f"{correctness['max_abs_diff']:.2e} ({correctness['allowed_abs_diff']:.2e}) | "
            f"{ours['peak_rss_mib']:.0f} / {peer['peak_rss_mib']:.0f} |"
        )
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--smoke", action="store_true", help="tiny random Llama, 4 tokens, 1 repeat, no warm-up, one process"
    )
    parser.add_argument(
        "--model", choices=list(EMBEDDED_MODELS), default=MODEL_NAME, help="the embedded model (default %(default)s)"
    )
    parser.add_argument(
        "--output-tokens", type=int, default=NUM_OUTPUT_TOKENS, help="forced output tokens (default %(default)s)"
    )
    parser.add_argument("--repeats", type=int, default=None, help="timed calls per side (default 3; smoke 1)")
    parser.add_argument("--only", nargs="+", choices=[c.method for c in COMPARISONS], help="compare only these methods")
    parser.add_argument(
        "--group-budget-s", type=float, default=300.0, help="stop repeating a method's sides after this long"
    )
    parser.add_argument("--out", type=Path, default=REPO_ROOT / "benchmarks" / "results")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--workload", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        run_worker(args.workload)
        return

    _quiet()
    repeats = args.repeats or (1 if args.smoke else 3)
    with (
        tempfile.TemporaryDirectory(prefix="explainer-vs-peers-") as scratch_name,
        bench_util.redis_server() as redis_url,
    ):
        scratch = Path(scratch_name)
        workload = build_workload(
            args.smoke, repeats, scratch, redis_url, args.group_budget_s, args.model, args.output_tokens
        )
        print(
            f"{len(workload.prompt_ids)} prompt + {len(workload.output_ids)} output tokens; continuation: "
            f"{workload.full_text[len(workload.prompt_text) :]!r}",
            file=sys.stderr,
        )
        workload_path = scratch / "workload.json"
        workload_path.write_text(json.dumps(asdict(workload)))
        sides: dict[str, dict[str, Any]] = {}
        table = ""
        shared = Worker(workload_path) if args.smoke else None
        try:
            for group in GROUPS:
                if args.only is None or group[0].removeprefix("sightline/") in args.only:
                    sides.update(run_group(list(group), workload, workload_path, shared))
                    # After every group, so that a long run cut short keeps the groups it finished.
                    table = write_results(sides, workload, args)
        finally:
            if shared is not None:
                shared.close()
    print(table)


def write_results(sides: dict[str, dict[str, Any]], workload: Workload, args: argparse.Namespace) -> str:
    """Write the report of the sides run so far to benchmarks/results (JSON and its table); return the table."""
    results = report(sides, workload, args.smoke)
    table = markdown(results)
    # SmolLM2's results keep the name they always had; another model's carry its name.
    stem = "explainer_vs_peers" + ("_smoke" if args.smoke else "" if args.model == MODEL_NAME else f"_{args.model}")
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"{stem}.json").write_text(json.dumps(results, indent=2))
    (args.out / f"{stem}.md").write_text(table)
    return table


if __name__ == "__main__":
    main()
