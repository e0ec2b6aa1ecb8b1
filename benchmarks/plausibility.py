"""Which method should I use: plausibility, faithfulness and cost of every registered method on factual prompts.

    .venv/bin/python benchmarks/plausibility.py                     # every method, every kept prompt
    .venv/bin/python benchmarks/plausibility.py --smoke             # 3 prompts, cheap methods: checks it runs
    .venv/bin/python benchmarks/plausibility.py --limit 20 --slow-limit 8
    .venv/bin/python benchmarks/plausibility.py --check-data        # re-check which prompts the model answers
    .venv/bin/python benchmarks/plausibility.py --merge A.json B.json   # one table from runs of different methods

The prompts (benchmarks/data/factual_prompts.json) are questions whose answer depends on one known subject ("What
is the capital of Japan?" -> Tokyo, subject "Japan"; authors of books; chemical symbols of elements). Only those the
model answers correctly when decoding greedily are kept; ``--check-data`` decodes every candidate again and rewrites
the file's ``checked`` entry for the model (which were kept, which were dropped and what the model said instead).

Each prompt is asked as a chat (the model's own template, as the server renders it), the answer is decoded greedily
and the explained token is the answer's first token in the output ("The capital of Japan is Tokyo." -> " Tokyo"):
only that token is explained (``output_indices``), and the output is cut after it. Every method in the registry runs
with its default parameters through ``explainers.engine.explain``, exactly as the explainer worker runs a job
(without the hidden-state cache, so every job pays its forward pass), one method per job. Measured per method:

- plausibility: among the content tokens (the user's question; ``Token.is_content``, as the SDK's
  ``top_sources(content_only=True)`` ranks them, by |score|), how often a token of the subject is the top source,
  and the mean rank (1 = top) of the subject's best-ranked token. A seeded random attribution gives chance level.
- faithfulness: ERASER comprehensiveness and sufficiency, AOPC over 1/5/10/20/50 % of the sources
  (explainers.faithfulness.faithfulness_of, all methods of a prompt measured together as the engine does), next to
  the same seeded random attribution's: comprehensiveness above random and sufficiency below random are better.
- cost: wall and CPU seconds of the job (forward pass + method), the method's own seconds, and the cost relative to
  input x gradient on the same prompts (ratio of summed job CPU seconds).

``logit_lens`` attributes no tokens, so it is timed only. ``--slow-limit`` runs the methods in SLOW on the first N
prompts only (the table says on how many each method ran); the ratios to input x gradient are then taken over
those same prompts. Where the slowest methods can only run on a few prompts, run them apart (``--methods``, with
input x gradient for the ratio) and ``--merge`` the results: per prompt, the methods of every run are put together.
"""

from __future__ import annotations

import argparse
import json
import math
import re
import statistics
import sys
import time
import unicodedata
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import bench_util
import torch
from bench_util import JsonDict, markdown_table

if TYPE_CHECKING:
    from explainers.model import LoadedModel

DATA = bench_util.REPO_ROOT / "benchmarks" / "data" / "factual_prompts.json"
BASELINE = "input_x_gradient"
RANDOM = "random"
# The methods whose cost --slow-limit bounds: many forward passes per explained token.
SLOW = (
    "activation_patching",
    "shapley_sampling",
    "integrated_gradients",
    "gradient_shap",
    "layer_integrated_gradients",
)
SMOKE_METHODS = ("saliency", "input_x_gradient", "attention", "logit_lens")
SMOKE_PROMPTS = 2
# The default method must be cheap enough to run on every request that names none: at most this many times input x
# gradient's cost (job CPU seconds).
DEFAULT_COST_BOUND = 5.0
# Methods refused on some architectures (AttnLRP has no rules for Gemma 2, Phi-3, GPT-2, GPT-NeoX): the default for
# those comes from the others.
PARTIAL_COVERAGE = ("attn_lrp",)
MAX_NEW_TOKENS = 24


@dataclass(frozen=True)
class Question:
    """One factual prompt as asked: its chat, the greedy output up to and including the answer's first token."""

    id: str
    question: str
    answer: str
    subject: str
    prompt_ids: list[int]
    output_ids: list[int]  # cut after the answer's first token, which is the last one
    output_text: str


def folded(text: str) -> str:
    """``text`` without accents, so that "Brasilia" answers "Brasília"."""
    return "".join(c for c in unicodedata.normalize("NFKD", text) if not unicodedata.combining(c))


def answer_start(output: str, answer: str) -> int | None:
    """Where ``answer`` first occurs in ``output`` as a whole word (accents ignored), or None."""
    match = re.search(rf"(?<!\w){re.escape(folded(answer))}(?!\w)", folded(output))
    return None if match is None else match.start()


