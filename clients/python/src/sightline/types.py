"""Typed, immutable views of Sightline's protobuf messages.

Every object the clients return directly (``Generation``, ``StreamChunk``,
``Explanation``, ``MethodInfo``) keeps the message it was converted from as
``raw``, for fields this module does not map and for proto JSON output.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from enum import StrEnum
from typing import Literal, NamedTuple, TypeAlias, get_args

from google.protobuf import timestamp_pb2
from sightline.image_results import ImageGrid, ImageResults, ModalityShare, image_attributions
from sightline.matrix import Matrix, optional_matrix
from sightline.v1 import explanations_pb2, inference_pb2, types_pb2

# ---------------------------------------------------------------------------
# Inputs

# content: text, or a list mixing text with pictures (sightline.images.ContentPart).
ChatMessage: TypeAlias = Mapping[str, object]
"""``{"role": "system" | "user" | "assistant", "content": "..."}``."""

Prompt: TypeAlias = str | Sequence[ChatMessage] | Sequence[int]
"""Plain text, chat messages (rendered with the model's chat template), or token ids used as given."""

ParamValue: TypeAlias = bool | int | float | str

ExplainMethods: TypeAlias = str | Sequence[str] | Mapping[str, Mapping[str, ParamValue]]
"""A method name, method names, or method names mapped to their parameters (see ``list_methods``)."""

ExplainModeName: TypeAlias = Literal["sync", "async"]

TargetScoreName: TypeAlias = Literal["logprob", "probability", "logit"]
"""What an explained token's score is: log p(token | prefix), p(token | prefix) or its logit."""

GranularityName: TypeAlias = Literal["token", "word", "span"]

NormalizationName: TypeAlias = Literal["none", "l1", "max_abs"]


@dataclass(frozen=True)
class ExplainOptions:
    """What to explain and how to present it, besides the methods; the defaults are the server's.

    ``output_indices`` picks generated tokens to explain (0 is the first generated token;
    ascending, distinct); empty explains all of them. ``foil_token_ids`` makes the
    explanation contrastive, attributing ``score(token) - score(foil)``: one id for every
    target or one per explained token. ``score`` is what is attributed.

    Besides the token matrix, which always comes back, each method's attributions are
    aggregated per ``granularity`` (``"word"`` merges sub-word tokens; ``"span"`` uses
    ``spans``, half-open ``(start, end, label)`` token ranges that must not overlap), of
    absolute values when ``absolute``, with each row normalized per ``normalization``; see
    ``Explanation.top_groups``. ``faithfulness`` asks for comprehensiveness and sufficiency
    of each token-attributing method. ``step_scores_top_k`` is how many alternatives the step
    scores list per explained token (server default 5, at most 50).
    """

    output_indices: Sequence[int] = ()
    foil_token_ids: Sequence[int] = ()
    score: TargetScoreName = "logprob"
    granularity: GranularityName = "token"
    spans: Sequence[tuple[int, int, str]] = ()
    absolute: bool = False
    normalization: NormalizationName = "none"
    faithfulness: bool = False
    step_scores_top_k: int | None = None
    keep_on_disconnect: bool = False
    """In sync mode, let the job run on if this call ends (e.g. interrupted) before it is done; by default the
    server cancels it."""
    image_grid: tuple[int, int] | None = None
    """(rows, cols) of the grid pictures are scored on; None takes the model's (a cell per image token)."""

    def __post_init__(self) -> None:
        for name, allowed in (
            ("score", get_args(TargetScoreName)),
            ("granularity", get_args(GranularityName)),
            ("normalization", get_args(NormalizationName)),
        ):
            if getattr(self, name) not in allowed:
                raise ValueError(f"{name} must be one of {', '.join(allowed)}; got {getattr(self, name)!r}")
        if self.spans and self.granularity != "span":
            raise ValueError(f"spans are only used with granularity='span', not {self.granularity!r}")
        if self.granularity == "span" and not self.spans:
            raise ValueError("granularity='span' needs spans")
        if self.image_grid is not None and (len(self.image_grid) != 2 or min(self.image_grid) < 1):
            raise ValueError(f"image_grid is (rows, cols), each at least 1; got {self.image_grid!r}")
        # Tuples, so that the options stay immutable and hashable whatever sequences they were given.
        object.__setattr__(self, "output_indices", tuple(self.output_indices))
        object.__setattr__(self, "foil_token_ids", tuple(self.foil_token_ids))
        object.__setattr__(self, "spans", tuple((start, end, label) for start, end, label in self.spans))


# ---------------------------------------------------------------------------
# Enumerations


class FinishReason(StrEnum):
    UNSPECIFIED = "unspecified"
    STOP = "stop"
    """A stop token or stop string ended generation."""
    LENGTH = "length"
    """max_tokens ended generation."""
    ABORT = "abort"
    """The request was aborted upstream."""
    CONTEXT_LENGTH = "context_length"
    """The model's context window filled before max_tokens was reached: the output is shorter than asked for."""


class ExplanationState(StrEnum):
    UNSPECIFIED = "unspecified"
    PENDING = "pending"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"


class TargetScore(StrEnum):
    """What an explained token's score was; attributions explain this number."""

    UNSPECIFIED = "unspecified"
    LOGPROB = "logprob"
    PROBABILITY = "probability"
    LOGIT = "logit"


class TokenRole(StrEnum):
    """Which part of a sequence a token belongs to (``Token.role``)."""

    UNSPECIFIED = "unspecified"
    TEMPLATE = "template"
    """Markup the chat template added: special tokens, role names, separators, the generation prompt."""
    SYSTEM = "system"
    """A system message's content, or the default system prompt the chat template inserts."""
    USER = "user"
    ASSISTANT = "assistant"
    """An earlier assistant message's content, in the prompt."""
    PROMPT = "prompt"
    """A prompt given as text or token ids: all of it the caller's."""
    OUTPUT = "output"
    IMAGE = "image"
    """A placeholder standing for part of a picture (its message_index is the message holding the picture)."""


class ExplanationErrorCode(StrEnum):
    UNSPECIFIED = "unspecified"
    INVALID_INPUT = "invalid_input"
    """The job is invalid for the model the workers hold; not retried. Fix the request."""
    ATTEMPTS_EXHAUSTED = "attempts_exhausted"
    """Every worker that took the job stopped before finishing it."""
    INTERNAL = "internal"
    """A method failed unexpectedly on every attempt; ``details["exception"]`` names the error."""


class ExplainPath(StrEnum):
    """How the explainer differentiated the model: both are exact, they differ in speed."""

    UNSPECIFIED = "unspecified"
    FAST = "fast"
    """Decoder layers run and differentiated by hand (Llama's skeleton: Llama, Mistral, Qwen2, Qwen3, Phi-3)."""
    GENERAL = "general"
    """Autograd over the Hugging Face module itself (any supported architecture)."""


class ParamType(StrEnum):
    UNSPECIFIED = "unspecified"
    INT = "int"
    FLOAT = "float"
    STRING = "string"
    BOOL = "bool"


# Values a newer server may add map to UNSPECIFIED rather than failing the whole response.
_FINISH_REASONS = {
    types_pb2.FINISH_REASON_STOP: FinishReason.STOP,
    types_pb2.FINISH_REASON_LENGTH: FinishReason.LENGTH,
    types_pb2.FINISH_REASON_ABORT: FinishReason.ABORT,
    types_pb2.FINISH_REASON_CONTEXT_LENGTH: FinishReason.CONTEXT_LENGTH,
}
_EXPLANATION_STATES = {
    types_pb2.EXPLANATION_STATE_PENDING: ExplanationState.PENDING,
    types_pb2.EXPLANATION_STATE_RUNNING: ExplanationState.RUNNING,
    types_pb2.EXPLANATION_STATE_SUCCEEDED: ExplanationState.SUCCEEDED,
    types_pb2.EXPLANATION_STATE_FAILED: ExplanationState.FAILED,
    types_pb2.EXPLANATION_STATE_CANCELLED: ExplanationState.CANCELLED,
}
_TOKEN_ROLES = {
    types_pb2.TOKEN_ROLE_TEMPLATE: TokenRole.TEMPLATE,
    types_pb2.TOKEN_ROLE_SYSTEM: TokenRole.SYSTEM,
    types_pb2.TOKEN_ROLE_USER: TokenRole.USER,
    types_pb2.TOKEN_ROLE_ASSISTANT: TokenRole.ASSISTANT,
    types_pb2.TOKEN_ROLE_PROMPT: TokenRole.PROMPT,
    types_pb2.TOKEN_ROLE_OUTPUT: TokenRole.OUTPUT,
    types_pb2.TOKEN_ROLE_IMAGE: TokenRole.IMAGE,
}
_ERROR_CODES = {
    types_pb2.EXPLANATION_ERROR_CODE_INVALID_INPUT: ExplanationErrorCode.INVALID_INPUT,
    types_pb2.EXPLANATION_ERROR_CODE_ATTEMPTS_EXHAUSTED: ExplanationErrorCode.ATTEMPTS_EXHAUSTED,
    types_pb2.EXPLANATION_ERROR_CODE_INTERNAL: ExplanationErrorCode.INTERNAL,
}
EXPLAIN_PATHS = {
    types_pb2.EXPLAIN_PATH_FAST: ExplainPath.FAST,
    types_pb2.EXPLAIN_PATH_GENERAL: ExplainPath.GENERAL,
}
_TARGET_SCORES = {
    # The protocol treats an unset score as the log-probability.
    types_pb2.TARGET_SCORE_UNSPECIFIED: TargetScore.LOGPROB,
    types_pb2.TARGET_SCORE_LOGPROB: TargetScore.LOGPROB,
    types_pb2.TARGET_SCORE_PROBABILITY: TargetScore.PROBABILITY,
    types_pb2.TARGET_SCORE_LOGIT: TargetScore.LOGIT,
}
_PARAM_TYPES = {
    explanations_pb2.PARAM_TYPE_INT: ParamType.INT,
    explanations_pb2.PARAM_TYPE_FLOAT: ParamType.FLOAT,
    explanations_pb2.PARAM_TYPE_STRING: ParamType.STRING,
    explanations_pb2.PARAM_TYPE_BOOL: ParamType.BOOL,
}


def _optional_datetime(timestamp: timestamp_pb2.Timestamp, present: bool) -> datetime | None:
    return timestamp.ToDatetime(tzinfo=UTC) if present else None


# ---------------------------------------------------------------------------
# Results


@dataclass(frozen=True)
class Token:
    id: int
    text: str
    """The token's text as the tokenizer renders it on its own (may be a word piece)."""
    logprob: float | None
    """The serving engine's log-probability, for generated tokens."""
    role: TokenRole = TokenRole.UNSPECIFIED
    """Which part of the sequence the token belongs to (set on an explanation's tokens)."""
    message_index: int | None = None
    """For a token of a chat message's content: the message's index in the request's messages."""

    @property
    def is_content(self) -> bool:
        """Whether the caller wrote this token: a chat message's content, or a text or token-id prompt (not the
        chat template's markup or default system prompt, nor generated output)."""
        return self.message_index is not None or self.role == TokenRole.PROMPT

    @classmethod
    def from_proto(cls, token: types_pb2.Token) -> Token:
        return cls(
            token.id,
            token.text,
            token.logprob if token.HasField("logprob") else None,
            _TOKEN_ROLES.get(token.role, TokenRole.UNSPECIFIED),
            token.message_index if token.HasField("message_index") else None,
        )


@dataclass(frozen=True)
class ExplanationError:
    """Why an explanation failed."""

    code: ExplanationErrorCode
    message: str
    details: Mapping[str, str]
    """Machine-readable context: "attempts", and "exception" for INTERNAL."""

    def __str__(self) -> str:
        return self.message

    @classmethod
    def from_proto(cls, error: types_pb2.ExplanationError) -> ExplanationError:
        return cls(_ERROR_CODES.get(error.code, ExplanationErrorCode.UNSPECIFIED), error.message, dict(error.details))


@dataclass(frozen=True)
class Usage:
    input_tokens: int
    output_tokens: int

    @classmethod
    def from_proto(cls, usage: types_pb2.Usage) -> Usage:
        return cls(usage.input_tokens, usage.output_tokens)


@dataclass(frozen=True)
class Faithfulness:
    """ERASER faithfulness of one method's attributions, averaged over the explained tokens.

    For each fraction q of a target's source tokens, the top q by attribution are removed
    (comprehensiveness: the score's drop, higher is better) or kept alone (sufficiency: the
    score's drop, lower is better). The ``random_`` metrics are the same for uniformly random
    attributions: the chance level. The ``aopc_`` ones are means over the fractions.
    """

    fractions: tuple[float, ...]
    comprehensiveness: tuple[float, ...]
    sufficiency: tuple[float, ...]
    random_comprehensiveness: tuple[float, ...]
    random_sufficiency: tuple[float, ...]
    aopc_comprehensiveness: float
    aopc_sufficiency: float
    random_aopc_comprehensiveness: float
    random_aopc_sufficiency: float
    replacement_token_id: int
    """The token id that stood in for removed tokens."""

    def __post_init__(self) -> None:
        curves = (self.comprehensiveness, self.sufficiency, self.random_comprehensiveness, self.random_sufficiency)
        if any(len(curve) != len(self.fractions) for curve in curves):
            raise ValueError(f"faithfulness curves do not all have one value per fraction ({len(self.fractions)})")

    @classmethod
    def from_proto(cls, faithfulness: types_pb2.Faithfulness) -> Faithfulness:
        return cls(
            fractions=tuple(faithfulness.fractions),
            comprehensiveness=tuple(faithfulness.comprehensiveness),
            sufficiency=tuple(faithfulness.sufficiency),
            random_comprehensiveness=tuple(faithfulness.random_comprehensiveness),
            random_sufficiency=tuple(faithfulness.random_sufficiency),
            aopc_comprehensiveness=faithfulness.aopc_comprehensiveness,
            aopc_sufficiency=faithfulness.aopc_sufficiency,
            random_aopc_comprehensiveness=faithfulness.random_aopc_comprehensiveness,
            random_aopc_sufficiency=faithfulness.random_aopc_sufficiency,
            replacement_token_id=faithfulness.replacement_token_id,
        )

    @property
    def beats_random(self) -> bool:
        """Whether removing the top-attributed tokens hurts more than for random attributions
        (comprehensiveness) and keeping them alone hurts less (sufficiency), by AOPC."""
        return (
            self.aopc_comprehensiveness > self.random_aopc_comprehensiveness
            and self.aopc_sufficiency < self.random_aopc_sufficiency
        )


@dataclass(frozen=True)
class MethodResult:
    method: str
    attributions: Matrix | None
    """float32 ``[targets, tokens - 1]``: row ``i`` scores every token before target ``i``.
    None for methods that do not attribute to tokens."""
    extras: Mapping[str, Matrix]
    """Method-specific outputs, e.g. logit lens ``top_token_ids``, ``top_logprobs``, ``target_logprobs``."""
    seconds: float
    aggregated: Matrix | None
    """float32 ``[targets, len(Explanation.source_groups)]``: the attributions per source group, as
    ``ExplainOptions`` asked. None when the server sent none."""
    faithfulness: Faithfulness | None
    """Set when ``ExplainOptions.faithfulness`` was asked for and the method attributes tokens."""
    image_attributions: Mapping[int, Matrix] = field(default_factory=dict)
    """float32 ``[targets, rows, cols]`` cell scores by picture index (see ``Explanation.image_grids``)."""
    modality: ModalityShare | None = None

    @classmethod
    def from_proto(cls, result: types_pb2.MethodResult) -> MethodResult:
        return cls(
            method=result.method,
            attributions=optional_matrix(result.attributions),
            extras={name: Matrix.from_proto(tensor) for name, tensor in result.extras.items()},
            seconds=result.seconds,
            aggregated=optional_matrix(result.aggregated),
            faithfulness=(Faithfulness.from_proto(result.faithfulness) if result.HasField("faithfulness") else None),
            image_attributions=image_attributions(result.image_attributions),
            modality=ModalityShare.from_proto(result.modality),
        )


@dataclass(frozen=True)
class Fidelity:
    """How faithfully the explainer's replica reproduced what was served."""

    recomputed_logprobs: tuple[float, ...]
    max_abs_logprob_diff: float
    """max |recomputed - served| over the generated tokens."""

    @classmethod
    def from_proto(cls, fidelity: types_pb2.Fidelity) -> Fidelity:
        return cls(tuple(fidelity.recomputed_logprobs), fidelity.max_abs_logprob_diff)


@dataclass(frozen=True)
class StepScores:
    """How the explainer's replica of the model scored each explained token ("target index" order)."""

    logprobs: tuple[float, ...]
    probabilities: tuple[float, ...]
    entropies: tuple[float, ...]
    """Entropy (nats) of the next-token distribution at the explained position."""
    ranks: tuple[int, ...]
    """1 when the explained token was the most likely one."""
    top_token_ids: Matrix
    """int32 ``[targets, k]``: the most likely tokens at each explained position."""
    top_logprobs: Matrix
    """float32 ``[targets, k]``: their log-probabilities."""

    @classmethod
    def from_proto(cls, scores: types_pb2.StepScores) -> StepScores:
        return cls(
            logprobs=tuple(scores.logprobs),
            probabilities=tuple(scores.probabilities),
            entropies=tuple(scores.entropies),
            ranks=tuple(scores.ranks),
            top_token_ids=Matrix.from_proto(scores.top_token_ids),
            top_logprobs=Matrix.from_proto(scores.top_logprobs),
        )


@dataclass(frozen=True)
class SourceGroup:
    """Source tokens ``[start, end)`` that aggregated attributions are reported for: a word or a span."""

    start: int
    end: int
    label: str

    @classmethod
    def from_proto(cls, group: types_pb2.SourceGroup) -> SourceGroup:
        return cls(group.start, group.end, group.label)


class Source(NamedTuple):
    """One source token's contribution to a target token."""

    position: int
    token: Token
    score: float


@dataclass(frozen=True)
class LogitLensLayer:
    """What one layer's residual stream predicts at one target position."""

    layer: int
    """0 is the embedding output, the last is the final layer."""
    top_token_ids: tuple[int, ...]
    top_logprobs: tuple[float, ...]
    target_logprob: float
    """This layer's log-probability of the token actually at the target position."""


# The MethodResult matrices that Explanation looks up by method, with how to say that a result has one or not.
_MatrixKind: TypeAlias = Literal["attributions", "aggregated"]
_MATRIX_KINDS: dict[_MatrixKind, tuple[str, str]] = {
    "attributions": ("attributes to tokens", "does not attribute to tokens"),
    "aggregated": ("has aggregated attributions", "has no aggregated attributions"),
}


@dataclass(frozen=True)
class MethodProgress:
    """How far one method of a running explanation has got."""

    method: str
    fraction: float
    seconds_left: float


@dataclass(frozen=True)
class Progress:
    """How far a job has got, as its worker last published it (a few times a second at most).

    ``fraction`` is in [0, 1] and never decreases; it is 1.0 only once the explanation succeeded.
    ``seconds_left`` is the worker's estimate: the cost model's at first, then extrapolated from the
    time the finished chunks took."""

    fraction: float
    seconds_left: float
    methods: tuple[MethodProgress, ...]

    @classmethod
    def from_proto(cls, progress: types_pb2.ExplanationProgress) -> Progress:
        return cls(
            fraction=progress.fraction,
            seconds_left=progress.seconds_left,
            methods=tuple(MethodProgress(m.method, m.fraction, m.seconds_left) for m in progress.methods),
        )


@dataclass(frozen=True)
class Estimate:
    """An explanation's predicted cost on a deployment, before queueing it (``estimate_explanation``)."""

    passes: float
    """Forward passes over the whole sequence, all methods together (the published cost model)."""
    seconds: float
    """Worker seconds, from the workers' measured seconds per pass (0 until a worker has measured one)."""
    methods: Mapping[str, tuple[float, float]]
    """(passes, seconds) by method, in request order."""

    @classmethod
    def from_proto(cls, response: explanations_pb2.EstimateExplanationResponse) -> Estimate:
        return cls(
            passes=response.passes,
            seconds=response.seconds,
            methods={m.method: (m.passes, m.seconds) for m in response.methods},
        )


@dataclass(frozen=True)
class Explanation(ImageResults):
    explanation_id: str
    state: ExplanationState
    error: ExplanationError | None
    """Why the explanation failed, when state is FAILED (``str()`` of it is the message)."""
    model: str
    weights_digest: str
    tokens: tuple[Token, ...]
    """Every token of the sequence: prompt first, then the generated output."""
    prompt_length: int
    target_positions: tuple[int, ...]
    """Indices into ``tokens`` of the tokens explained; "target index" below indexes this."""
    results: Mapping[str, MethodResult]
    """Results by method name, in the order the server sent them."""
    fidelity: Fidelity | None
    foil_token_ids: tuple[int, ...]
    """The foil of each explained token, for contrastive explanations; else empty."""
    target_score: TargetScore
    """What the attributions explain: the targets' log-probability, probability or logit."""
    step_scores: StepScores | None
    source_groups: tuple[SourceGroup, ...]
    """The groups ``MethodResult.aggregated`` is reported over, in sequence order."""
    cache_hit: bool
    """Whether the hidden states came from the cache rather than a fresh forward pass."""
    trace_id: str
    attempts: int
    created_at: datetime | None
    completed_at: datetime | None
    cancelled_by: str
    """Who stopped the explanation and how, when state is CANCELLED."""
    progress: Progress | None
    """How far the job has got, while pending or running (1.0 once succeeded)."""
    explain_path: ExplainPath
    """Which of the explainer's paths computed the results (unspecified until the job ran)."""
    architecture: str
    """The explained model's architecture, its config ``model_type`` (empty until the job ran)."""
    raw: types_pb2.Explanation = field(repr=False, compare=False)
    image_grids: tuple[ImageGrid, ...] = ()
    """The grid of each picture in the request, in picture order (empty without pictures)."""

    def __post_init__(self) -> None:
        # Checked once here so that top_sources() and friends can index without surprises.
        for position in self.target_positions:
            if not 0 <= position < len(self.tokens):
                raise ValueError(f"target position {position} is outside the {len(self.tokens)} tokens")
        for group in self.source_groups:
            if not 0 <= group.start < group.end <= len(self.tokens):
                raise ValueError(f"source group [{group.start}, {group.end}) is outside the {len(self.tokens)} tokens")
        targets = len(self.target_positions)
        if self.foil_token_ids and len(self.foil_token_ids) != targets:
            raise ValueError(f"{len(self.foil_token_ids)} foil token ids for {targets} targets")
        if self.step_scores is not None:
            _check_step_scores(self.step_scores, targets)
        expected_shapes: dict[_MatrixKind, tuple[tuple[int, int], str]] = {
            "attributions": ((targets, max(len(self.tokens) - 1, 0)), f"{len(self.tokens)} tokens"),
            "aggregated": ((targets, len(self.source_groups)), f"{len(self.source_groups)} source groups"),
        }
        for name, result in self.results.items():
            for kind, (expected, sources) in expected_shapes.items():
                matrix: Matrix | None = getattr(result, kind)
                if matrix is not None and matrix.shape != expected:
                    raise ValueError(
                        f"{kind} of {name!r} have shape {matrix.shape}, expected {expected}"
                        f" for {targets} targets over {sources}"
                    )
        self.check_image_results()

    @classmethod
    def from_proto(cls, explanation: types_pb2.Explanation) -> Explanation:
        return cls(
            explanation_id=explanation.explanation_id,
            state=_EXPLANATION_STATES.get(explanation.state, ExplanationState.UNSPECIFIED),
            error=ExplanationError.from_proto(explanation.error) if explanation.HasField("error") else None,
            model=explanation.model,
            weights_digest=explanation.weights_digest,
            tokens=tuple(Token.from_proto(token) for token in explanation.tokens),
            prompt_length=explanation.prompt_length,
            target_positions=tuple(explanation.target_positions),
            # A method listed twice keeps its last result.
            results={result.method: MethodResult.from_proto(result) for result in explanation.results},
            fidelity=Fidelity.from_proto(explanation.fidelity) if explanation.HasField("fidelity") else None,
            foil_token_ids=tuple(explanation.foil_token_ids),
            target_score=_TARGET_SCORES.get(explanation.target_score, TargetScore.UNSPECIFIED),
            step_scores=(
                StepScores.from_proto(explanation.step_scores) if explanation.HasField("step_scores") else None
            ),
            source_groups=tuple(SourceGroup.from_proto(group) for group in explanation.source_groups),
            cache_hit=explanation.cache_hit,
            trace_id=explanation.trace_id,
            attempts=explanation.attempts,
            created_at=_optional_datetime(explanation.created_at, explanation.HasField("created_at")),
            completed_at=_optional_datetime(explanation.completed_at, explanation.HasField("completed_at")),
            cancelled_by=explanation.cancelled_by,
            progress=Progress.from_proto(explanation.progress) if explanation.HasField("progress") else None,
            explain_path=EXPLAIN_PATHS.get(explanation.explain_path, ExplainPath.UNSPECIFIED),
            architecture=explanation.architecture,
            raw=explanation,
            image_grids=tuple(ImageGrid.from_proto(grid) for grid in explanation.image_grids),
        )

    @property
    def finished(self) -> bool:
        """Whether the explanation reached a final state (succeeded, failed or cancelled)."""
        return self.state in (ExplanationState.SUCCEEDED, ExplanationState.FAILED, ExplanationState.CANCELLED)

    @property
    def token_attribution_methods(self) -> list[str]:
        """Names of the results that carry an attribution matrix, in result order."""
        return self._methods_with("attributions")

    def result(self, method: str) -> MethodResult:
        try:
            return self.results[method]
        except KeyError:
            raise KeyError(f"no result for method {method!r}; results: {sorted(self.results)}") from None

    def attributions(self, method: str | None = None) -> Matrix:
        """The attribution matrix of ``method``, by default of the first method that has one."""
        return self._matrix("attributions", method)

    def aggregated(self, method: str | None = None) -> Matrix:
        """The per-group matrix of ``method`` (see ``source_groups``), by default of the first method that has one."""
        return self._matrix("aggregated", method)

    def top_sources(
        self, target_index: int, k: int = 5, method: str | None = None, *, content_only: bool = False
    ) -> list[Source]:
        """The ``k`` tokens that most influenced target ``target_index``, strongest first.

        Only the target's causal prefix (positions before it) is ranked. Ranking is by
        absolute score; scores keep their sign. Ties keep the earlier position first.
        ``content_only`` ranks only the tokens the caller wrote (``Token.is_content``): a chat's
        message contents without the template around them, or a text prompt.
        """
        scores = self.attributions(method).row(target_index)
        prefix: Iterable[int] = range(self.target_positions[target_index])
        if content_only:
            prefix = [position for position in prefix if self.tokens[position].is_content]
        return [
            Source(position, self.tokens[position], float(scores[position]))
            for position in _strongest(scores, prefix, k)
        ]

    def top_groups(self, target_index: int, k: int = 5, method: str | None = None) -> list[tuple[SourceGroup, float]]:
        """The ``k`` source groups that most influenced target ``target_index``, strongest first, with their scores.

        Like ``top_sources`` over ``aggregated(method)``: only groups that start before the
        target are ranked, by absolute score; scores keep their sign.
        """
        scores = self.aggregated(method).row(target_index)
        position = self.target_positions[target_index]
        before = (index for index, group in enumerate(self.source_groups) if group.start < position)
        return [(self.source_groups[index], float(scores[index])) for index in _strongest(scores, before, k)]

    def _methods_with(self, kind: _MatrixKind) -> list[str]:
        return [name for name, result in self.results.items() if getattr(result, kind) is not None]

    def _matrix(self, kind: _MatrixKind, method: str | None) -> Matrix:
        has, lacks = _MATRIX_KINDS[kind]
        if method is None:
            methods = self._methods_with(kind)
            if not methods:
                raise ValueError(f"no result {has}; results: {sorted(self.results)}")
            method = methods[0]
        matrix: Matrix | None = getattr(self.result(method), kind)
        if matrix is None:
            raise ValueError(f"method {method!r} {lacks}")
        return matrix

    def logit_lens(self, target_index: int, method: str = "logit_lens") -> list[LogitLensLayer]:
        """Per-layer predictions at target ``target_index``, from the method's documented extras."""
        extras = self.result(method).extras
        try:
            top_token_ids = extras["top_token_ids"]
            top_logprobs = extras["top_logprobs"]
            target_logprobs = extras["target_logprobs"]
        except KeyError as missing:
            raise KeyError(f"{method} result has no {missing} extra; extras: {sorted(extras)}") from None
        return [
            LogitLensLayer(
                layer=layer,
                top_token_ids=tuple(int(token_id) for token_id in top_token_ids.row(layer, target_index)),
                top_logprobs=tuple(float(logprob) for logprob in top_logprobs.row(layer, target_index)),
                target_logprob=float(target_logprobs.row(layer)[target_index]),
            )
            for layer in range(top_token_ids.shape[0])
        ]


def _check_step_scores(scores: StepScores, targets: int) -> None:
    lengths = {len(scores.logprobs), len(scores.probabilities), len(scores.entropies), len(scores.ranks)}
    shapes = {scores.top_token_ids.shape, scores.top_logprobs.shape}
    if lengths != {targets} or len(shapes) != 1 or scores.top_token_ids.ndim != 2 or shapes.pop()[0] != targets:
        raise ValueError(
            f"step scores do not cover the {targets} targets: score lengths {sorted(lengths)}, top-k shapes"
            f" {scores.top_token_ids.shape} and {scores.top_logprobs.shape}"
        )


def _strongest(scores: Sequence[float], indices: Iterable[int], k: int) -> list[int]:
    """The ``k`` of ``indices`` with the largest ``|scores[index]|``; ties keep the earlier index first."""
    if k < 1:
        raise ValueError(f"k must be at least 1, got {k}")
    return sorted(indices, key=lambda index: abs(scores[index]), reverse=True)[:k]


def _optional_explanation(message: types_pb2.Explanation, present: bool) -> Explanation | None:
    return Explanation.from_proto(message) if present else None


@dataclass(frozen=True)
class Generation:
    request_id: str
    trace_id: str
    model: str
    text: str
    prompt_token_ids: tuple[int, ...]
    output_tokens: tuple[Token, ...]
    finish_reason: FinishReason
    usage: Usage
    explanation_id: str
    """Set when an explanation was requested."""
    explanation: Explanation | None
    """Attached in sync mode; in async mode fetch it with ``get_explanation(explanation_id)``."""
    raw: inference_pb2.GenerateResponse = field(repr=False, compare=False)

    @classmethod
    def from_proto(cls, response: inference_pb2.GenerateResponse) -> Generation:
        return cls(
            request_id=response.request_id,
            trace_id=response.trace_id,
            model=response.model,
            text=response.text,
            prompt_token_ids=tuple(response.prompt_token_ids),
            output_tokens=tuple(Token.from_proto(token) for token in response.output_tokens),
            finish_reason=_FINISH_REASONS.get(response.finish_reason, FinishReason.UNSPECIFIED),
            usage=Usage.from_proto(response.usage),
            explanation_id=response.explanation_id,
            explanation=_optional_explanation(response.explanation, response.HasField("explanation")),
            raw=response,
        )


@dataclass(frozen=True)
class StreamChunk:
    """One message of a generation stream: the start (``kind`` "start", with the prompt's token ids), the tokens
    produced since the previous message ("delta"), or the end ("end", with the finish reason, usage and
    explanation)."""

    kind: Literal["start", "delta", "end"]
    request_id: str
    trace_id: str
    output_tokens: tuple[Token, ...]
    text_delta: str
    prompt_token_ids: tuple[int, ...]
    """Set on the first chunk only."""
    finish_reason: FinishReason | None
    """Set on the last chunk only, like ``usage`` and the explanation."""
    usage: Usage | None
    explanation_id: str
    explanation: Explanation | None
    raw: inference_pb2.GenerateStreamResponse = field(repr=False, compare=False)

    @classmethod
    def from_proto(cls, response: inference_pb2.GenerateStreamResponse) -> StreamChunk:
        kind = response.WhichOneof("event")
        if kind is None:
            raise ValueError("a stream message is neither start, delta nor end")
        start, delta, end = response.start, response.delta, response.end
        return cls(
            kind=kind,
            request_id=response.request_id,
            trace_id=response.trace_id,
            output_tokens=tuple(Token.from_proto(token) for token in delta.output_tokens),
            text_delta=delta.text_delta,
            prompt_token_ids=tuple(start.prompt_token_ids),
            finish_reason=(
                _FINISH_REASONS.get(end.finish_reason, FinishReason.UNSPECIFIED)
                if end.finish_reason != types_pb2.FINISH_REASON_UNSPECIFIED
                else None
            ),
            usage=Usage.from_proto(end.usage) if end.HasField("usage") else None,
            explanation_id=end.explanation_id,
            explanation=_optional_explanation(end.explanation, end.HasField("explanation")),
            raw=response,
        )


@dataclass(frozen=True)
class MethodParam:
    name: str
    type: ParamType
    default_value: ParamValue | None
    """The value used when a request leaves the parameter out, of the parameter's type."""
    description: str
    minimum: float | None
    """Inclusive lower bound of a numeric parameter, if it has one."""
    maximum: float | None
    """Inclusive upper bound of a numeric parameter, if it has one."""
    choices: tuple[str, ...]
    """The accepted values of a string parameter that is an enumeration; else empty."""

    @classmethod
    def from_proto(cls, param: explanations_pb2.MethodParam) -> MethodParam:
        return cls(
            name=param.name,
            type=_PARAM_TYPES.get(param.type, ParamType.UNSPECIFIED),
            default_value=_param_default(param.default_value),
            description=param.description,
            minimum=param.minimum if param.HasField("minimum") else None,
            maximum=param.maximum if param.HasField("maximum") else None,
            choices=tuple(param.choices),
        )


def _param_default(value: types_pb2.ParamValue) -> ParamValue | None:
    kind = value.WhichOneof("kind")
    default: ParamValue | None = None if kind is None else getattr(value, kind)
    return default


@dataclass(frozen=True)
class MethodInfo:
    name: str
    description: str
    params: tuple[MethodParam, ...]
    needs_gradients: bool
    uses_cache: bool
    supports_contrastive_targets: bool
    multimodal: bool
    attributes_tokens: bool
    """Whether results carry a ``[targets, tokens - 1]`` attribution matrix."""
    raw: explanations_pb2.MethodInfo = field(repr=False, compare=False)

    @classmethod
    def from_proto(cls, info: explanations_pb2.MethodInfo) -> MethodInfo:
        return cls(
            name=info.name,
            description=info.description,
            params=tuple(MethodParam.from_proto(param) for param in info.params),
            needs_gradients=info.needs_gradients,
            uses_cache=info.uses_cache,
            supports_contrastive_targets=info.supports_contrastive_targets,
            multimodal=info.multimodal,
            attributes_tokens=info.attributes_tokens,
            raw=info,
        )


@dataclass(frozen=True)
class ExplanationSummary:
    """One entry of ``list_explanations``: what was explained, when, and how it stands."""

    explanation_id: str
    state: ExplanationState
    model: str
    methods: tuple[str, ...]
    """The requested methods, in request order."""
    created_at: datetime | None
    trace_id: str
    """The trace of the request that created the explanation."""
    raw: explanations_pb2.ExplanationSummary = field(repr=False, compare=False)

    @classmethod
    def from_proto(cls, summary: explanations_pb2.ExplanationSummary) -> ExplanationSummary:
        return cls(
            explanation_id=summary.explanation_id,
            state=_EXPLANATION_STATES.get(summary.state, ExplanationState.UNSPECIFIED),
            model=summary.model,
            methods=tuple(summary.methods),
            created_at=_optional_datetime(summary.created_at, summary.HasField("created_at")),
            trace_id=summary.trace_id,
            raw=summary,
        )


@dataclass(frozen=True)
class ExplanationPage:
    """A page of the caller's explanations, newest first."""

    explanations: tuple[ExplanationSummary, ...]
    next_page_token: str
    """Pass to ``list_explanations(page_token=...)`` for the next page; empty on the last one."""
    raw: explanations_pb2.ListExplanationsResponse = field(repr=False, compare=False)

    @classmethod
    def from_proto(cls, response: explanations_pb2.ListExplanationsResponse) -> ExplanationPage:
        return cls(
            explanations=tuple(ExplanationSummary.from_proto(summary) for summary in response.explanations),
            next_page_token=response.next_page_token,
            raw=response,
        )
