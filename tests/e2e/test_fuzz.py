"""Property-based fuzzing of every request message against a running gateway, over a real socket.

Every generated request must get OK or a precise client error with a message (never INTERNAL, UNKNOWN or
UNAVAILABLE), and the gateway must still be healthy and generating afterwards. Requests are encoded to wire bytes
by hand (tests/protofuzz.py) and sent with an identity serializer, so they can carry what protobuf refuses to
write: invalid UTF-8, unknown fields, nesting past the parser's limit, truncated and corrupted bytes.

The gateway under test is a process of its own in front of the session stack's vLLM, with a Redis of its own
(tests/e2e/isolated_gateway.py): the fuzzer's hundreds of accepted explanation jobs stay in that Redis instead of
occupying the session's explainer worker for the rest of the suite. The worker's side is checked where it meets
the gateway: every job the gateway accepted must decode with the worker's own decoder.

    python -m pytest tests/e2e/test_fuzz.py                              # 2,050 requests, the same ones each run
    SIGHTLINE_FUZZ_SCALE=10 python -m pytest tests/e2e/test_fuzz.py      # 20,500
    SIGHTLINE_FUZZ_SEED=7 python -m pytest tests/e2e/test_fuzz.py        # other requests, reproducible by seed

A new RPC is one entry in RPCS.
"""

from __future__ import annotations

import base64
import json
import math
import os
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import cast

import grpc
import pytest
from google.protobuf.descriptor import Descriptor
from google.protobuf.message import Message
from hypothesis import HealthCheck, given, seed, settings
from hypothesis import strategies as st
from sightline.v1 import explanations_pb2, explanations_pb2_grpc, inference_pb2, inference_pb2_grpc, types_pb2

from common.explain_spec import (
    ParamSpec,
    check_contrastive_support,
    check_distinct_methods,
    check_explained_sequence,
    method_named,
    params_path,
    parse_params,
)
from common.jobs import (
    JOB_STREAM,
    MODELS_KEY,
    RECORD_JOB,
    TURN_EXPLANATION_ID,
    ExplanationJob,
    ModelRecord,
    explanation_key,
)
from deploy.local_stack import LocalStack
from tests.e2e.isolated_gateway import IsolatedGateway, isolated_gateway
from tests.protofuzz import Fields, RequestStrategies, Strategy, WireRequest, param_entries, wire_requests

pytestmark = pytest.mark.e2e

MODEL = "smollm2-135m-instruct"
# What a client may be told about its own request. DEADLINE_EXCEEDED only under a tight deadline (below).
CLIENT_ERRORS = {
    grpc.StatusCode.INVALID_ARGUMENT,
    grpc.StatusCode.NOT_FOUND,
    grpc.StatusCode.OUT_OF_RANGE,
    grpc.StatusCode.FAILED_PRECONDITION,
    grpc.StatusCode.RESOURCE_EXHAUSTED,
}
# Requests that wait for an explanation nobody computes, or generate many tokens, get a tight deadline and may
# end with DEADLINE_EXCEEDED; every other request must be answered well within the generous one.
TIGHT_DEADLINE_S = 0.6
GENEROUS_DEADLINE_S = 30.0
# The fuzzing gateway's default max_tokens: generations stay short.
DEFAULT_MAX_TOKENS = 2
SLOW_MAX_TOKENS = 8
# A status message longer than this is not one a person reads (and large ones overflow gRPC's trailer limits).
MAX_DETAILS_CHARS = 1024
PROMPTS = ("Hello", "What is 2+2?", "Name a colour.", "The capital of France is")
NON_FINITE = (math.nan, math.inf, -math.inf)


@dataclass(frozen=True)
class Known:
    """What plausible requests are made of: the catalogue, the vocabulary, ids of real (pending) explanations
    and a real ListExplanations page token; and the context window the gateway bounds sequences by."""

    methods: list[explanations_pb2.MethodInfo]
    vocab_size: int
    explanation_ids: list[str]
    page_token: str
    context_window: int