def interleaved(entries: list[JsonDict]) -> list[JsonDict]:
    """The entries taking each kind in turn (capital, author, chemical symbol, capital, ...), so that the first N,
    which ``--limit`` and ``--slow-limit`` take, mix the kinds as the whole set does."""
    kinds: dict[str, list[JsonDict]] = {}
    for entry in entries:
        kinds.setdefault(entry["kind"], []).append(entry)
    queues = list(kinds.values())
    return [queue[i] for i in range(max(map(len, queues))) for queue in queues if i < len(queue)]


def chat_of(question: str) -> list[dict[str, str]]:
    return [{"role": "user", "content": question}]


def chat_prompt_ids(loaded: LoadedModel, question: str) -> list[int]:
    """The prompt ids the server sends for a chat: the model's template rendered, its special tokens written by it."""
    tokenizer = loaded.tokenizer
    rendered = str(tokenizer.apply_chat_template(chat_of(question), tokenize=False, add_generation_prompt=True))
    return [int(token_id) for token_id in tokenizer(rendered, add_special_tokens=False)["input_ids"]]


def greedy(loaded: LoadedModel, prompt_ids: list[int]) -> list[int]:
    with torch.no_grad():
        # transformers types generate() loosely (GenerationMixin); it returns the ids [1, prompt + new].
        model: Any = loaded.model
        generated = model.generate(
            torch.tensor([prompt_ids]),
            max_new_tokens=MAX_NEW_TOKENS,
            do_sample=False,
            pad_token_id=loaded.tokenizer.eos_token_id,
        )
    output: list[int] = generated[0, len(prompt_ids) :].tolist()
    eos = loaded.tokenizer.eos_token_id
    return output[: output.index(eos)] if eos in output else output


def ask(loaded: LoadedModel, entry: JsonDict) -> tuple[Question | None, str]:
    """The question with its output cut after the answer's first token; None and what the model said if the
    greedy answer does not contain the expected one."""
    prompt_ids = chat_prompt_ids(loaded, entry["question"])
    output_ids = greedy(loaded, prompt_ids)
    text = str(loaded.tokenizer.decode(output_ids, skip_special_tokens=True))
    start = answer_start(text, entry["answer"])
    if start is None:
        return None, text
    # The first output token whose text reaches past the answer's start.
    for index in range(len(output_ids)):
        if len(loaded.tokenizer.decode(output_ids[: index + 1], skip_special_tokens=True)) > start:
            question = Question(
                entry["id"],
                entry["question"],
                entry["answer"],
                entry["subject"],
                prompt_ids,
                output_ids[: index + 1],
                text,
            )
            return question, text
    return None, text


def check_data(loaded: LoadedModel, model_key: str) -> None:
    """Decode every candidate greedily and record in the data file which the model answers correctly."""
    data = json.loads(DATA.read_text())
    kept, dropped = [], []
    for entry in data["prompts"]:
        question, text = ask(loaded, entry)
        if question is None:
            dropped.append({"id": entry["id"], "output": text, "reason": f"answer {entry['answer']!r} not in output"})
        else:
            kept.append(entry["id"])
        print(f"{'kept' if question else 'DROPPED'} {entry['id']}: {text!r}", file=sys.stderr)
    data.setdefault("checked", {})[model_key] = {
        "model": loaded.model_name,
        "format": "chat, greedy, " + str(MAX_NEW_TOKENS) + " new tokens at most",
        "kept": kept,
        "dropped": dropped,
    }
    DATA.write_text(json.dumps(data, indent=1, ensure_ascii=False) + "\n")
    print(f"{len(kept)} kept, {len(dropped)} dropped; wrote {DATA}", file=sys.stderr)


def subject_positions(tokens: Sequence[Any], subject: str) -> list[int]:
    """Positions of the content tokens that overlap the subject's characters in the question."""
    content = [(position, token) for position, token in enumerate(tokens) if token.is_content]
    text = "".join(token.text for _, token in content)
    start = text.find(subject)
    if start < 0:
        raise ValueError(f"subject {subject!r} not in the content tokens {text!r}")
    end, cursor, positions = start + len(subject), 0, []
    for position, token in content:
        token_end = cursor + len(token.text)
        if token_end > start and cursor < end:
            positions.append(position)
        cursor = token_end
    return positions


def subject_rank(scores: torch.Tensor, content: list[int], subject: list[int]) -> int:
    """The 1-based rank of the subject's best token among the content tokens, by |score|, earlier first on ties
    (the order of the SDK's top_sources)."""
    ranked = sorted(content, key=lambda position: (-abs(float(scores[position])), position))
    return 1 + min(ranked.index(position) for position in subject)


