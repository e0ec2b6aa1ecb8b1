"""An in-process fake of the Sightline gateway, served by a real gRPC server in the tests.

The canned sequence is "The capital of France" (prompt, positions 0-3) followed by
the generated " is" and " Paris" (positions 4 and 5, the explained targets). Every
explanation carries step scores, as the real one does; foils, the target score, source
groups and faithfulness follow the explain spec (but the targets are always both tokens).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import grpc
from fake_pictures import attach_picture_results
from sightline.v1 import (
    explanations_pb2,
    explanations_pb2_grpc,
    inference_pb2,
    inference_pb2_grpc,
    types_pb2,
)

PROMPT_TOKENS = [(464, "The"), (3139, " capital"), (286, " of"), (4881, " France")]
OUTPUT_TOKENS = [(318, " is", -0.25), (6342, " Paris", -0.5)]
TARGET_POSITIONS = [4, 5]
# Row i scores the sources of target i. The 9.0 sits at target 0's own position, where
# the contract says 0: it must never be ranked, since it is outside the causal prefix.
# All values are exact in float32, so that tests can compare them with ==.
SALIENCY = [
    [0.125, -0.5, 0.25, 0.375, 9.0],
    [0.0625, 0.5, -0.0625, -0.875, 0.5],
]
# logit lens over 2 layers (+ embeddings), 2 targets, top 2.
LENS_TOP_IDS = [[[1, 2], [3, 4]], [[5, 6], [7, 8]], [[9, 10], [11, 12]]]
LENS_TOP_LOGPROBS = [[[-1.0, -2.0], [-1.5, -2.5]], [[-0.5, -3.0], [-0.25, -4.0]], [[-0.125, -5.0], [-0.0625, -6.0]]]
LENS_TARGET_LOGPROBS = [[-7.0, -8.0], [-3.0, -2.0], [-0.25, -0.5]]
GENERATED_TEXT = " is Paris"
# Step scores of the two targets, with the top 2 alternatives.
STEP_LOGPROBS = [-0.25, -0.5]
STEP_PROBABILITIES = [0.75, 0.625]
STEP_ENTROPIES = [0.5, 1.25]
STEP_RANKS = [1, 2]
STEP_TOP_IDS = [[318, 373], [12366, 6342]]
STEP_TOP_LOGPROBS = [[-0.25, -2.0], [-0.375, -0.5]]
# Source groups of any aggregation but by token, and saliency's attributions over them. As in
# SALIENCY, cells of groups that start at or after the target (the 9.0, the -7.0) must not rank.
SOURCE_GROUPS = [(0, 2, ""), (2, 4, "where"), (4, 5, ""), (5, 6, "")]
AGGREGATED = [
    [-0.375, 0.625, 9.0, -7.0],
    [0.5625, -0.9375, 0.5, -7.0],
]
# Saliency's faithfulness, which beats random attributions.
FAITHFULNESS = types_pb2.Faithfulness(
    fractions=[0.25, 0.5],
    comprehensiveness=[0.5, 1.125],
    sufficiency=[0.125, 0.0],
    random_comprehensiveness=[0.0625, 0.1875],
    random_sufficiency=[0.75, 0.5],
    aopc_comprehensiveness=0.8125,
    aopc_sufficiency=0.0625,
    random_aopc_comprehensiveness=0.125,
    random_aopc_sufficiency=0.625,
    replacement_token_id=50256,
)
TOKEN_GRANULARITIES = (types_pb2.GRANULARITY_UNSPECIFIED, types_pb2.GRANULARITY_TOKEN)
# A spec that asks for everything the fake can answer: a contrastive probability, words, faithfulness.
RICH_SPEC = types_pb2.ExplainSpec(
    methods=[types_pb2.MethodSpec(name="saliency")],
    targets=types_pb2.TargetSpec(foil_token_ids=[7], score=types_pb2.TARGET_SCORE_PROBABILITY),
    aggregation=types_pb2.AggregationSpec(granularity=types_pb2.GRANULARITY_WORD),
    faithfulness=True,
)


def flatten(nested: Sequence[object]) -> list[float]:
    flat: list[float] = []
    for item in nested:
        if isinstance(item, Sequence):
            flat.extend(flatten(item))
        else:
            assert isinstance(item, int | float)
            flat.append(item)
    return flat


def float32_tensor(values: Sequence[float], shape: Sequence[int]) -> types_pb2.Tensor:
    return types_pb2.Tensor(dtype=types_pb2.DTYPE_FLOAT32, shape=shape, float_values=values)


def int32_tensor(values: Sequence[int], shape: Sequence[int]) -> types_pb2.Tensor:
    return types_pb2.Tensor(dtype=types_pb2.DTYPE_INT32, shape=shape, int_values=values)


def output_tokens() -> list[types_pb2.Token]:
    return [types_pb2.Token(id=token_id, text=text, logprob=logprob) for token_id, text, logprob in OUTPUT_TOKENS]


def make_explanation(
    explanation_id: str,
    state: types_pb2.ExplanationState = types_pb2.EXPLANATION_STATE_SUCCEEDED,
    error: str = "",
    spec: types_pb2.ExplainSpec | None = None,
) -> types_pb2.Explanation:
    explanation = types_pb2.Explanation(explanation_id=explanation_id, state=state, model="tiny-lm")
    if error:
        explanation.error.CopyFrom(
            types_pb2.ExplanationError(code=types_pb2.EXPLANATION_ERROR_CODE_INVALID_INPUT, message=error)
        )
    if state != types_pb2.EXPLANATION_STATE_SUCCEEDED:
        return explanation
    explanation.weights_digest = "sha256:abc"
    explanation.explain_path = types_pb2.EXPLAIN_PATH_FAST
    explanation.architecture = "llama"
    explanation.tokens.extend(types_pb2.Token(id=token_id, text=text) for token_id, text in PROMPT_TOKENS)
    explanation.tokens.extend(output_tokens())
    explanation.prompt_length = len(PROMPT_TOKENS)
    explanation.target_positions.extend(TARGET_POSITIONS)
    explanation.results.add(
        method="logit_lens",
        extras={
            "top_token_ids": int32_tensor([int(v) for v in flatten(LENS_TOP_IDS)], [3, 2, 2]),
            "top_logprobs": float32_tensor(flatten(LENS_TOP_LOGPROBS), [3, 2, 2]),
            "target_logprobs": float32_tensor(flatten(LENS_TARGET_LOGPROBS), [3, 2]),
        },
        seconds=0.5,
    )
    saliency = explanation.results.add(
        method="saliency", attributions=float32_tensor(flatten(SALIENCY), [2, 5]), seconds=0.25
    )
    explanation.step_scores.CopyFrom(
        types_pb2.StepScores(
            logprobs=STEP_LOGPROBS,
            probabilities=STEP_PROBABILITIES,
            entropies=STEP_ENTROPIES,
            ranks=STEP_RANKS,
            top_token_ids=int32_tensor([int(v) for v in flatten(STEP_TOP_IDS)], [2, 2]),
            top_logprobs=float32_tensor(flatten(STEP_TOP_LOGPROBS), [2, 2]),
        )
    )
    spec = spec or types_pb2.ExplainSpec()
    foils = list(spec.targets.foil_token_ids)
    explanation.foil_token_ids.extend(foils * len(TARGET_POSITIONS) if len(foils) == 1 else foils)
    explanation.target_score = spec.targets.score or types_pb2.TARGET_SCORE_LOGPROB
    if spec.aggregation.granularity not in TOKEN_GRANULARITIES:
        explanation.source_groups.extend(
            types_pb2.SourceGroup(start=start, end=end, label=label) for start, end, label in SOURCE_GROUPS
        )
        saliency.aggregated.CopyFrom(float32_tensor(flatten(AGGREGATED), [2, len(SOURCE_GROUPS)]))
    if spec.faithfulness:
        saliency.faithfulness.CopyFrom(FAITHFULNESS)
    explanation.fidelity.recomputed_logprobs.extend([-0.25, -0.5])
    explanation.fidelity.max_abs_logprob_diff = 0.001
    explanation.cache_hit = True
    explanation.trace_id = "trace-1"
    explanation.attempts = 1
    explanation.created_at.FromSeconds(1_700_000_000)
    return explanation


def summary(explanation_id: str) -> explanations_pb2.ExplanationSummary:
    """What ListExplanations reports of one of the canned explanations."""
    explanation = FakeSightline().explanations[explanation_id]
    listed = explanations_pb2.ExplanationSummary(
        explanation_id=explanation_id,
        state=explanation.state,
        model=explanation.model,
        methods=["saliency", "logit_lens"],
        trace_id="trace-1",
    )
    listed.created_at.FromSeconds(1_700_000_000)
    return listed


class FakeSightline(inference_pb2_grpc.InferenceServiceServicer, explanations_pb2_grpc.ExplanationsServiceServicer):
    """Answers every RPC with canned data and records what it was sent.

    The prompt "" is refused with INVALID_ARGUMENT, as the real gateway would; the
    prompt "malformed" gets an explanation whose attribution matrix has the wrong shape.
    """

    def __init__(self) -> None:
        self.target = ""
        self.requests: list[object] = []
        self.metadata: list[dict[str, str | bytes]] = []
        self.explanations = {
            "exp-1": make_explanation("exp-1"),
            "exp-pending": make_explanation("exp-pending", types_pb2.EXPLANATION_STATE_RUNNING),
            "exp-failed": make_explanation(
                "exp-failed", types_pb2.EXPLANATION_STATE_FAILED, "explainer ran out of memory"
            ),
            "exp-grouped": make_explanation("exp-grouped", spec=RICH_SPEC),
        }

    def _record(self, request: object, context: grpc.ServicerContext) -> None:
        self.requests.append(request)
        self.metadata.append(dict(context.invocation_metadata()))

    def _explanation_for(self, prompt: str, spec: types_pb2.ExplainSpec) -> tuple[str, types_pb2.Explanation | None]:
        if not spec.methods:
            return "", None
        if spec.mode == types_pb2.EXPLAIN_MODE_ASYNC:
            return "exp-1", None
        explanation = make_explanation("exp-1", spec=spec)
        if prompt == "malformed":
            explanation.results[1].attributions.shape[:] = [5, 2]
        return "exp-1", explanation

    def Generate(
        self, request: inference_pb2.GenerateRequest, context: grpc.ServicerContext
    ) -> inference_pb2.GenerateResponse:
        self._record(request, context)
        if request.input.WhichOneof("kind") == "prompt" and not request.input.prompt:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, "prompt is empty")
        explanation_id, explanation = self._explanation_for(request.input.prompt, request.explain)
        attach_picture_results(explanation, request)
        return inference_pb2.GenerateResponse(
            request_id=request.request_id or "req-generated",
            trace_id="trace-1",
            model=request.model or "tiny-lm",
            text=GENERATED_TEXT,
            prompt_token_ids=[token_id for token_id, _ in PROMPT_TOKENS],
            output_tokens=output_tokens(),
            # "too long" stands for a prompt that leaves the output less room than max_tokens.
            finish_reason=(
                types_pb2.FINISH_REASON_CONTEXT_LENGTH
                if request.input.prompt == "too long"
                else types_pb2.FINISH_REASON_STOP
            ),
            usage=types_pb2.Usage(input_tokens=len(PROMPT_TOKENS), output_tokens=len(OUTPUT_TOKENS)),
            explanation_id=explanation_id,
            explanation=explanation,
        )

    def GenerateStream(
        self, request: inference_pb2.GenerateRequest, context: grpc.ServicerContext
    ) -> Iterator[inference_pb2.GenerateStreamResponse]:
        self._record(request, context)
        tokens = output_tokens()
        yield inference_pb2.GenerateStreamResponse(
            request_id="req-stream",
            trace_id="trace-1",
            start=inference_pb2.GenerateStreamStart(
                model="tiny-lm", prompt_token_ids=[token_id for token_id, _ in PROMPT_TOKENS]
            ),
        )
        yield inference_pb2.GenerateStreamResponse(
            request_id="req-stream",
            trace_id="trace-1",
            delta=inference_pb2.GenerateStreamDelta(output_tokens=tokens[:1], text_delta=tokens[0].text),
        )
        yield inference_pb2.GenerateStreamResponse(
            request_id="req-stream",
            trace_id="trace-1",
            delta=inference_pb2.GenerateStreamDelta(output_tokens=tokens[1:], text_delta=tokens[1].text),
        )
        explanation_id, explanation = self._explanation_for(request.input.prompt, request.explain)
        attach_picture_results(explanation, request)
        yield inference_pb2.GenerateStreamResponse(
            request_id="req-stream",
            trace_id="trace-1",
            end=inference_pb2.GenerateStreamEnd(
                finish_reason=types_pb2.FINISH_REASON_LENGTH,
                usage=types_pb2.Usage(input_tokens=len(PROMPT_TOKENS), output_tokens=len(OUTPUT_TOKENS)),
                explanation_id=explanation_id,
                explanation=explanation,
            ),
        )

    def Explain(
        self, request: explanations_pb2.ExplainRequest, context: grpc.ServicerContext
    ) -> explanations_pb2.ExplainResponse:
        self._record(request, context)
        explanation_id, explanation = self._explanation_for("", request.explain)
        return explanations_pb2.ExplainResponse(
            request_id="req-explain", explanation_id=explanation_id, explanation=explanation
        )

    def GetExplanation(
        self, request: explanations_pb2.GetExplanationRequest, context: grpc.ServicerContext
    ) -> explanations_pb2.GetExplanationResponse:
        self._record(request, context)
        if request.explanation_id not in self.explanations:
            context.abort(grpc.StatusCode.NOT_FOUND, f"no explanation {request.explanation_id!r}")
        return explanations_pb2.GetExplanationResponse(explanation=self.explanations[request.explanation_id])

    def WatchExplanation(
        self, request: explanations_pb2.WatchExplanationRequest, context: grpc.ServicerContext
    ) -> Iterator[explanations_pb2.WatchExplanationResponse]:
        """The stored explanation, once: its final state."""
        self._record(request, context)
        if request.explanation_id not in self.explanations:
            context.abort(grpc.StatusCode.NOT_FOUND, f"no explanation {request.explanation_id!r}")
        yield explanations_pb2.WatchExplanationResponse(explanation=self.explanations[request.explanation_id])

    def ListExplanations(
        self, request: explanations_pb2.ListExplanationsRequest, context: grpc.ServicerContext
    ) -> explanations_pb2.ListExplanationsResponse:
        """Two pages: "exp-1" (with the token "page-2"), then "exp-failed"."""
        self._record(request, context)
        if request.page_token == "page-2":
            return explanations_pb2.ListExplanationsResponse(explanations=[summary("exp-failed")])
        return explanations_pb2.ListExplanationsResponse(explanations=[summary("exp-1")], next_page_token="page-2")

    def ListMethods(
        self, request: explanations_pb2.ListMethodsRequest, context: grpc.ServicerContext
    ) -> explanations_pb2.ListMethodsResponse:
        self._record(request, context)
        return explanations_pb2.ListMethodsResponse(
            model="tiny-lm",
            architecture="llama",
            explain_path=types_pb2.EXPLAIN_PATH_FAST,
            methods=[
                explanations_pb2.MethodInfo(
                    name="saliency",
                    description="Gradient x input.",
                    params=[
                        explanations_pb2.MethodParam(
                            name="normalize",
                            type=explanations_pb2.PARAM_TYPE_BOOL,
                            default_value=types_pb2.ParamValue(bool_value=True),
                            description="scale each row to unit L1 norm",
                        ),
                        explanations_pb2.MethodParam(
                            name="steps",
                            type=explanations_pb2.PARAM_TYPE_INT,
                            default_value=types_pb2.ParamValue(int_value=32),
                            description="interpolation steps",
                            minimum=1,
                            maximum=256,
                        ),
                        explanations_pb2.MethodParam(
                            name="scale",
                            type=explanations_pb2.PARAM_TYPE_FLOAT,
                            description="multiplier",
                            minimum=0.5,
                        ),
                        explanations_pb2.MethodParam(
                            name="baseline",
                            type=explanations_pb2.PARAM_TYPE_STRING,
                            default_value=types_pb2.ParamValue(string_value="pad"),
                            description="what replaces a token",
                            choices=["pad", "zero", "mask"],
                        ),
                    ],
                    needs_gradients=True,
                    attributes_tokens=True,
                ),
                explanations_pb2.MethodInfo(
                    name="logit_lens", description="Decode every layer's residual stream.", uses_cache=True
                ),
            ],
        )