@dataclass(frozen=True)
class FuzzedRpc:
    path: str
    request: type[Message]
    response: type[Message]
    # Requests per run; the six RPCs sum to 2,050, fewer where each costs a generation.
    examples: int
    # Plausible values by field path, so that requests get past the first checks.
    plausible: Callable[[Known], Mapping[str, Strategy]] = lambda known: {}
    streaming: bool = False
    # Whether a request may legitimately take long (it then gets the tight deadline).
    slow: Callable[[Fields, Known], bool] = lambda fields, known: False
    # Whether plausible requests queue explanation jobs.
    enqueues: bool = False

    @property
    def name(self) -> str:
        return self.path.rsplit("/", 1)[1]


def _method_spec(method: explanations_pb2.MethodInfo) -> Strategy:
    params = {param.name: _param_value(param) for param in method.params}
    values = st.fixed_dictionaries({}, optional=params)
    # One draw in eight puts a non-finite number in some parameter, declared or not: a float_value may be any
    # double, though JSON (and so json_format) has no spelling for these.
    spoiled = st.tuples(values, st.sampled_from([*params, "not_a_parameter"]), st.sampled_from(NON_FINITE)).map(
        lambda drawn: {**drawn[0], drawn[1]: drawn[2]}
    )
    chosen = st.sampled_from((False,) * 7 + (True,)).flatmap(lambda spoil: spoiled if spoil else values)
    return chosen.map(lambda values: {"name": method.name, "params": param_entries(values)})


def _param_value(param: explanations_pb2.MethodParam) -> Strategy:
    if param.type == explanations_pb2.PARAM_TYPE_BOOL:
        return st.booleans()
    if param.type == explanations_pb2.PARAM_TYPE_STRING:
        return st.sampled_from(list(param.choices)) if param.choices else st.text(max_size=8)
    low = param.minimum if param.HasField("minimum") else -10.0
    high = param.maximum if param.HasField("maximum") else 10.0
    if param.type == explanations_pb2.PARAM_TYPE_INT:
        return st.integers(math.ceil(low), math.floor(min(high, low + 64)))
    return st.floats(low, high)


def _explain_plausible(known: Known, prefix: str = "explain") -> dict[str, Strategy]:
    async_, sync = types_pb2.EXPLAIN_MODE_ASYNC, types_pb2.EXPLAIN_MODE_SYNC
    return {
        f"{prefix}.methods": st.lists(st.sampled_from(known.methods).flatmap(_method_spec), min_size=1, max_size=2),
        f"{prefix}.mode": st.sampled_from((async_, async_, async_, async_, async_, sync)),
        f"{prefix}.targets.output_indices": st.lists(st.integers(0, 2), max_size=2, unique=True).map(sorted),
        f"{prefix}.targets.foil_token_ids": st.lists(st.integers(0, known.vocab_size - 1), max_size=1),
        f"{prefix}.aggregation.spans": st.lists(
            st.fixed_dictionaries({"start": st.integers(0, 3), "end": st.integers(4, 6)}), max_size=1
        ),
        f"{prefix}.step_scores_top_k": st.integers(1, 50),
    }


def _token_ids(known: Known, max_size: int) -> Strategy:
    return st.lists(st.integers(1, known.vocab_size - 1), min_size=1, max_size=max_size)


def _generation_plausible(known: Known) -> dict[str, Strategy]:
    message = st.fixed_dictionaries(
        {"role": st.sampled_from(("system", "user", "assistant")), "content": st.sampled_from(PROMPTS)}
    )
    return {
        "model": st.sampled_from(("", MODEL)),
        "input": st.one_of(
            st.fixed_dictionaries({"prompt": st.sampled_from(PROMPTS)}),
            st.fixed_dictionaries(
                {"chat": st.fixed_dictionaries({"messages": st.lists(message, min_size=1, max_size=2)})}
            ),
            st.fixed_dictionaries({"prompt_token_ids": st.fixed_dictionaries({"ids": _token_ids(known, 6)})}),
        ),
        "sampling.max_tokens": st.integers(1, 2),
        "sampling.temperature": st.floats(0, 2),
        "sampling.top_p": st.floats(0.05, 1),
        "sampling.top_k": st.integers(0, 40),
        "sampling.seed": st.integers(0, 2**31 - 1),
        "sampling.stop": st.lists(st.sampled_from(("\n", ".", "stop")), max_size=2),
        "request_id": st.text("0123456789abcdef", max_size=16),
        **_explain_plausible(known),
    }


