"""The ``sightline`` command: generate, stream, fetch explanations, list methods."""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable, Sequence
from typing import Any

from google.protobuf.json_format import MessageToJson
from sightline.client import DEFAULT_TARGET, Client
from sightline.errors import SightlineError
from sightline.types import Explanation, ExplanationState, MethodInfo, Prompt, StreamChunk
from sightline.v1 import explanations_pb2

# What a shell reports for a process ended by Ctrl-C (128 + SIGINT).
_INTERRUPTED_EXIT = 130
_WAIT_HINT_SECONDS = 30


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit status (0 ok, 2 bad request, 1 other failure)."""
    args = _parser().parse_args(argv)
    command: Callable[[Client, argparse.Namespace], int] = args.command
    try:
        with Client(args.target, api_key=args.api_key, timeout=args.timeout) as client:
            return command(client, args)
    except SightlineError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2 if error.is_caller_error else 1
    except KeyboardInterrupt:
        return _INTERRUPTED_EXIT


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="sightline", description="Explainable LLM inference with Sightline.")
    parser.add_argument(
        "--target",
        default=os.environ.get("SIGHTLINE_TARGET", DEFAULT_TARGET),
        metavar="HOST:PORT",
        help="gateway address (env SIGHTLINE_TARGET, default %(default)s)",
    )
    parser.add_argument(
        "--api-key",
        default=os.environ.get("SIGHTLINE_API_KEY"),
        help="API key (env SIGHTLINE_API_KEY, which keeps it out of the process list)",
    )
    parser.add_argument("--timeout", type=float, metavar="SECONDS", help="deadline of each call (default: none)")
    commands = parser.add_subparsers(title="commands", required=True, metavar="COMMAND")

    generation = argparse.ArgumentParser(add_help=False)
    generation.add_argument("prompt", metavar="PROMPT", help="the prompt; - reads it from stdin")
    generation.add_argument(
        "--explain",
        action="append",
        metavar="METHOD",
        help="explain the output with METHOD (repeatable; see `sightline methods`)",
    )
    generation.add_argument(
        "--async",
        dest="async_explain",
        action="store_true",
        help="do not wait for the explanation; print its id for `sightline explain`",
    )
    generation.add_argument("--max-tokens", type=_positive_int, metavar="N")
    generation.add_argument("--temperature", type=float, metavar="T", help="0 decodes greedily")
    generation.add_argument("--model", default="", help="served model name (default: the server's default)")
    # Served models are instruction-tuned chat models, so a question should go through the chat template.
    generation.add_argument(
        "--completion",
        action="store_true",
        help="send PROMPT as raw text to complete instead of as a user chat message",
    )

    summary = argparse.ArgumentParser(add_help=False)
    summary.add_argument(
        "--top", type=_positive_int, default=5, metavar="K", help="sources shown per token (default %(default)s)"
    )
    summary.add_argument("--json", action="store_true", help="print the response as proto JSON")

    generate = commands.add_parser(
        "generate", parents=[generation, summary], help="generate a completion, optionally explained"
    )
    generate.set_defaults(command=_generate)

    stream = commands.add_parser(
        "stream",
        parents=[generation, summary],
        help="print tokens as they are generated (--json: one response per line)",
    )
    stream.set_defaults(command=_stream)

    explain = commands.add_parser("explain", parents=[summary], help="fetch an explanation by id")
    explain.add_argument("explanation_id", metavar="ID")
    explain.add_argument("--wait", type=float, default=0.0, metavar="SECONDS", help="wait this long for it to finish")
    explain.set_defaults(command=_explain)

    methods = commands.add_parser("methods", help="list the attribution methods on offer")
    methods.add_argument("--json", action="store_true", help="print the response as proto JSON")
    methods.set_defaults(command=_methods)
    return parser


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def _prompt(args: argparse.Namespace) -> Prompt:
    text: str = sys.stdin.read() if args.prompt == "-" else args.prompt
    return text if args.completion else [{"role": "user", "content": text}]


def _generation_options(args: argparse.Namespace) -> dict[str, Any]:
    return {
        "max_tokens": args.max_tokens,
        "temperature": args.temperature,
        "explain": args.explain,
        "mode": "async" if args.async_explain else "sync",
        "model": args.model,
    }


def _generate(client: Client, args: argparse.Namespace) -> int:
    generation = client.generate(_prompt(args), **_generation_options(args))
    if args.json:
        print(MessageToJson(generation.raw))
        return 0
    print(generation.text)
    return _report_explanation(generation.explanation_id, generation.explanation, args.top)


def _stream(client: Client, args: argparse.Namespace) -> int:
    final: StreamChunk | None = None
    for chunk in client.generate_stream(_prompt(args), **_generation_options(args)):
        if args.json:
            print(MessageToJson(chunk.raw, indent=None), flush=True)
        else:
            print(chunk.text_delta, end="", flush=True)
        final = chunk
    if args.json or final is None:
        return 0
    print()
    return _report_explanation(final.explanation_id, final.explanation, args.top)


def _explain(client: Client, args: argparse.Namespace) -> int:
    explanation = client.get_explanation(args.explanation_id, wait_seconds=args.wait)
    if args.json:
        print(MessageToJson(explanation.raw))
        return 0
    return _print_explanation(explanation, args.top)


def _methods(client: Client, args: argparse.Namespace) -> int:
    infos = client.list_methods()
    if args.json:
        print(MessageToJson(explanations_pb2.ListMethodsResponse(methods=[info.raw for info in infos])))
        return 0
    for info in infos:
        _print_method(info)
    return 0


def _report_explanation(explanation_id: str, explanation: Explanation | None, top: int) -> int:
    """Summarize what a generation says about its explanation, if one was asked for."""
    if explanation is not None:
        print()
        return _print_explanation(explanation, top)
    if explanation_id:
        print(f"\nexplanation {explanation_id} queued; fetch it with:")
        print(f"  sightline explain {explanation_id} --wait {_WAIT_HINT_SECONDS}")
    return 0


def _print_explanation(explanation: Explanation, top: int) -> int:
    """Print the explanation's state and each target's strongest sources; 1 if it failed."""
    notes = [f"model {explanation.model}"] if explanation.model else []
    if explanation.cache_hit:
        notes.append("cache hit")
    if explanation.fidelity is not None:
        notes.append(f"max |logprob diff| {explanation.fidelity.max_abs_logprob_diff:.4g}")
    suffix = f" ({', '.join(notes)})" if notes else ""
    print(f"explanation {explanation.explanation_id}: {explanation.state.value}{suffix}")
    if explanation.state is ExplanationState.FAILED:
        print(f"  {explanation.error or 'no reason given'}")
        return 1
    if not explanation.finished:
        print(f"  not finished; wait for it with: sightline explain {explanation.explanation_id} --wait SECONDS")
        return 0
    methods = explanation.token_attribution_methods
    if not methods:
        print(f"  no token attributions (results: {', '.join(explanation.results) or 'none'})")
        return 0
    method = methods[0]
    width = len(str(len(explanation.tokens)))
    print(f"{method}: top {top} sources of each explained token, by |score|")
    for target_index, position in enumerate(explanation.target_positions):
        print(f"  [{position:>{width}}] {explanation.tokens[position].text!r}")
        for source in explanation.top_sources(target_index, top, method):
            print(f"      [{source.position:>{width}}] {source.token.text!r:<24} {source.score:+.4f}")
    return 0


def _print_method(info: MethodInfo) -> None:
    traits = [
        trait
        for trait, present in (
            ("attributes tokens", info.attributes_tokens),
            ("needs gradients", info.needs_gradients),
            ("uses cache", info.uses_cache),
            ("contrastive targets", info.supports_contrastive_targets),
            ("multimodal", info.multimodal),
        )
        if present
    ]
    print(f"{info.name}" + (f"  [{', '.join(traits)}]" if traits else ""))
    if info.description:
        print(f"    {info.description}")
    for param in info.params:
        default = f", default {param.default_value}" if param.default_value else ""
        print(f"    {param.name} ({param.type.value}{default}): {param.description}")
