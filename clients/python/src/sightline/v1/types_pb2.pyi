import datetime

from google.protobuf import timestamp_pb2 as _timestamp_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class Dtype(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    DTYPE_UNSPECIFIED: _ClassVar[Dtype]
    DTYPE_FLOAT32: _ClassVar[Dtype]
    DTYPE_INT32: _ClassVar[Dtype]

class TokenRole(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    TOKEN_ROLE_UNSPECIFIED: _ClassVar[TokenRole]
    TOKEN_ROLE_TEMPLATE: _ClassVar[TokenRole]
    TOKEN_ROLE_SYSTEM: _ClassVar[TokenRole]
    TOKEN_ROLE_USER: _ClassVar[TokenRole]
    TOKEN_ROLE_ASSISTANT: _ClassVar[TokenRole]
    TOKEN_ROLE_PROMPT: _ClassVar[TokenRole]
    TOKEN_ROLE_OUTPUT: _ClassVar[TokenRole]
    TOKEN_ROLE_IMAGE: _ClassVar[TokenRole]

class ExplainMode(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    EXPLAIN_MODE_UNSPECIFIED: _ClassVar[ExplainMode]
    EXPLAIN_MODE_SYNC: _ClassVar[ExplainMode]
    EXPLAIN_MODE_ASYNC: _ClassVar[ExplainMode]

class ExplainPath(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    EXPLAIN_PATH_UNSPECIFIED: _ClassVar[ExplainPath]
    EXPLAIN_PATH_FAST: _ClassVar[ExplainPath]
    EXPLAIN_PATH_GENERAL: _ClassVar[ExplainPath]

class TargetScore(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    TARGET_SCORE_UNSPECIFIED: _ClassVar[TargetScore]
    TARGET_SCORE_LOGPROB: _ClassVar[TargetScore]
    TARGET_SCORE_PROBABILITY: _ClassVar[TargetScore]
    TARGET_SCORE_LOGIT: _ClassVar[TargetScore]

class Granularity(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    GRANULARITY_UNSPECIFIED: _ClassVar[Granularity]
    GRANULARITY_TOKEN: _ClassVar[Granularity]
    GRANULARITY_WORD: _ClassVar[Granularity]
    GRANULARITY_SPAN: _ClassVar[Granularity]

class Normalization(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    NORMALIZATION_UNSPECIFIED: _ClassVar[Normalization]
    NORMALIZATION_NONE: _ClassVar[Normalization]
    NORMALIZATION_L1: _ClassVar[Normalization]
    NORMALIZATION_MAX_ABS: _ClassVar[Normalization]

class FinishReason(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    FINISH_REASON_UNSPECIFIED: _ClassVar[FinishReason]
    FINISH_REASON_STOP: _ClassVar[FinishReason]
    FINISH_REASON_LENGTH: _ClassVar[FinishReason]
    FINISH_REASON_ABORT: _ClassVar[FinishReason]
    FINISH_REASON_CONTEXT_LENGTH: _ClassVar[FinishReason]

class ExplanationState(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    EXPLANATION_STATE_UNSPECIFIED: _ClassVar[ExplanationState]
    EXPLANATION_STATE_PENDING: _ClassVar[ExplanationState]
    EXPLANATION_STATE_RUNNING: _ClassVar[ExplanationState]
    EXPLANATION_STATE_SUCCEEDED: _ClassVar[ExplanationState]
    EXPLANATION_STATE_FAILED: _ClassVar[ExplanationState]
    EXPLANATION_STATE_CANCELLED: _ClassVar[ExplanationState]

class ExplanationErrorCode(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    EXPLANATION_ERROR_CODE_UNSPECIFIED: _ClassVar[ExplanationErrorCode]
    EXPLANATION_ERROR_CODE_INVALID_INPUT: _ClassVar[ExplanationErrorCode]
    EXPLANATION_ERROR_CODE_ATTEMPTS_EXHAUSTED: _ClassVar[ExplanationErrorCode]
    EXPLANATION_ERROR_CODE_INTERNAL: _ClassVar[ExplanationErrorCode]
DTYPE_UNSPECIFIED: Dtype
DTYPE_FLOAT32: Dtype
DTYPE_INT32: Dtype
TOKEN_ROLE_UNSPECIFIED: TokenRole
TOKEN_ROLE_TEMPLATE: TokenRole
TOKEN_ROLE_SYSTEM: TokenRole
TOKEN_ROLE_USER: TokenRole
TOKEN_ROLE_ASSISTANT: TokenRole
TOKEN_ROLE_PROMPT: TokenRole
TOKEN_ROLE_OUTPUT: TokenRole
TOKEN_ROLE_IMAGE: TokenRole
EXPLAIN_MODE_UNSPECIFIED: ExplainMode
EXPLAIN_MODE_SYNC: ExplainMode
EXPLAIN_MODE_ASYNC: ExplainMode
EXPLAIN_PATH_UNSPECIFIED: ExplainPath
EXPLAIN_PATH_FAST: ExplainPath
EXPLAIN_PATH_GENERAL: ExplainPath
TARGET_SCORE_UNSPECIFIED: TargetScore
TARGET_SCORE_LOGPROB: TargetScore
TARGET_SCORE_PROBABILITY: TargetScore
TARGET_SCORE_LOGIT: TargetScore
GRANULARITY_UNSPECIFIED: Granularity
GRANULARITY_TOKEN: Granularity
GRANULARITY_WORD: Granularity
GRANULARITY_SPAN: Granularity
NORMALIZATION_UNSPECIFIED: Normalization
NORMALIZATION_NONE: Normalization
NORMALIZATION_L1: Normalization
NORMALIZATION_MAX_ABS: Normalization
FINISH_REASON_UNSPECIFIED: FinishReason
FINISH_REASON_STOP: FinishReason
FINISH_REASON_LENGTH: FinishReason
FINISH_REASON_ABORT: FinishReason
FINISH_REASON_CONTEXT_LENGTH: FinishReason
EXPLANATION_STATE_UNSPECIFIED: ExplanationState
EXPLANATION_STATE_PENDING: ExplanationState
EXPLANATION_STATE_RUNNING: ExplanationState
EXPLANATION_STATE_SUCCEEDED: ExplanationState
EXPLANATION_STATE_FAILED: ExplanationState
EXPLANATION_STATE_CANCELLED: ExplanationState
EXPLANATION_ERROR_CODE_UNSPECIFIED: ExplanationErrorCode
EXPLANATION_ERROR_CODE_INVALID_INPUT: ExplanationErrorCode
EXPLANATION_ERROR_CODE_ATTEMPTS_EXHAUSTED: ExplanationErrorCode
EXPLANATION_ERROR_CODE_INTERNAL: ExplanationErrorCode

class Tensor(_message.Message):
    __slots__ = ("dtype", "shape", "float_values", "int_values")
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    SHAPE_FIELD_NUMBER: _ClassVar[int]
    FLOAT_VALUES_FIELD_NUMBER: _ClassVar[int]
    INT_VALUES_FIELD_NUMBER: _ClassVar[int]
    dtype: Dtype
    shape: _containers.RepeatedScalarFieldContainer[int]
    float_values: _containers.RepeatedScalarFieldContainer[float]
    int_values: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, dtype: _Optional[_Union[Dtype, str]] = ..., shape: _Optional[_Iterable[int]] = ..., float_values: _Optional[_Iterable[float]] = ..., int_values: _Optional[_Iterable[int]] = ...) -> None: ...

class Token(_message.Message):
    __slots__ = ("id", "text", "logprob", "role", "message_index")
    ID_FIELD_NUMBER: _ClassVar[int]
    TEXT_FIELD_NUMBER: _ClassVar[int]
    LOGPROB_FIELD_NUMBER: _ClassVar[int]
    ROLE_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_INDEX_FIELD_NUMBER: _ClassVar[int]
    id: int
    text: str
    logprob: float
    role: TokenRole
    message_index: int
    def __init__(self, id: _Optional[int] = ..., text: _Optional[str] = ..., logprob: _Optional[float] = ..., role: _Optional[_Union[TokenRole, str]] = ..., message_index: _Optional[int] = ...) -> None: ...

class TokenIds(_message.Message):
    __slots__ = ("ids",)
    IDS_FIELD_NUMBER: _ClassVar[int]
    ids: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, ids: _Optional[_Iterable[int]] = ...) -> None: ...

class ChatMessage(_message.Message):
    __slots__ = ("role", "content", "parts")
    ROLE_FIELD_NUMBER: _ClassVar[int]
    CONTENT_FIELD_NUMBER: _ClassVar[int]
    PARTS_FIELD_NUMBER: _ClassVar[int]
    role: str
    content: str
    parts: _containers.RepeatedCompositeFieldContainer[ContentPart]
    def __init__(self, role: _Optional[str] = ..., content: _Optional[str] = ..., parts: _Optional[_Iterable[_Union[ContentPart, _Mapping]]] = ...) -> None: ...

class ContentPart(_message.Message):
    __slots__ = ("text", "image")
    TEXT_FIELD_NUMBER: _ClassVar[int]
    IMAGE_FIELD_NUMBER: _ClassVar[int]
    text: str
    image: ImageData
    def __init__(self, text: _Optional[str] = ..., image: _Optional[_Union[ImageData, _Mapping]] = ...) -> None: ...

class ImageData(_message.Message):
    __slots__ = ("data",)
    DATA_FIELD_NUMBER: _ClassVar[int]
    data: bytes
    def __init__(self, data: _Optional[bytes] = ...) -> None: ...

class ChatMessages(_message.Message):
    __slots__ = ("messages",)
    MESSAGES_FIELD_NUMBER: _ClassVar[int]
    messages: _containers.RepeatedCompositeFieldContainer[ChatMessage]
    def __init__(self, messages: _Optional[_Iterable[_Union[ChatMessage, _Mapping]]] = ...) -> None: ...

class SamplingParams(_message.Message):
    __slots__ = ("max_tokens", "temperature", "top_p", "top_k", "seed", "stop")
    MAX_TOKENS_FIELD_NUMBER: _ClassVar[int]
    TEMPERATURE_FIELD_NUMBER: _ClassVar[int]
    TOP_P_FIELD_NUMBER: _ClassVar[int]
    TOP_K_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    STOP_FIELD_NUMBER: _ClassVar[int]
    max_tokens: int
    temperature: float
    top_p: float
    top_k: int
    seed: int
    stop: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, max_tokens: _Optional[int] = ..., temperature: _Optional[float] = ..., top_p: _Optional[float] = ..., top_k: _Optional[int] = ..., seed: _Optional[int] = ..., stop: _Optional[_Iterable[str]] = ...) -> None: ...

class ParamValue(_message.Message):
    __slots__ = ("int_value", "float_value", "string_value", "bool_value")
    INT_VALUE_FIELD_NUMBER: _ClassVar[int]
    FLOAT_VALUE_FIELD_NUMBER: _ClassVar[int]
    STRING_VALUE_FIELD_NUMBER: _ClassVar[int]
    BOOL_VALUE_FIELD_NUMBER: _ClassVar[int]
    int_value: int
    float_value: float
    string_value: str
    bool_value: bool
    def __init__(self, int_value: _Optional[int] = ..., float_value: _Optional[float] = ..., string_value: _Optional[str] = ..., bool_value: _Optional[bool] = ...) -> None: ...

class MethodSpec(_message.Message):
    __slots__ = ("name", "params")
    class ParamsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: ParamValue
        def __init__(self, key: _Optional[str] = ..., value: _Optional[_Union[ParamValue, _Mapping]] = ...) -> None: ...
    NAME_FIELD_NUMBER: _ClassVar[int]
    PARAMS_FIELD_NUMBER: _ClassVar[int]
    name: str
    params: _containers.MessageMap[str, ParamValue]
    def __init__(self, name: _Optional[str] = ..., params: _Optional[_Mapping[str, ParamValue]] = ...) -> None: ...

class TargetSpec(_message.Message):
    __slots__ = ("output_indices", "foil_token_ids", "score")
    OUTPUT_INDICES_FIELD_NUMBER: _ClassVar[int]
    FOIL_TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    SCORE_FIELD_NUMBER: _ClassVar[int]
    output_indices: _containers.RepeatedScalarFieldContainer[int]
    foil_token_ids: _containers.RepeatedScalarFieldContainer[int]
    score: TargetScore
    def __init__(self, output_indices: _Optional[_Iterable[int]] = ..., foil_token_ids: _Optional[_Iterable[int]] = ..., score: _Optional[_Union[TargetScore, str]] = ...) -> None: ...

class Span(_message.Message):
    __slots__ = ("start", "end", "label")
    START_FIELD_NUMBER: _ClassVar[int]
    END_FIELD_NUMBER: _ClassVar[int]
    LABEL_FIELD_NUMBER: _ClassVar[int]
    start: int
    end: int
    label: str
    def __init__(self, start: _Optional[int] = ..., end: _Optional[int] = ..., label: _Optional[str] = ...) -> None: ...

class AggregationSpec(_message.Message):
    __slots__ = ("granularity", "spans", "absolute", "normalization")
    GRANULARITY_FIELD_NUMBER: _ClassVar[int]
    SPANS_FIELD_NUMBER: _ClassVar[int]
    ABSOLUTE_FIELD_NUMBER: _ClassVar[int]
    NORMALIZATION_FIELD_NUMBER: _ClassVar[int]
    granularity: Granularity
    spans: _containers.RepeatedCompositeFieldContainer[Span]
    absolute: bool
    normalization: Normalization
    def __init__(self, granularity: _Optional[_Union[Granularity, str]] = ..., spans: _Optional[_Iterable[_Union[Span, _Mapping]]] = ..., absolute: _Optional[bool] = ..., normalization: _Optional[_Union[Normalization, str]] = ...) -> None: ...

class ExplainSpec(_message.Message):
    __slots__ = ("methods", "mode", "targets", "aggregation", "faithfulness", "step_scores_top_k", "keep_on_disconnect", "images")
    METHODS_FIELD_NUMBER: _ClassVar[int]
    MODE_FIELD_NUMBER: _ClassVar[int]
    TARGETS_FIELD_NUMBER: _ClassVar[int]
    AGGREGATION_FIELD_NUMBER: _ClassVar[int]
    FAITHFULNESS_FIELD_NUMBER: _ClassVar[int]
    STEP_SCORES_TOP_K_FIELD_NUMBER: _ClassVar[int]
    KEEP_ON_DISCONNECT_FIELD_NUMBER: _ClassVar[int]
    IMAGES_FIELD_NUMBER: _ClassVar[int]
    methods: _containers.RepeatedCompositeFieldContainer[MethodSpec]
    mode: ExplainMode
    targets: TargetSpec
    aggregation: AggregationSpec
    faithfulness: bool
    step_scores_top_k: int
    keep_on_disconnect: bool
    images: ImageExplainOptions
    def __init__(self, methods: _Optional[_Iterable[_Union[MethodSpec, _Mapping]]] = ..., mode: _Optional[_Union[ExplainMode, str]] = ..., targets: _Optional[_Union[TargetSpec, _Mapping]] = ..., aggregation: _Optional[_Union[AggregationSpec, _Mapping]] = ..., faithfulness: _Optional[bool] = ..., step_scores_top_k: _Optional[int] = ..., keep_on_disconnect: _Optional[bool] = ..., images: _Optional[_Union[ImageExplainOptions, _Mapping]] = ...) -> None: ...

class ImageExplainOptions(_message.Message):
    __slots__ = ("grid_rows", "grid_cols")
    GRID_ROWS_FIELD_NUMBER: _ClassVar[int]
    GRID_COLS_FIELD_NUMBER: _ClassVar[int]
    grid_rows: int
    grid_cols: int
    def __init__(self, grid_rows: _Optional[int] = ..., grid_cols: _Optional[int] = ...) -> None: ...

class ImageGrid(_message.Message):
    __slots__ = ("image_index", "rows", "cols", "height", "width", "row_edges", "col_edges", "original_height", "original_width", "digest")
    IMAGE_INDEX_FIELD_NUMBER: _ClassVar[int]
    ROWS_FIELD_NUMBER: _ClassVar[int]
    COLS_FIELD_NUMBER: _ClassVar[int]
    HEIGHT_FIELD_NUMBER: _ClassVar[int]
    WIDTH_FIELD_NUMBER: _ClassVar[int]
    ROW_EDGES_FIELD_NUMBER: _ClassVar[int]
    COL_EDGES_FIELD_NUMBER: _ClassVar[int]
    ORIGINAL_HEIGHT_FIELD_NUMBER: _ClassVar[int]
    ORIGINAL_WIDTH_FIELD_NUMBER: _ClassVar[int]
    DIGEST_FIELD_NUMBER: _ClassVar[int]
    image_index: int
    rows: int
    cols: int
    height: int
    width: int
    row_edges: _containers.RepeatedScalarFieldContainer[int]
    col_edges: _containers.RepeatedScalarFieldContainer[int]
    original_height: int
    original_width: int
    digest: str
    def __init__(self, image_index: _Optional[int] = ..., rows: _Optional[int] = ..., cols: _Optional[int] = ..., height: _Optional[int] = ..., width: _Optional[int] = ..., row_edges: _Optional[_Iterable[int]] = ..., col_edges: _Optional[_Iterable[int]] = ..., original_height: _Optional[int] = ..., original_width: _Optional[int] = ..., digest: _Optional[str] = ...) -> None: ...

class ImageAttribution(_message.Message):
    __slots__ = ("image_index", "cells")
    IMAGE_INDEX_FIELD_NUMBER: _ClassVar[int]
    CELLS_FIELD_NUMBER: _ClassVar[int]
    image_index: int
    cells: Tensor
    def __init__(self, image_index: _Optional[int] = ..., cells: _Optional[_Union[Tensor, _Mapping]] = ...) -> None: ...

class ModalityShare(_message.Message):
    __slots__ = ("image", "text")
    IMAGE_FIELD_NUMBER: _ClassVar[int]
    TEXT_FIELD_NUMBER: _ClassVar[int]
    image: _containers.RepeatedScalarFieldContainer[float]
    text: _containers.RepeatedScalarFieldContainer[float]
    def __init__(self, image: _Optional[_Iterable[float]] = ..., text: _Optional[_Iterable[float]] = ...) -> None: ...

class Usage(_message.Message):
    __slots__ = ("input_tokens", "output_tokens")
    INPUT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    OUTPUT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    input_tokens: int
    output_tokens: int
    def __init__(self, input_tokens: _Optional[int] = ..., output_tokens: _Optional[int] = ...) -> None: ...

class ExplanationError(_message.Message):
    __slots__ = ("code", "message", "details")
    class DetailsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    CODE_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    DETAILS_FIELD_NUMBER: _ClassVar[int]
    code: ExplanationErrorCode
    message: str
    details: _containers.ScalarMap[str, str]
    def __init__(self, code: _Optional[_Union[ExplanationErrorCode, str]] = ..., message: _Optional[str] = ..., details: _Optional[_Mapping[str, str]] = ...) -> None: ...

class ExplanationProgress(_message.Message):
    __slots__ = ("fraction", "seconds_left", "methods")
    FRACTION_FIELD_NUMBER: _ClassVar[int]
    SECONDS_LEFT_FIELD_NUMBER: _ClassVar[int]
    METHODS_FIELD_NUMBER: _ClassVar[int]
    fraction: float
    seconds_left: float
    methods: _containers.RepeatedCompositeFieldContainer[MethodProgress]
    def __init__(self, fraction: _Optional[float] = ..., seconds_left: _Optional[float] = ..., methods: _Optional[_Iterable[_Union[MethodProgress, _Mapping]]] = ...) -> None: ...

class MethodProgress(_message.Message):
    __slots__ = ("method", "fraction", "seconds_left")
    METHOD_FIELD_NUMBER: _ClassVar[int]
    FRACTION_FIELD_NUMBER: _ClassVar[int]
    SECONDS_LEFT_FIELD_NUMBER: _ClassVar[int]
    method: str
    fraction: float
    seconds_left: float
    def __init__(self, method: _Optional[str] = ..., fraction: _Optional[float] = ..., seconds_left: _Optional[float] = ...) -> None: ...

class MethodResult(_message.Message):
    __slots__ = ("method", "attributions", "extras", "seconds", "aggregated", "faithfulness", "image_attributions", "modality")
    class ExtrasEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: Tensor
        def __init__(self, key: _Optional[str] = ..., value: _Optional[_Union[Tensor, _Mapping]] = ...) -> None: ...
    METHOD_FIELD_NUMBER: _ClassVar[int]
    ATTRIBUTIONS_FIELD_NUMBER: _ClassVar[int]
    EXTRAS_FIELD_NUMBER: _ClassVar[int]
    SECONDS_FIELD_NUMBER: _ClassVar[int]
    AGGREGATED_FIELD_NUMBER: _ClassVar[int]
    FAITHFULNESS_FIELD_NUMBER: _ClassVar[int]
    IMAGE_ATTRIBUTIONS_FIELD_NUMBER: _ClassVar[int]
    MODALITY_FIELD_NUMBER: _ClassVar[int]
    method: str
    attributions: Tensor
    extras: _containers.MessageMap[str, Tensor]
    seconds: float
    aggregated: Tensor
    faithfulness: Faithfulness
    image_attributions: _containers.RepeatedCompositeFieldContainer[ImageAttribution]
    modality: ModalityShare
    def __init__(self, method: _Optional[str] = ..., attributions: _Optional[_Union[Tensor, _Mapping]] = ..., extras: _Optional[_Mapping[str, Tensor]] = ..., seconds: _Optional[float] = ..., aggregated: _Optional[_Union[Tensor, _Mapping]] = ..., faithfulness: _Optional[_Union[Faithfulness, _Mapping]] = ..., image_attributions: _Optional[_Iterable[_Union[ImageAttribution, _Mapping]]] = ..., modality: _Optional[_Union[ModalityShare, _Mapping]] = ...) -> None: ...

class Faithfulness(_message.Message):
    __slots__ = ("fractions", "comprehensiveness", "sufficiency", "random_comprehensiveness", "random_sufficiency", "aopc_comprehensiveness", "aopc_sufficiency", "random_aopc_comprehensiveness", "random_aopc_sufficiency", "replacement_token_id")
    FRACTIONS_FIELD_NUMBER: _ClassVar[int]
    COMPREHENSIVENESS_FIELD_NUMBER: _ClassVar[int]
    SUFFICIENCY_FIELD_NUMBER: _ClassVar[int]
    RANDOM_COMPREHENSIVENESS_FIELD_NUMBER: _ClassVar[int]
    RANDOM_SUFFICIENCY_FIELD_NUMBER: _ClassVar[int]
    AOPC_COMPREHENSIVENESS_FIELD_NUMBER: _ClassVar[int]
    AOPC_SUFFICIENCY_FIELD_NUMBER: _ClassVar[int]
    RANDOM_AOPC_COMPREHENSIVENESS_FIELD_NUMBER: _ClassVar[int]
    RANDOM_AOPC_SUFFICIENCY_FIELD_NUMBER: _ClassVar[int]
    REPLACEMENT_TOKEN_ID_FIELD_NUMBER: _ClassVar[int]
    fractions: _containers.RepeatedScalarFieldContainer[float]
    comprehensiveness: _containers.RepeatedScalarFieldContainer[float]
    sufficiency: _containers.RepeatedScalarFieldContainer[float]
    random_comprehensiveness: _containers.RepeatedScalarFieldContainer[float]
    random_sufficiency: _containers.RepeatedScalarFieldContainer[float]
    aopc_comprehensiveness: float
    aopc_sufficiency: float
    random_aopc_comprehensiveness: float
    random_aopc_sufficiency: float
    replacement_token_id: int
    def __init__(self, fractions: _Optional[_Iterable[float]] = ..., comprehensiveness: _Optional[_Iterable[float]] = ..., sufficiency: _Optional[_Iterable[float]] = ..., random_comprehensiveness: _Optional[_Iterable[float]] = ..., random_sufficiency: _Optional[_Iterable[float]] = ..., aopc_comprehensiveness: _Optional[float] = ..., aopc_sufficiency: _Optional[float] = ..., random_aopc_comprehensiveness: _Optional[float] = ..., random_aopc_sufficiency: _Optional[float] = ..., replacement_token_id: _Optional[int] = ...) -> None: ...

class StepScores(_message.Message):
    __slots__ = ("logprobs", "probabilities", "entropies", "ranks", "top_token_ids", "top_logprobs")
    LOGPROBS_FIELD_NUMBER: _ClassVar[int]
    PROBABILITIES_FIELD_NUMBER: _ClassVar[int]
    ENTROPIES_FIELD_NUMBER: _ClassVar[int]
    RANKS_FIELD_NUMBER: _ClassVar[int]
    TOP_TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    TOP_LOGPROBS_FIELD_NUMBER: _ClassVar[int]
    logprobs: _containers.RepeatedScalarFieldContainer[float]
    probabilities: _containers.RepeatedScalarFieldContainer[float]
    entropies: _containers.RepeatedScalarFieldContainer[float]
    ranks: _containers.RepeatedScalarFieldContainer[int]
    top_token_ids: Tensor
    top_logprobs: Tensor
    def __init__(self, logprobs: _Optional[_Iterable[float]] = ..., probabilities: _Optional[_Iterable[float]] = ..., entropies: _Optional[_Iterable[float]] = ..., ranks: _Optional[_Iterable[int]] = ..., top_token_ids: _Optional[_Union[Tensor, _Mapping]] = ..., top_logprobs: _Optional[_Union[Tensor, _Mapping]] = ...) -> None: ...

class SourceGroup(_message.Message):
    __slots__ = ("start", "end", "label")
    START_FIELD_NUMBER: _ClassVar[int]
    END_FIELD_NUMBER: _ClassVar[int]
    LABEL_FIELD_NUMBER: _ClassVar[int]
    start: int
    end: int
    label: str
    def __init__(self, start: _Optional[int] = ..., end: _Optional[int] = ..., label: _Optional[str] = ...) -> None: ...

class Fidelity(_message.Message):
    __slots__ = ("recomputed_logprobs", "max_abs_logprob_diff")
    RECOMPUTED_LOGPROBS_FIELD_NUMBER: _ClassVar[int]
    MAX_ABS_LOGPROB_DIFF_FIELD_NUMBER: _ClassVar[int]
    recomputed_logprobs: _containers.RepeatedScalarFieldContainer[float]
    max_abs_logprob_diff: float
    def __init__(self, recomputed_logprobs: _Optional[_Iterable[float]] = ..., max_abs_logprob_diff: _Optional[float] = ...) -> None: ...

class Explanation(_message.Message):
    __slots__ = ("explanation_id", "state", "error", "model", "weights_digest", "tokens", "prompt_length", "target_positions", "results", "fidelity", "cache_hit", "created_at", "completed_at", "trace_id", "attempts", "foil_token_ids", "target_score", "step_scores", "source_groups", "cancelled_by", "progress", "explain_path", "architecture", "image_grids")
    EXPLANATION_ID_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    WEIGHTS_DIGEST_FIELD_NUMBER: _ClassVar[int]
    TOKENS_FIELD_NUMBER: _ClassVar[int]
    PROMPT_LENGTH_FIELD_NUMBER: _ClassVar[int]
    TARGET_POSITIONS_FIELD_NUMBER: _ClassVar[int]
    RESULTS_FIELD_NUMBER: _ClassVar[int]
    FIDELITY_FIELD_NUMBER: _ClassVar[int]
    CACHE_HIT_FIELD_NUMBER: _ClassVar[int]
    CREATED_AT_FIELD_NUMBER: _ClassVar[int]
    COMPLETED_AT_FIELD_NUMBER: _ClassVar[int]
    TRACE_ID_FIELD_NUMBER: _ClassVar[int]
    ATTEMPTS_FIELD_NUMBER: _ClassVar[int]
    FOIL_TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    TARGET_SCORE_FIELD_NUMBER: _ClassVar[int]
    STEP_SCORES_FIELD_NUMBER: _ClassVar[int]
    SOURCE_GROUPS_FIELD_NUMBER: _ClassVar[int]
    CANCELLED_BY_FIELD_NUMBER: _ClassVar[int]
    PROGRESS_FIELD_NUMBER: _ClassVar[int]
    EXPLAIN_PATH_FIELD_NUMBER: _ClassVar[int]
    ARCHITECTURE_FIELD_NUMBER: _ClassVar[int]
    IMAGE_GRIDS_FIELD_NUMBER: _ClassVar[int]
    explanation_id: str
    state: ExplanationState
    error: ExplanationError
    model: str
    weights_digest: str
    tokens: _containers.RepeatedCompositeFieldContainer[Token]
    prompt_length: int
    target_positions: _containers.RepeatedScalarFieldContainer[int]
    results: _containers.RepeatedCompositeFieldContainer[MethodResult]
    fidelity: Fidelity
    cache_hit: bool
    created_at: _timestamp_pb2.Timestamp
    completed_at: _timestamp_pb2.Timestamp
    trace_id: str
    attempts: int
    foil_token_ids: _containers.RepeatedScalarFieldContainer[int]
    target_score: TargetScore
    step_scores: StepScores
    source_groups: _containers.RepeatedCompositeFieldContainer[SourceGroup]
    cancelled_by: str
    progress: ExplanationProgress
    explain_path: ExplainPath
    architecture: str
    image_grids: _containers.RepeatedCompositeFieldContainer[ImageGrid]
    def __init__(self, explanation_id: _Optional[str] = ..., state: _Optional[_Union[ExplanationState, str]] = ..., error: _Optional[_Union[ExplanationError, _Mapping]] = ..., model: _Optional[str] = ..., weights_digest: _Optional[str] = ..., tokens: _Optional[_Iterable[_Union[Token, _Mapping]]] = ..., prompt_length: _Optional[int] = ..., target_positions: _Optional[_Iterable[int]] = ..., results: _Optional[_Iterable[_Union[MethodResult, _Mapping]]] = ..., fidelity: _Optional[_Union[Fidelity, _Mapping]] = ..., cache_hit: _Optional[bool] = ..., created_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., completed_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., trace_id: _Optional[str] = ..., attempts: _Optional[int] = ..., foil_token_ids: _Optional[_Iterable[int]] = ..., target_score: _Optional[_Union[TargetScore, str]] = ..., step_scores: _Optional[_Union[StepScores, _Mapping]] = ..., source_groups: _Optional[_Iterable[_Union[SourceGroup, _Mapping]]] = ..., cancelled_by: _Optional[str] = ..., progress: _Optional[_Union[ExplanationProgress, _Mapping]] = ..., explain_path: _Optional[_Union[ExplainPath, str]] = ..., architecture: _Optional[str] = ..., image_grids: _Optional[_Iterable[_Union[ImageGrid, _Mapping]]] = ...) -> None: ...