def _explain_rpc_plausible(known: Known) -> dict[str, Strategy]:
    return {
        "model": st.sampled_from(("", MODEL)),
        "prompt_token_ids": _token_ids(known, 6),
        "output_token_ids": _token_ids(known, 3),
        "output_logprobs": st.lists(st.floats(-20, 0, width=32), max_size=1),
        "request_id": st.text("0123456789abcdef", max_size=16),
        **_explain_plausible(known),
    }


def _get_explanation_plausible(known: Known) -> dict[str, Strategy]:
    return {
        "explanation_id": st.sampled_from([*known.explanation_ids, "exp_" + "0" * 32]),
        "wait_seconds": st.floats(0, 0.25, width=32),
    }


def _list_explanations_plausible(known: Known) -> dict[str, Strategy]:
    # Tokens shaped like the server's own (base64 of a JSON [created ms, id]) with odd numbers in them.
    odd = st.sampled_from((math.nan, math.inf, -math.inf, 1e308, 10**400, -1))
    crafted = st.tuples(st.one_of(odd, st.floats(), st.integers(), st.text(max_size=4)), st.text(max_size=8)).map(
        lambda cursor: base64.urlsafe_b64encode(json.dumps(list(cursor)).encode()).decode()
    )
    return {"page_size": st.integers(0, 120), "page_token": st.one_of(st.just(known.page_token), crafted)}


def _int32(value: object) -> int:
    # What a parser reads from a varint drawn wider than the int32 field it fills.
    assert isinstance(value, int)
    number = value % 2**32
    return number - 2**32 if number >= 2**31 else number


def _waits_for_a_worker(explain: object) -> bool:
    return (
        isinstance(explain, dict)
        and bool(explain.get("methods"))
        and _int32(explain.get("mode", 0)) != types_pb2.EXPLAIN_MODE_ASYNC
    )


def _generation_is_slow(fields: Fields, known: Known) -> bool:
    sampling = fields.get("sampling")
    max_tokens = sampling.get("max_tokens", DEFAULT_MAX_TOKENS) if isinstance(sampling, dict) else DEFAULT_MAX_TOKENS
    return _waits_for_a_worker(fields.get("explain")) or _int32(max_tokens) > SLOW_MAX_TOKENS


def _explain_is_slow(fields: Fields, known: Known) -> bool:
    # Explain always explains: with no methods it runs the server's default method, so anything but ASYNC waits.
    explain = fields.get("explain")
    mode = explain.get("mode", 0) if isinstance(explain, dict) else 0
    return _int32(mode) != types_pb2.EXPLAIN_MODE_ASYNC


def _get_explanation_is_slow(fields: Fields, known: Known) -> bool:
    return fields.get("explanation_id") in known.explanation_ids and not fields.get("wait_seconds", 0.0) <= 0.0


RPCS = (
    FuzzedRpc(
        "/sightline.v1.InferenceService/Generate",
        inference_pb2.GenerateRequest,
        inference_pb2.GenerateResponse,
        examples=400,
        plausible=_generation_plausible,
        slow=_generation_is_slow,
        enqueues=True,
    ),
    FuzzedRpc(
        "/sightline.v1.InferenceService/GenerateStream",
        inference_pb2.GenerateRequest,
        inference_pb2.GenerateStreamResponse,
        examples=200,
        plausible=_generation_plausible,
        streaming=True,
        slow=_generation_is_slow,
        enqueues=True,
    ),
    FuzzedRpc(
        "/sightline.v1.ExplanationsService/Explain",
        explanations_pb2.ExplainRequest,
        explanations_pb2.ExplainResponse,
        examples=600,
        plausible=_explain_rpc_plausible,
        slow=_explain_is_slow,
        enqueues=True,
    ),
    FuzzedRpc(
        "/sightline.v1.ExplanationsService/GetExplanation",
        explanations_pb2.GetExplanationRequest,
        explanations_pb2.GetExplanationResponse,
        examples=350,
        plausible=_get_explanation_plausible,
        slow=_get_explanation_is_slow,
    ),
    FuzzedRpc(
        "/sightline.v1.ExplanationsService/ListExplanations",
        explanations_pb2.ListExplanationsRequest,
        explanations_pb2.ListExplanationsResponse,
        examples=300,
        plausible=_list_explanations_plausible,
    ),
    FuzzedRpc(
        "/sightline.v1.ExplanationsService/ListMethods",
        explanations_pb2.ListMethodsRequest,
        explanations_pb2.ListMethodsResponse,
        examples=200,
    ),
)