def measure_question(loaded: LoadedModel, question: Question, methods: list[str], repeats: int) -> dict[str, JsonDict]:
    """Every method's plausibility, faithfulness and seconds on one question."""
    from sightline.types import Explanation

    from common.jobs import ExplainOptions
    from explainers.engine import explain
    from explainers.faithfulness import faithfulness_of
    from explainers.targets import Targets, TargetScore

    target_index = len(question.output_ids) - 1
    options = ExplainOptions(output_indices=[target_index])
    sequence = [*question.prompt_ids, *question.output_ids]
    position = len(sequence) - 1
    rows: dict[str, JsonDict] = {}
    matrices: dict[str, torch.Tensor] = {}
    content: list[int] = []
    subject: list[int] = []
    for name in methods:
        walls, cpus = [], []
        for _ in range(repeats):
            started, cpu_started = time.perf_counter(), time.process_time()
            proto = explain(
                loaded, None, question.prompt_ids, question.output_ids, [(name, {})], None, options,
                chat=chat_of(question.question),
            )  # fmt: skip
            walls.append(time.perf_counter() - started)
            cpus.append(time.process_time() - cpu_started)
        result = proto.results[0]
        row: JsonDict = {"wall_s": min(walls), "cpu_s": min(cpus), "method_s": result.seconds}
        if result.HasField("attributions"):
            explanation = Explanation.from_proto(proto)
            if not content:
                content = [p for p in range(position) if explanation.tokens[p].is_content]
                subject = subject_positions(explanation.tokens, question.subject)
            scores = torch.tensor(explanation.attributions(name).row(0))
            top = explanation.top_sources(0, k=1, method=name, content_only=True)[0]
            row["subject_top"] = top.position in subject
            row["subject_rank"] = subject_rank(scores, content, subject)
            row["top_content_source"] = top.token.text
            matrices[name] = scores[None]
        rows[name] = row
        print(f"  {name}: {row['wall_s']:.2f} s, rank {row.get('subject_rank', '-')}", file=sys.stderr, flush=True)
    if matrices:
        random_scores = torch.rand(position, generator=torch.Generator().manual_seed(0))
        rows[RANDOM] = {
            "subject_top": subject_rank(random_scores, content, subject) == 1,
            "subject_rank": subject_rank(random_scores, content, subject),
        }
        token_ids = torch.tensor(sequence)
        targets = Targets(
            positions=torch.tensor([position]), token_ids=token_ids[[position]], foil_ids=None,
            score=TargetScore.LOGPROB,
        )  # fmt: skip
        measures = faithfulness_of(loaded, token_ids, targets, matrices)
        for name, measure in measures.items():
            rows[name]["comprehensiveness"] = measure.aopc_comprehensiveness
            rows[name]["sufficiency"] = measure.aopc_sufficiency
            rows[RANDOM]["comprehensiveness"] = measure.random_aopc_comprehensiveness
            rows[RANDOM]["sufficiency"] = measure.random_aopc_sufficiency
    return rows


def summarise(per_question: list[JsonDict], methods: list[str]) -> list[JsonDict]:
    """One row per method (and the random reference): means over the prompts it ran on, cost against the
    baseline over those same prompts."""
    summary = []
    for name in [*methods, RANDOM]:
        runs = [(q, q["methods"][name]) for q in per_question if name in q["methods"]]
        if not runs:
            continue
        row: JsonDict = {"method": name, "prompts": len(runs)}
        if "subject_rank" in runs[0][1]:
            row["subject_top_rate"] = statistics.fmean(float(r["subject_top"]) for _, r in runs)
            row["mean_subject_rank"] = statistics.fmean(r["subject_rank"] for _, r in runs)
        if "comprehensiveness" in runs[0][1]:
            for key in ("comprehensiveness", "sufficiency"):
                row[key] = statistics.fmean(r[key] for _, r in runs)
                row[f"{key}_vs_random"] = statistics.fmean(r[key] - q["methods"][RANDOM][key] for q, r in runs)
        if "wall_s" in runs[0][1]:
            for key in ("wall_s", "cpu_s", "method_s"):
                row[f"mean_{key}"] = statistics.fmean(r[key] for _, r in runs)
            baseline = [q["methods"][BASELINE] for q, _ in runs if BASELINE in q["methods"]]
            if len(baseline) == len(runs):
                row["cost_vs_input_x_gradient"] = sum(r["cpu_s"] for _, r in runs) / sum(b["cpu_s"] for b in baseline)
                row["method_cost_vs_input_x_gradient"] = sum(r["method_s"] for _, r in runs) / sum(
                    b["method_s"] for b in baseline
                )
        summary.append(row)
    return summary


