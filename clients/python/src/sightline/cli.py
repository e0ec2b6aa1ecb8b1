"""The ``sightline`` command: generate, stream, fetch and list explanations, list methods, export and verify
the audit trail."""

from __future__ import annotations

import argparse
import datetime
import math
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, get_args

from google.protobuf.json_format import MessageToJson
from sightline.cli_images import add_image_flags, overlay_problem, print_image_cells, write_overlay
from sightline.client import DEFAULT_TARGET, Client
from sightline.errors import SightlineError
from sightline.progress_display import ProgressDisplay
from sightline.tls import TLS
from sightline.types import (
    ExplainOptions,
    ExplainPath,
    Explanation,
    ExplanationState,
    Faithfulness,
    FinishReason,
    GranularityName,
    MethodInfo,
    MethodParam,
    NormalizationName,
    ParamValue,
    Prompt,
    SourceGroup,
    StreamChunk,
    TargetScoreName,
)

# What a shell reports for a process ended by Ctrl-C (128 + SIGINT).
_INTERRUPTED_EXIT = 130
_WAIT_HINT_SECONDS = 30


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit status (0 ok, 2 bad request, 1 other failure)."""
    parser = _parser()
    args = parser.parse_args(argv)
    if "spans" in args:  # generate and stream, which take explanation options
        try:
            args.options = _explain_options(args)
            args.methods = _explain_methods(args)
        except ValueError as error:
            parser.error(str(error))
        for image in args.images or []:
            if not image.is_file():
                parser.error(f"--image {image}: no such file")
        problem = overlay_problem(args)
        if problem is not None:
            parser.error(problem)
    try:
        tls = _tls(args)
    except (OSError, ValueError) as error:
        parser.error(f"TLS: {error}")
    command: Callable[[Client, argparse.Namespace], int] = args.command
    try:
        with Client(args.target, api_key=args.api_key, timeout=args.timeout, tls=tls) as client:
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
    security = parser.add_argument_group("TLS (any of these turns it on)")
    security.add_argument("--tls", action="store_true", help="connect over TLS, trusting the system's CAs")
    security.add_argument(
        "--tls-ca",
        default=os.environ.get("SIGHTLINE_TLS_CA"),
        metavar="PEM",
        help="CA certificates that sign the gateway's certificate (env SIGHTLINE_TLS_CA)",
    )
    security.add_argument(
        "--client-cert",
        default=os.environ.get("SIGHTLINE_CLIENT_CERT"),
        metavar="PEM",
        help="this client's certificate chain, for mutual TLS (env SIGHTLINE_CLIENT_CERT)",
    )
    security.add_argument(
        "--client-key",
        default=os.environ.get("SIGHTLINE_CLIENT_KEY"),
        metavar="PEM",
        help="this client's private key, for mutual TLS (env SIGHTLINE_CLIENT_KEY)",
    )
    security.add_argument(
        "--tls-server-name", metavar="NAME", help="check the gateway's certificate against NAME, not the target host"
    )
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
    generation.add_argument(
        "--wait",
        action="store_true",
        help="with --async: then wait for the explanation (within --timeout), showing its progress on stderr",
    )
    generation.add_argument(
        "--image",
        dest="images",
        action="append",
        type=Path,
        metavar="PATH",
        help="a PNG or JPEG picture shown before the prompt in the chat message (repeatable)",
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
    options = generation.add_argument_group("explanation options (with --explain)")
    options.add_argument(
        "--param",
        dest="params",
        type=_method_param,
        action="append",
        metavar="METHOD.NAME=VALUE",
        help="a parameter of an --explain method, e.g. shapley_sampling.samples=5 (repeatable; VALUE is read as "
        "true/false, an integer, a number or else text; `sightline methods` lists each method's parameters)",
    )
    options.add_argument(
        "--targets",
        type=_index_list,
        metavar="I,J,...",
        help="explain only these generated tokens (0 is the first; default: all)",
    )
    options.add_argument(
        "--foil",
        dest="foils",
        type=_non_negative_int,
        action="append",
        metavar="TOKEN_ID",
        help="explain why each token rather than this one (repeatable: one foil per explained token)",
    )
    options.add_argument(
        "--score",
        choices=get_args(TargetScoreName),
        default="logprob",
        help="what the attributions explain (default %(default)s)",
    )
    options.add_argument(
        "--granularity",
        choices=get_args(GranularityName),
        help="rank sources by word or --span span instead of by token (default: span with --span, else token)",
    )
    options.add_argument(
        "--span",
        dest="spans",
        type=_span,
        action="append",
        metavar="START:END[:LABEL]",
        help="a source span of token positions [START, END) (repeatable; spans must not overlap)",
    )
    options.add_argument("--absolute", action="store_true", help="aggregate absolute attributions")
    options.add_argument(
        "--normalize",
        choices=get_args(NormalizationName),
        default="none",
        help="divide each explained token's aggregated attributions by their L1 norm or largest |value|"
        " (default %(default)s)",
    )
    options.add_argument(
        "--faithfulness",
        action="store_true",
        help="measure each method's comprehensiveness and sufficiency against random attributions",
    )
    add_image_flags(generation, options)

    summary = argparse.ArgumentParser(add_help=False)
    summary.add_argument(
        "--top", type=_positive_int, default=5, metavar="K", help="sources shown per token (default %(default)s)"
    )
    summary.add_argument("--json", action="store_true", help="print the response as proto JSON")
    summary.add_argument(
        "--all-sources",
        action="store_true",
        help="for a chat prompt, rank every source token, the chat template's too (default: only your messages)",
    )

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
    explain.add_argument(
        "--wait",
        type=float,
        nargs="?",
        const=math.inf,
        default=0.0,
        metavar="SECONDS",
        help="wait for it to finish (up to SECONDS if given), showing its progress on stderr",
    )
    explain.set_defaults(command=_explain)

    cancel = commands.add_parser("cancel", help="stop a pending or running explanation")
    cancel.add_argument("explanation_id", metavar="ID")
    cancel.set_defaults(command=_cancel)

    listing = commands.add_parser("list", help="list your explanations, newest first")
    listing.add_argument(
        "--page-size", type=_positive_int, default=20, metavar="N", help="at most N per page (default %(default)s)"
    )
    listing.add_argument("--page-token", default="", metavar="TOKEN", help="the page a previous `list` pointed to")
    listing.add_argument("--json", action="store_true", help="print the response as proto JSON")
    listing.set_defaults(command=_list)

    audit = commands.add_parser("audit", help="export the audit trail, or verify an export offline")
    audit_commands = audit.add_subparsers(title="audit commands", required=True, metavar="AUDIT_COMMAND")
    export = audit_commands.add_parser("export", help="write your audit entries with their proofs to a JSONL file")
    export.add_argument("--since", type=_time, metavar="TIME", help="ISO 8601 time (UTC if no zone); default: all")
    export.add_argument("--until", type=_time, metavar="TIME", help="ISO 8601 time (UTC if no zone); default: now")
    export.add_argument("--tenant", default="", help="another tenant, or * for all (needs an operator key)")
    export.add_argument("--out", required=True, type=Path, metavar="FILE", help="where to write the export")
    export.set_defaults(command=_audit_export)
    verify = audit_commands.add_parser("verify", help="check an export offline: proofs, signatures, completeness")
    verify.add_argument("export_file", type=Path, metavar="FILE", help="an export written by `sightline audit export`")
    verify.add_argument(
        "--public-key", required=True, type=Path, metavar="PEM", help="the gateway's Ed25519 public key"
    )
    verify.set_defaults(command=_audit_verify)

    methods = commands.add_parser("methods", help="list the attribution methods on offer")
    methods.add_argument("--json", action="store_true", help="print the response as proto JSON")
    methods.set_defaults(command=_methods)
    return parser


def _tls(args: argparse.Namespace) -> TLS | bool:
    """The TLS settings the flags ask for; False for plaintext."""
    if args.tls_ca or args.client_cert or args.client_key or args.tls_server_name:
        return TLS.from_files(
            ca=args.tls_ca, cert=args.client_cert, key=args.client_key, server_name=args.tls_server_name
        )
    return bool(args.tls)


def _positive_int(text: str) -> int:
    return _int_at_least(text, 1)


def _non_negative_int(text: str) -> int:
    return _int_at_least(text, 0)


def _int_at_least(text: str, minimum: int) -> int:
    value = int(text)
    if value < minimum:
        raise argparse.ArgumentTypeError(f"must be at least {minimum}, got {value}")
    return value


def _index_list(text: str) -> tuple[int, ...]:
    try:
        return tuple(_non_negative_int(item) for item in text.split(","))
    except (ValueError, argparse.ArgumentTypeError):
        raise argparse.ArgumentTypeError(f"expected indices >= 0 separated by commas, got {text!r}") from None


def _span(text: str) -> tuple[int, int, str]:
    start, _, rest = text.partition(":")
    end, _, label = rest.partition(":")
    try:
        bounds = int(start), int(end)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected START:END or START:END:LABEL, got {text!r}") from None
    if not 0 <= bounds[0] < bounds[1]:
        raise argparse.ArgumentTypeError(f"a span needs 0 <= START < END, got {text!r}")
    return bounds[0], bounds[1], label


def _explain_options(args: argparse.Namespace) -> ExplainOptions | None:
    """The explanation options the flags ask for; None when they are all left at their defaults."""
    options = ExplainOptions(
        output_indices=args.targets or (),
        foil_token_ids=args.foils or (),
        score=args.score,
        granularity=args.granularity or ("span" if args.spans else "token"),
        spans=args.spans or (),
        absolute=args.absolute,
        normalization=args.normalize,
        faithfulness=args.faithfulness,
        image_grid=args.image_grid,
    )
    if options == ExplainOptions():
        return None
    if not args.explain:
        raise ValueError("explanation options such as --targets, --foil or --faithfulness need --explain METHOD")
    return options


def _explain_methods(args: argparse.Namespace) -> list[str] | dict[str, dict[str, ParamValue]] | None:
    """The --explain methods, as a name -> parameters mapping when --param gives any; every --param must name one
    of them."""
    explain: list[str] | None = args.explain
    if not args.params:
        return explain
    methods: dict[str, dict[str, ParamValue]] = {name: {} for name in explain or []}
    for method, name, value in args.params:
        if method not in methods:
            asked = ", ".join(methods) or "none"
            raise ValueError(f"--param {method}.{name}: {method!r} is not an --explain method (asked for: {asked})")
        methods[method][name] = value
    return methods


def _method_param(text: str) -> tuple[str, str, ParamValue]:
    """METHOD.NAME=VALUE as (method, name, value): VALUE true/false a bool, else an int, else a float, else text.
    The server checks the name and the value's type and range against the method's catalogue entry."""
    target, equals, raw = text.partition("=")
    method, dot, name = target.partition(".")
    if not (equals and dot and method and name):
        raise argparse.ArgumentTypeError(f"expected METHOD.NAME=VALUE, e.g. shapley_sampling.samples=5, got {text!r}")
    value: ParamValue
    if raw.lower() in ("true", "false"):
        value = raw.lower() == "true"
    else:
        try:
            value = int(raw)
        except ValueError:
            try:
                value = float(raw)
            except ValueError:
                value = raw
    return method, name, value


def _prompt(args: argparse.Namespace) -> Prompt:
    text: str = sys.stdin.read() if args.prompt == "-" else args.prompt
    if args.images:
        if args.completion:
            raise ValueError("--image needs a chat message; leave out --completion")
        return [{"role": "user", "content": [*args.images, text]}]
    return text if args.completion else [{"role": "user", "content": text}]


def _generation_options(args: argparse.Namespace) -> dict[str, Any]:
    return {
        "max_tokens": args.max_tokens,
        "temperature": args.temperature,
        "explain": args.methods,
        "mode": "async" if args.async_explain else "sync",
        "options": args.options,
        "model": args.model,
    }


def _by_groups(args: argparse.Namespace) -> bool:
    """Whether the summary ranks source groups: when an aggregation other than by token was asked for."""
    options: ExplainOptions | None = args.options
    return options is not None and options.granularity != "token"


def _generate(client: Client, args: argparse.Namespace) -> int:
    generation = client.generate(_prompt(args), **_generation_options(args))
    if args.json:
        print(MessageToJson(generation.raw))
        return 0
    print(generation.text)
    _note_finish(generation.finish_reason)
    explanation = generation.explanation
    if explanation is None and generation.explanation_id and args.wait:
        print(flush=True)
        explanation = _watch(client, generation.explanation_id, math.inf)
    status = _report_explanation(generation.explanation_id, explanation, args, _by_groups(args))
    return status or (write_overlay(explanation, args) if args.overlay else 0)


def _note_finish(reason: FinishReason | None) -> None:
    """Say on stderr when the output is shorter than asked for because the context window filled."""
    if reason == FinishReason.CONTEXT_LENGTH:
        print(
            "note: the output stopped where the model's context window filled, before --max-tokens; "
            "send a shorter prompt for a longer output",
            file=sys.stderr,
        )


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
    _note_finish(final.finish_reason)
    status = _report_explanation(final.explanation_id, final.explanation, args, _by_groups(args))
    return status or (write_overlay(final.explanation, args) if args.overlay else 0)


def _explain(client: Client, args: argparse.Namespace) -> int:
    if args.wait > 0 and not args.json:
        explanation = _watch(client, args.explanation_id, args.wait)
    else:
        explanation = client.get_explanation(args.explanation_id, wait_seconds=min(args.wait, 3600.0))
    if args.json:
        print(MessageToJson(explanation.raw))
        return 0
    return _print_explanation(explanation, args.top, all_sources=args.all_sources)


def _watch(client: Client, explanation_id: str, wait: float) -> Explanation:
    """Wait up to ``wait`` seconds (inf: until done, within --timeout) for the explanation, drawing its progress on
    stderr."""
    display = ProgressDisplay(sys.stderr)
    try:
        return client.wait_for_explanation(explanation_id, display, timeout=None if math.isinf(wait) else wait)
    finally:
        display.close()


def _cancel(client: Client, args: argparse.Namespace) -> int:
    explanation = client.cancel_explanation(args.explanation_id, wait_seconds=10)
    by = f" by {explanation.cancelled_by}" if explanation.cancelled_by else ""
    print(f"explanation {explanation.explanation_id}: {explanation.state.value}{by}")
    return 0


def _list(client: Client, args: argparse.Namespace) -> int:
    page = client.list_explanations(page_size=args.page_size, page_token=args.page_token)
    if args.json:
        print(MessageToJson(page.raw))
        return 0
    for summary in page.explanations:
        created = summary.created_at.isoformat(timespec="seconds") if summary.created_at else "-"
        print(
            f"{summary.explanation_id}  {summary.state.value:<9}  {created}  {summary.model}  "
            f"{','.join(summary.methods)}  trace {summary.trace_id or '-'}"
        )
    if not page.explanations:
        print("no explanations")
    if page.next_page_token:
        print(f"more: sightline list --page-size {args.page_size} --page-token {page.next_page_token}")
    return 0


def _time(text: str) -> datetime.datetime:
    try:
        moment = datetime.datetime.fromisoformat(text)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected an ISO 8601 time such as 2026-01-31T12:00:00Z, got {text!r}"
        ) from None
    return moment if moment.tzinfo is not None else moment.replace(tzinfo=datetime.UTC)


def _audit_export(client: Client, args: argparse.Namespace) -> int:
    entries = client.export_audit(args.out, since=args.since, until=args.until, tenant=args.tenant)
    print(f"wrote {entries} audit entries with their proofs to {args.out}")
    return 0


def _audit_verify(client: Client, args: argparse.Namespace) -> int:
    """Offline: the client is never called."""
    from sightline.audit_export import AuditVerificationError, load_public_key, verify_export

    try:
        public_key = load_public_key(args.public_key.read_bytes())
    except (OSError, ValueError) as error:
        print(f"error: cannot use the public key {args.public_key}: {error}", file=sys.stderr)
        return 2
    try:
        verified = verify_export(args.export_file, public_key)
    except AuditVerificationError as error:
        print(f"FAILED: {error}", file=sys.stderr)
        return 1
    except OSError as error:
        print(f"error: cannot read {args.export_file}: {error}", file=sys.stderr)
        return 2
    checkpoint = verified.checkpoint
    signed_at = datetime.datetime.fromtimestamp(checkpoint.timestamp_ms / 1000, datetime.UTC).isoformat()
    print(
        f"OK: {verified.entries} entries of tenant {verified.tenant!r} verified against the checkpoint of "
        f"{checkpoint.tree_size} entries (root {checkpoint.root_hash.hex()}, signed {signed_at}); "
        "every entry of the signed manifest is present, in order"
    )
    return 0


def _methods(client: Client, args: argparse.Namespace) -> int:
    infos = client.list_methods()
    if args.json:
        print(MessageToJson(infos.raw))
        return 0
    model, architecture = infos.model or "(unknown)", infos.architecture or "(unknown)"
    print(f"model {model}, architecture {architecture}, {_path(infos.explain_path)}")
    for info in infos:
        _print_method(info)
    return 0


def _report_explanation(
    explanation_id: str, explanation: Explanation | None, args: argparse.Namespace, by_groups: bool
) -> int:
    """Summarize what a generation says about its explanation, if one was asked for."""
    if explanation is not None:
        print()
        return _print_explanation(explanation, args.top, by_groups, all_sources=args.all_sources)
    if explanation_id:
        print(f"\nexplanation {explanation_id} queued; fetch it with:")
        print(f"  sightline explain {explanation_id} --wait {_WAIT_HINT_SECONDS}")
    return 0


def _print_explanation(
    explanation: Explanation, top: int, by_groups: bool | None = None, *, all_sources: bool = False
) -> int:
    """Print the explanation's state, each target's strongest sources and faithfulness; 1 if it failed.

    Sources are source groups (words, spans) when ``by_groups``; None, when it is not known what
    was asked for, means when some group is more than one token. The sources of a chat prompt's
    explanation are only the tokens of its messages (not the template's) unless ``all_sources``.
    """
    notes = [f"model {explanation.model}"] if explanation.model else []
    if explanation.architecture:
        notes.append(f"architecture {explanation.architecture}")
    if explanation.explain_path is not ExplainPath.UNSPECIFIED:
        notes.append(_path(explanation.explain_path))
    if explanation.cache_hit:
        notes.append("cache hit")
    if explanation.fidelity is not None:
        notes.append(f"max |logprob diff| {explanation.fidelity.max_abs_logprob_diff:.4g}")
    suffix = f" ({', '.join(notes)})" if notes else ""
    print(f"explanation {explanation.explanation_id}: {explanation.state.value}{suffix}")
    if explanation.state is ExplanationState.FAILED:
        print(f"  {explanation.error or 'no reason given'}")
        return 1
    if explanation.state is ExplanationState.CANCELLED:
        print(f"  cancelled by {explanation.cancelled_by or 'an unknown caller'}")
        return 0
    if not explanation.finished:
        print(f"  not finished; wait for it with: sightline explain {explanation.explanation_id} --wait SECONDS")
        return 0
    methods = explanation.token_attribution_methods
    if not methods and explanation.image_methods:
        print_image_cells(explanation, top)
        return 0
    if not methods:
        print(f"  no token attributions (results: {', '.join(explanation.results) or 'none'})")
        return 0
    method = methods[0]
    if by_groups is None:
        by_groups = any(group.end - group.start > 1 for group in explanation.source_groups)
    by_groups = by_groups and explanation.result(method).aggregated is not None
    # A chat prompt's tokens say which message they belong to; rank within those unless asked not to.
    content_only = not by_groups and not all_sources and any(t.message_index is not None for t in explanation.tokens)
    kind = "source groups" if by_groups else "sources"
    within = " within your messages (--all-sources: the chat template's tokens too)" if content_only else ""
    print(f"{method}: top {top} {kind}{within} of each explained token, by |score|")
    width = len(str(len(explanation.tokens)))
    for target_index, position in enumerate(explanation.target_positions):
        token_line = f"  [{position:>{width}}] {explanation.tokens[position].text!r}"
        print(token_line + _target_notes(explanation, target_index))
        for where, text, score in _strongest_sources(explanation, target_index, top, method, by_groups, content_only):
            print(f"      {where} {text!r:<24} {score:+.4f}")
    for name, result in explanation.results.items():
        if result.faithfulness is not None:
            print(f"{name} faithfulness: {_faithfulness_summary(result.faithfulness)}")
    print_image_cells(explanation, top)
    return 0


def _strongest_sources(
    explanation: Explanation, target_index: int, top: int, method: str, by_groups: bool, content_only: bool
) -> list[tuple[str, str, float]]:
    """(where, text, score) of the target's ``top`` strongest source tokens or groups.

    where is [position] or [start:end], padded so that the texts line up; a group's text is its label if it has one.
    """
    width = len(str(len(explanation.tokens)))
    if not by_groups:
        return [
            (f"[{source.position:>{width}}]", source.token.text, source.score)
            for source in explanation.top_sources(target_index, top, method, content_only=content_only)
        ]
    return [
        (f"[{group.start}:{group.end}]".ljust(2 * width + 3), group.label or _text(explanation, group), score)
        for group, score in explanation.top_groups(target_index, top, method)
    ]


def _target_notes(explanation: Explanation, target_index: int) -> str:
    """The foil and step scores of an explained token, for its line."""
    notes = []
    if explanation.foil_token_ids:
        notes.append(f"vs foil {explanation.foil_token_ids[target_index]}")
    scores = explanation.step_scores
    if scores is not None:
        notes.append(
            f"p={scores.probabilities[target_index]:.2f} rank {scores.ranks[target_index]}"
            f" H={scores.entropies[target_index]:.2f}"
        )
    return "".join(f"  {note}" for note in notes)


def _text(explanation: Explanation, group: SourceGroup) -> str:
    return "".join(token.text for token in explanation.tokens[group.start : group.end])


def _faithfulness_summary(faithfulness: Faithfulness) -> str:
    verdict = "beats random" if faithfulness.beats_random else "does not beat random"
    return (
        f"comprehensiveness AOPC {faithfulness.aopc_comprehensiveness:.2f}"
        f" vs random {faithfulness.random_aopc_comprehensiveness:.2f};"
        f" sufficiency AOPC {faithfulness.aopc_sufficiency:.2f} vs random {faithfulness.random_aopc_sufficiency:.2f}"
        f" ({verdict})"
    )


def _path(path: ExplainPath) -> str:
    return f"{path.value} path" if path is not ExplainPath.UNSPECIFIED else "path unknown"


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
        details = [param.type.value]
        if param.default_value is not None:
            details.append(f"default {_param_text(param.default_value)}")
        bounds = _bounds(param)
        if bounds:
            details.append(bounds)
        if param.choices:
            details.append(f"one of {'|'.join(param.choices)}")
        print(f"    {param.name} ({', '.join(details)}): {param.description}")


def _param_text(value: ParamValue) -> str:
    """A parameter value as a person would type it: true/false, 16, 0.5, mean."""
    if isinstance(value, bool):
        return "true" if value else "false"
    return f"{value:.15g}" if isinstance(value, float) else str(value)


def _bounds(param: MethodParam) -> str:
    """``LOW..HIGH``, ``>= LOW`` or ``<= HIGH`` for a bounded parameter, else empty."""
    if param.minimum is not None and param.maximum is not None:
        return f"{param.minimum:.15g}..{param.maximum:.15g}"
    if param.minimum is not None:
        return f">= {param.minimum:.15g}"
    if param.maximum is not None:
        return f"<= {param.maximum:.15g}"
    return ""