def _examples(rpc: FuzzedRpc) -> int:
    return math.ceil(rpc.examples * float(os.environ.get("SIGHTLINE_FUZZ_SCALE", "1")))


def _settings(examples: int) -> settings:
    return settings(
        max_examples=examples,
        deadline=None,
        database=None,
        # The same requests every run unless SIGHTLINE_FUZZ_SEED asks for others.
        derandomize="SIGHTLINE_FUZZ_SEED" not in os.environ,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.large_base_example],
    )


@pytest.fixture(scope="module")
def fuzz_gateway(stack: LocalStack, tmp_path_factory: pytest.TempPathFactory) -> Iterator[IsolatedGateway]:
    env = {"SIGHTLINE_DEFAULT_MAX_TOKENS": str(DEFAULT_MAX_TOKENS)}
    with isolated_gateway(stack, "fuzz-gateway", tmp_path_factory.mktemp("fuzz-gateway"), env) as gateway:
        yield gateway


@pytest.fixture(scope="module")
def fuzz_channel(fuzz_gateway: IsolatedGateway) -> Iterator[grpc.Channel]:
    with grpc.insecure_channel(fuzz_gateway.address) as channel:
        yield channel


@pytest.fixture(scope="module")
def known(stack: LocalStack, fuzz_gateway: IsolatedGateway, fuzz_channel: grpc.Channel) -> Known:
    stub = explanations_pb2_grpc.ExplanationsServiceStub(fuzz_channel)
    methods = list(stub.ListMethods(explanations_pb2.ListMethodsRequest(), timeout=10).methods)
    record = fuzz_gateway.redis.hget(MODELS_KEY, MODEL)
    assert isinstance(record, bytes)
    pending = [
        stub.Explain(
            explanations_pb2.ExplainRequest(
                prompt_token_ids=[1, 2, 3],
                output_token_ids=[4 + i],
                explain=types_pb2.ExplainSpec(
                    methods=[types_pb2.MethodSpec(name="logit_lens")], mode=types_pb2.EXPLAIN_MODE_ASYNC
                ),
            ),
            timeout=10,
        ).explanation_id
        for i in range(2)
    ]
    listed = stub.ListExplanations(explanations_pb2.ListExplanationsRequest(page_size=1), timeout=10)
    assert listed.next_page_token
    vocab_size = ModelRecord.from_json(record).vocab_size
    return Known(
        methods,
        vocab_size,
        explanation_ids=pending,
        page_token=listed.next_page_token,
        context_window=stack.config.max_model_len,
    )


@dataclass
class Tally:
    calls: int = 0
    codes: dict[str, int] = field(default_factory=dict)
    # Requests with NaN or an infinity somewhere in a method's params.
    non_finite_params: int = 0

    def count(self, code: grpc.StatusCode) -> None:
        self.calls += 1
        self.codes[code.name] = self.codes.get(code.name, 0) + 1


def _holds_non_finite_params(fields: Fields) -> bool:
    """Whether a drawn request's explain spec puts NaN or an infinity in a method's params."""
    methods = fields.get("explain", {}).get("methods", []) if isinstance(fields.get("explain"), dict) else []
    return any(isinstance(m, dict) and _holds_non_finite(m.get("params")) for m in methods)


def _holds_non_finite(value: object) -> bool:
    if isinstance(value, float):
        return not math.isfinite(value)
    if isinstance(value, dict):
        return any(_holds_non_finite(item) for item in value.values())
    if isinstance(value, list):
        return any(_holds_non_finite(item) for item in value)
    return False


def _send(channel: grpc.Channel, rpc: FuzzedRpc, wire: bytes, timeout: float) -> grpc.StatusCode:
    """Send raw request bytes; the status the gateway answered with."""
    try:
        if rpc.streaming:
            responses = channel.unary_stream(
                rpc.path, request_serializer=bytes, response_deserializer=rpc.response.FromString
            )(wire, timeout=timeout)
            for _ in responses:
                pass
        else:
            channel.unary_unary(rpc.path, request_serializer=bytes, response_deserializer=rpc.response.FromString)(
                wire, timeout=timeout
            )
    except grpc.RpcError as error:
        code, details = error.code(), error.details() or ""
        tight = timeout == TIGHT_DEADLINE_S
        allowed = CLIENT_ERRORS | ({grpc.StatusCode.DEADLINE_EXCEEDED} if tight else set())
        assert code in allowed, f"{rpc.name} answered {code.name}: {details[:2000]}"
        assert details.strip(), f"{rpc.name} answered {code.name} without a message"
        assert len(details) <= MAX_DETAILS_CHARS, f"{rpc.name}: {len(details)}-character message: {details[:300]}…"
        return code
    return grpc.StatusCode.OK