def merge(paths: list[Path]) -> JsonDict:
    """One result from runs of different methods on the same model: each prompt's methods from every run (a later
    run's measurement of a method replaces an earlier one), the summary recomputed."""
    from explainers.methods.registry import all_methods

    runs = [bench_util.read_result(path) for path in paths]
    if len({run["model"] for run in runs}) != 1:
        raise SystemExit(f"cannot merge runs of different models: {sorted({run['model'] for run in runs})}")
    by_id: dict[str, JsonDict] = {}
    for run in runs:
        for question in run["per_question"]:
            merged = by_id.setdefault(question["id"], {**question, "methods": {}})
            merged["methods"].update(question["methods"])
    measured = {name for question in by_id.values() for name in question["methods"]}
    methods = [method.name for method in all_methods() if method.name in measured]
    per_question = list(by_id.values())
    return {
        **runs[0],
        "command": " && ".join(run["command"] for run in runs),
        "merged_from": [{"command": run["command"], "environment": run["environment"]} for run in runs],
        "questions": len(per_question),
        "per_question": per_question,
        "summary": (summary := summarise(per_question, methods)),
        **recommendations(summary),
    }


def recommend(summary: list[JsonDict], excluded: Sequence[str] = ()) -> str | None:
    """The method the numbers support as the server's default: among the methods faithful on both counts
    (comprehensiveness above random, sufficiency below random) that cost at most DEFAULT_COST_BOUND times input x
    gradient, the one whose top content source is most often the subject; ties go to the larger faithfulness margin
    (comprehensiveness above random plus sufficiency below random). ``excluded``: methods not to consider."""
    eligible = [
        row
        for row in summary
        if row["method"] not in (RANDOM, *excluded)
        and row.get("comprehensiveness_vs_random", 0.0) > 0
        and row.get("sufficiency_vs_random", 0.0) < 0
        and row.get("cost_vs_input_x_gradient", math.inf) <= DEFAULT_COST_BOUND
    ]
    if not eligible:
        return None
    best = max(
        eligible,
        key=lambda row: (
            row["subject_top_rate"],
            row["comprehensiveness_vs_random"] - row["sufficiency_vs_random"],
        ),
    )
    return str(best["method"])


def recommendations(summary: list[JsonDict]) -> JsonDict:
    """The recommended default, and the one for architectures where a method is refused (PARTIAL_COVERAGE)."""
    return {
        "recommended_default": recommend(summary),
        "recommended_default_every_architecture": recommend(summary, PARTIAL_COVERAGE),
    }


def render_markdown(result: JsonDict) -> str:
    rows = [
        [
            f"`{row['method']}`" if row["method"] != RANDOM else "random (chance)",
            row["prompts"],
            bench_util.fmt(100 * row["subject_top_rate"], 0) + " %" if "subject_top_rate" in row else "—",
            bench_util.fmt(row.get("mean_subject_rank"), 2),
            bench_util.fmt(row.get("comprehensiveness"), 2),
            _signed(row.get("comprehensiveness_vs_random")),
            bench_util.fmt(row.get("sufficiency"), 2),
            _signed(row.get("sufficiency_vs_random")),
            bench_util.fmt(row.get("mean_wall_s"), 2),
            bench_util.fmt(row.get("mean_cpu_s"), 2),
            bench_util.fmt(row.get("cost_vs_input_x_gradient"), 1) + "x" if "cost_vs_input_x_gradient" in row else "—",
        ]
        for row in sorted(result["summary"], key=_table_order)
    ]
    heading = (
        f"{result['model']}: {result['questions']} factual chat prompts ({result['candidates']} candidates, "
        f"{result['dropped']} the model answers wrongly dropped), the answer's first token explained, default "
        f"parameters, one method per job through the engine, {result['threads']} thread(s). Subject top: how often "
        "the subject is the top content source (by |score|); rank: the subject's mean rank among the question's "
        "tokens (1 = top); comprehensiveness (higher is better) and sufficiency (lower is better) are AOPC score "
        "drops in log-probability, with their difference from the seeded random attribution's; seconds per job "
        "(forward pass + method); cost: job CPU seconds relative to input x gradient on the same prompts."
    )
    headers = [
        "method", "prompts", "subject top", "subject rank", "compr.", "compr. - random", "suff.", "suff. - random",
        "wall s", "CPU s", "cost vs input x gradient",
    ]  # fmt: skip
    recommended = result.get("recommended_default")
    elsewhere = result.get("recommended_default_every_architecture")
    footer = (
        f"\n\nThe numbers support `{recommended}` as the default method: the most plausible of the methods that beat "
        f"random on both comprehensiveness and sufficiency and cost at most {DEFAULT_COST_BOUND:g}x input x gradient"
        + (f"; among those that run on every architecture, `{elsewhere}`." if elsewhere != recommended else ".")
        if recommended
        else ""
    )
    return heading + "\n\n" + markdown_table(headers, rows) + footer


def _table_order(row: JsonDict) -> tuple[int, int, float]:
    """Token-attributing methods, those measured on the most prompts first, then by plausibility; then the others;
    random last."""
    if row["method"] == RANDOM:
        return (2, 0, 0.0)
    if "subject_top_rate" not in row:
        return (1, 0, 0.0)
    return (0, -row["prompts"], -row["subject_top_rate"])


def _signed(value: float | None) -> str:
    return "—" if value is None else f"{value:+.2f}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m-instruct", help="a model under ~/.cache/sightline/models")
    parser.add_argument("--methods", default="", help="comma-separated (default: every registered method)")
    parser.add_argument("--limit", type=int, default=0, help="the first N kept prompts only (0: all)")
    parser.add_argument("--slow-limit", type=int, default=0, help=f"run {', '.join(SLOW)} on the first N only")
    parser.add_argument("--repeats", type=int, default=1, help="jobs per method and prompt; the fastest counts")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--smoke", action="store_true", help=f"{SMOKE_PROMPTS} prompts, cheap methods")
    parser.add_argument("--check-data", action="store_true", help="re-check which prompts the model answers")
    parser.add_argument("--merge", type=Path, nargs="+", default=None, help="combine these results (no measuring)")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    if args.merge:
        merged = merge(args.merge)
        bench_util.write_result(args.out or bench_util.RESULTS_DIR / "plausibility.json", merged)
        print(render_markdown(merged))
        return 0

    from explainers.embedded_model import model_cache_dir
    from explainers.methods.registry import all_methods
    from explainers.model import load_model

    torch.set_num_threads(args.threads)
    loaded = load_model(model_cache_dir(args.model))
    if args.check_data:
        check_data(loaded, args.model)
        return 0
    data = json.loads(DATA.read_text())
    checked = data["checked"][args.model]
    kept = set(checked["kept"])
    entries = interleaved([entry for entry in data["prompts"] if entry["id"] in kept])
    methods = [method.name for method in all_methods()]
    if args.methods:
        methods = [name for name in args.methods.split(",") if name]
    if args.smoke:
        entries, methods = entries[:SMOKE_PROMPTS], [name for name in methods if name in SMOKE_METHODS]
    elif args.limit:
        entries = entries[: args.limit]
    name = f"plausibility{'' if args.model == 'smollm2-135m-instruct' else '_' + args.model}"
    out = args.out or bench_util.RESULTS_DIR / f"{name}{'_smoke' if args.smoke else ''}.json"
    result: JsonDict = {
        "benchmark": "plausibility",
        "command": bench_util.command_line("plausibility.py", sys.argv[1:] if argv is None else argv),
        "environment": bench_util.environment(),
        "smoke": args.smoke,
        "model": loaded.model_name,
        "threads": args.threads,
        "repeats": args.repeats,
        "candidates": len(data["prompts"]),
        "dropped": len(checked["dropped"]),
        "explained_token": "the answer's first token in the greedy output",
        "slow_methods": list(SLOW),
        "slow_limit": args.slow_limit,
        "questions": 0,
        "per_question": [],
        "summary": [],
    }
    for index, entry in enumerate(entries):
        question, text = ask(loaded, entry)
        if question is None:
            print(f"{entry['id']}: answered {text!r} now; skipped", file=sys.stderr)
            continue
        run = [m for m in methods if not (args.slow_limit and m in SLOW and index >= args.slow_limit)]
        print(f"[{index + 1}/{len(entries)}] {question.id}: {question.output_text!r}", file=sys.stderr, flush=True)
        measured = measure_question(loaded, question, run, args.repeats)
        result["per_question"].append(
            {
                "id": question.id,
                "question": question.question,
                "subject": question.subject,
                "output": question.output_text,
                "explained_token": loaded.tokenizer.decode(question.output_ids[-1:]),
                "prompt_tokens": len(question.prompt_ids),
                "methods": measured,
            }
        )
        result["questions"] = len(result["per_question"])
        result["summary"] = summarise(result["per_question"], methods)
        result.update(recommendations(result["summary"]))
        bench_util.write_result(out, result)  # after every prompt: a long run is readable while it goes
    print(render_markdown(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