def _assert_healthy(gateway: IsolatedGateway, channel: grpc.Channel) -> None:
    assert gateway.serving()
    response = inference_pb2_grpc.InferenceServiceStub(channel).Generate(
        inference_pb2.GenerateRequest(
            input=inference_pb2.GenerationInput(prompt="The capital of France is"),
            sampling=types_pb2.SamplingParams(max_tokens=2),
        ),
        timeout=60,
    )
    assert len(response.output_tokens) == 2 and response.text


@pytest.mark.parametrize("rpc", RPCS, ids=lambda rpc: rpc.name)
def test_every_request_gets_a_precise_status(
    rpc: FuzzedRpc, fuzz_gateway: IsolatedGateway, fuzz_channel: grpc.Channel, known: Known
) -> None:
    examples = _examples(rpc)
    tally = Tally()
    requests = wire_requests(cast(Descriptor, rpc.request.DESCRIPTOR), RequestStrategies(rpc.plausible(known)))

    @_settings(examples)
    @given(request=requests)
    def answered_precisely(request: WireRequest) -> None:
        timeout = TIGHT_DEADLINE_S if rpc.slow(request.fields, known) else GENEROUS_DEADLINE_S
        tally.count(_send(fuzz_channel, rpc, request.wire, timeout))
        tally.non_finite_params += _holds_non_finite_params(request.fields)

    if "SIGHTLINE_FUZZ_SEED" in os.environ:
        answered_precisely = seed(int(os.environ["SIGHTLINE_FUZZ_SEED"]))(answered_precisely)
    queued_before = fuzz_gateway.redis.xlen(JOB_STREAM)
    answered_precisely()
    print(
        f"{rpc.name}: {tally.calls} requests ({tally.non_finite_params} with non-finite params), statuses {tally.codes}"
    )
    assert tally.calls >= examples
    _assert_healthy(fuzz_gateway, fuzz_channel)

    # Every job the gateway accepted is one a worker can read: each turn's job, kept in its record.
    queued = cast(list[tuple[bytes, dict[bytes, bytes]]], fuzz_gateway.redis.xrange(JOB_STREAM))[queued_before:]
    if rpc.enqueues:
        assert queued, f"no fuzzed {rpc.name} request queued a job: the plausible requests are not plausible"
        # Regression (issue 13): a non-finite number in params answered INTERNAL; the fuzzer must keep sending them.
        assert tally.non_finite_params, f"no fuzzed {rpc.name} request put NaN or an infinity in a method's params"
    for _, turn in queued:
        explanation_id = turn[TURN_EXPLANATION_ID.encode()].decode()
        job = ExplanationJob.from_json(
            cast(bytes, fuzz_gateway.redis.hget(explanation_key(explanation_id), RECORD_JOB))
        )
        assert job.explanation_id == explanation_id and job.methods and job.output_token_ids
        _assert_a_worker_accepts(job, known)


def _assert_a_worker_accepts(job: ExplanationJob, known: Known) -> None:
    """A job the gateway enqueued passes the explain spec's rules that a worker checks again on every job it takes
    (the same code, common/explain_spec.py), with the bounds of the model the workers hold: its catalogue's
    parameter maxima and vocabulary."""
    catalogue = {info.name: info for info in known.methods}
    check_distinct_methods([method.name for method in job.methods])
    for index, method in enumerate(job.methods):
        info = method_named(method.name, catalogue)
        declared = [ParamSpec.from_info(param) for param in info.params]
        parse_params(method.name, declared, method.params, params_path(index))
    contrastive = {method.name: catalogue[method.name].supports_contrastive_targets for method in job.methods}
    check_contrastive_support(job.options.foil_token_ids, contrastive)
    check_explained_sequence(
        job.prompt_token_ids,
        job.output_token_ids,
        job.served_logprobs,
        job.options,
        context_window=known.context_window,
        vocab_size=known.vocab_size,
    )
