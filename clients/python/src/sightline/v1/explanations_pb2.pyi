import datetime

from google.protobuf import timestamp_pb2 as _timestamp_pb2
from sightline.v1 import types_pb2 as _types_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class ParamType(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    PARAM_TYPE_UNSPECIFIED: _ClassVar[ParamType]
    PARAM_TYPE_INT: _ClassVar[ParamType]
    PARAM_TYPE_FLOAT: _ClassVar[ParamType]
    PARAM_TYPE_STRING: _ClassVar[ParamType]
    PARAM_TYPE_BOOL: _ClassVar[ParamType]
PARAM_TYPE_UNSPECIFIED: ParamType
PARAM_TYPE_INT: ParamType
PARAM_TYPE_FLOAT: ParamType
PARAM_TYPE_STRING: ParamType
PARAM_TYPE_BOOL: ParamType

class CancelExplanationRequest(_message.Message):
    __slots__ = ("explanation_id", "wait_seconds")
    EXPLANATION_ID_FIELD_NUMBER: _ClassVar[int]
    WAIT_SECONDS_FIELD_NUMBER: _ClassVar[int]
    explanation_id: str
    wait_seconds: float
    def __init__(self, explanation_id: _Optional[str] = ..., wait_seconds: _Optional[float] = ...) -> None: ...

class CancelExplanationResponse(_message.Message):
    __slots__ = ("request_id", "trace_id", "explanation")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    TRACE_ID_FIELD_NUMBER: _ClassVar[int]
    EXPLANATION_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    trace_id: str
    explanation: _types_pb2.Explanation
    def __init__(self, request_id: _Optional[str] = ..., trace_id: _Optional[str] = ..., explanation: _Optional[_Union[_types_pb2.Explanation, _Mapping]] = ...) -> None: ...

class WatchExplanationRequest(_message.Message):
    __slots__ = ("explanation_id",)
    EXPLANATION_ID_FIELD_NUMBER: _ClassVar[int]
    explanation_id: str
    def __init__(self, explanation_id: _Optional[str] = ...) -> None: ...

class WatchExplanationResponse(_message.Message):
    __slots__ = ("explanation",)
    EXPLANATION_FIELD_NUMBER: _ClassVar[int]
    explanation: _types_pb2.Explanation
    def __init__(self, explanation: _Optional[_Union[_types_pb2.Explanation, _Mapping]] = ...) -> None: ...

class EstimateExplanationRequest(_message.Message):
    __slots__ = ("model", "prompt_tokens", "output_tokens", "explain")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    PROMPT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    OUTPUT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    EXPLAIN_FIELD_NUMBER: _ClassVar[int]
    model: str
    prompt_tokens: int
    output_tokens: int
    explain: _types_pb2.ExplainSpec
    def __init__(self, model: _Optional[str] = ..., prompt_tokens: _Optional[int] = ..., output_tokens: _Optional[int] = ..., explain: _Optional[_Union[_types_pb2.ExplainSpec, _Mapping]] = ...) -> None: ...

class MethodEstimate(_message.Message):
    __slots__ = ("method", "passes", "seconds")
    METHOD_FIELD_NUMBER: _ClassVar[int]
    PASSES_FIELD_NUMBER: _ClassVar[int]
    SECONDS_FIELD_NUMBER: _ClassVar[int]
    method: str
    passes: float
    seconds: float
    def __init__(self, method: _Optional[str] = ..., passes: _Optional[float] = ..., seconds: _Optional[float] = ...) -> None: ...

class EstimateExplanationResponse(_message.Message):
    __slots__ = ("request_id", "trace_id", "passes", "seconds", "methods", "seconds_per_token_pass")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    TRACE_ID_FIELD_NUMBER: _ClassVar[int]
    PASSES_FIELD_NUMBER: _ClassVar[int]
    SECONDS_FIELD_NUMBER: _ClassVar[int]
    METHODS_FIELD_NUMBER: _ClassVar[int]
    SECONDS_PER_TOKEN_PASS_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    trace_id: str
    passes: float
    seconds: float
    methods: _containers.RepeatedCompositeFieldContainer[MethodEstimate]
    seconds_per_token_pass: float
    def __init__(self, request_id: _Optional[str] = ..., trace_id: _Optional[str] = ..., passes: _Optional[float] = ..., seconds: _Optional[float] = ..., methods: _Optional[_Iterable[_Union[MethodEstimate, _Mapping]]] = ..., seconds_per_token_pass: _Optional[float] = ...) -> None: ...

class ExplainRequest(_message.Message):
    __slots__ = ("model", "prompt_token_ids", "output_token_ids", "output_logprobs", "explain", "request_id")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    PROMPT_TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    OUTPUT_TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    OUTPUT_LOGPROBS_FIELD_NUMBER: _ClassVar[int]
    EXPLAIN_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    model: str
    prompt_token_ids: _containers.RepeatedScalarFieldContainer[int]
    output_token_ids: _containers.RepeatedScalarFieldContainer[int]
    output_logprobs: _containers.RepeatedScalarFieldContainer[float]
    explain: _types_pb2.ExplainSpec
    request_id: str
    def __init__(self, model: _Optional[str] = ..., prompt_token_ids: _Optional[_Iterable[int]] = ..., output_token_ids: _Optional[_Iterable[int]] = ..., output_logprobs: _Optional[_Iterable[float]] = ..., explain: _Optional[_Union[_types_pb2.ExplainSpec, _Mapping]] = ..., request_id: _Optional[str] = ...) -> None: ...

class ExplainResponse(_message.Message):
    __slots__ = ("request_id", "trace_id", "explanation_id", "explanation")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    TRACE_ID_FIELD_NUMBER: _ClassVar[int]
    EXPLANATION_ID_FIELD_NUMBER: _ClassVar[int]
    EXPLANATION_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    trace_id: str
    explanation_id: str
    explanation: _types_pb2.Explanation
    def __init__(self, request_id: _Optional[str] = ..., trace_id: _Optional[str] = ..., explanation_id: _Optional[str] = ..., explanation: _Optional[_Union[_types_pb2.Explanation, _Mapping]] = ...) -> None: ...

class GetExplanationRequest(_message.Message):
    __slots__ = ("explanation_id", "wait_seconds")
    EXPLANATION_ID_FIELD_NUMBER: _ClassVar[int]
    WAIT_SECONDS_FIELD_NUMBER: _ClassVar[int]
    explanation_id: str
    wait_seconds: float
    def __init__(self, explanation_id: _Optional[str] = ..., wait_seconds: _Optional[float] = ...) -> None: ...

class GetExplanationResponse(_message.Message):
    __slots__ = ("request_id", "trace_id", "explanation")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    TRACE_ID_FIELD_NUMBER: _ClassVar[int]
    EXPLANATION_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    trace_id: str
    explanation: _types_pb2.Explanation
    def __init__(self, request_id: _Optional[str] = ..., trace_id: _Optional[str] = ..., explanation: _Optional[_Union[_types_pb2.Explanation, _Mapping]] = ...) -> None: ...

class ListExplanationsRequest(_message.Message):
    __slots__ = ("page_size", "page_token")
    PAGE_SIZE_FIELD_NUMBER: _ClassVar[int]
    PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    page_size: int
    page_token: str
    def __init__(self, page_size: _Optional[int] = ..., page_token: _Optional[str] = ...) -> None: ...

class ExplanationSummary(_message.Message):
    __slots__ = ("explanation_id", "state", "model", "methods", "created_at", "trace_id")
    EXPLANATION_ID_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    METHODS_FIELD_NUMBER: _ClassVar[int]
    CREATED_AT_FIELD_NUMBER: _ClassVar[int]
    TRACE_ID_FIELD_NUMBER: _ClassVar[int]
    explanation_id: str
    state: _types_pb2.ExplanationState
    model: str
    methods: _containers.RepeatedScalarFieldContainer[str]
    created_at: _timestamp_pb2.Timestamp
    trace_id: str
    def __init__(self, explanation_id: _Optional[str] = ..., state: _Optional[_Union[_types_pb2.ExplanationState, str]] = ..., model: _Optional[str] = ..., methods: _Optional[_Iterable[str]] = ..., created_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., trace_id: _Optional[str] = ...) -> None: ...

class ListExplanationsResponse(_message.Message):
    __slots__ = ("request_id", "trace_id", "explanations", "next_page_token")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    TRACE_ID_FIELD_NUMBER: _ClassVar[int]
    EXPLANATIONS_FIELD_NUMBER: _ClassVar[int]
    NEXT_PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    trace_id: str
    explanations: _containers.RepeatedCompositeFieldContainer[ExplanationSummary]
    next_page_token: str
    def __init__(self, request_id: _Optional[str] = ..., trace_id: _Optional[str] = ..., explanations: _Optional[_Iterable[_Union[ExplanationSummary, _Mapping]]] = ..., next_page_token: _Optional[str] = ...) -> None: ...

class ListMethodsRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class MethodParam(_message.Message):
    __slots__ = ("name", "type", "default_value", "description", "minimum", "maximum", "choices")
    NAME_FIELD_NUMBER: _ClassVar[int]
    TYPE_FIELD_NUMBER: _ClassVar[int]
    DEFAULT_VALUE_FIELD_NUMBER: _ClassVar[int]
    DESCRIPTION_FIELD_NUMBER: _ClassVar[int]
    MINIMUM_FIELD_NUMBER: _ClassVar[int]
    MAXIMUM_FIELD_NUMBER: _ClassVar[int]
    CHOICES_FIELD_NUMBER: _ClassVar[int]
    name: str
    type: ParamType
    default_value: _types_pb2.ParamValue
    description: str
    minimum: float
    maximum: float
    choices: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, name: _Optional[str] = ..., type: _Optional[_Union[ParamType, str]] = ..., default_value: _Optional[_Union[_types_pb2.ParamValue, _Mapping]] = ..., description: _Optional[str] = ..., minimum: _Optional[float] = ..., maximum: _Optional[float] = ..., choices: _Optional[_Iterable[str]] = ...) -> None: ...

class MethodInfo(_message.Message):
    __slots__ = ("name", "description", "params", "needs_gradients", "uses_cache", "supports_contrastive_targets", "multimodal", "attributes_tokens", "cost")
    NAME_FIELD_NUMBER: _ClassVar[int]
    DESCRIPTION_FIELD_NUMBER: _ClassVar[int]
    PARAMS_FIELD_NUMBER: _ClassVar[int]
    NEEDS_GRADIENTS_FIELD_NUMBER: _ClassVar[int]
    USES_CACHE_FIELD_NUMBER: _ClassVar[int]
    SUPPORTS_CONTRASTIVE_TARGETS_FIELD_NUMBER: _ClassVar[int]
    MULTIMODAL_FIELD_NUMBER: _ClassVar[int]
    ATTRIBUTES_TOKENS_FIELD_NUMBER: _ClassVar[int]
    COST_FIELD_NUMBER: _ClassVar[int]
    name: str
    description: str
    params: _containers.RepeatedCompositeFieldContainer[MethodParam]
    needs_gradients: bool
    uses_cache: bool
    supports_contrastive_targets: bool
    multimodal: bool
    attributes_tokens: bool
    cost: MethodCost
    def __init__(self, name: _Optional[str] = ..., description: _Optional[str] = ..., params: _Optional[_Iterable[_Union[MethodParam, _Mapping]]] = ..., needs_gradients: _Optional[bool] = ..., uses_cache: _Optional[bool] = ..., supports_contrastive_targets: _Optional[bool] = ..., multimodal: _Optional[bool] = ..., attributes_tokens: _Optional[bool] = ..., cost: _Optional[_Union[MethodCost, _Mapping]] = ...) -> None: ...

class MethodCost(_message.Message):
    __slots__ = ("passes", "passes_per_target", "passes_per_token", "scaled_by_param")
    PASSES_FIELD_NUMBER: _ClassVar[int]
    PASSES_PER_TARGET_FIELD_NUMBER: _ClassVar[int]
    PASSES_PER_TOKEN_FIELD_NUMBER: _ClassVar[int]
    SCALED_BY_PARAM_FIELD_NUMBER: _ClassVar[int]
    passes: float
    passes_per_target: float
    passes_per_token: float
    scaled_by_param: str
    def __init__(self, passes: _Optional[float] = ..., passes_per_target: _Optional[float] = ..., passes_per_token: _Optional[float] = ..., scaled_by_param: _Optional[str] = ...) -> None: ...

class ListMethodsResponse(_message.Message):
    __slots__ = ("methods", "model", "architecture", "explain_path")
    METHODS_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    ARCHITECTURE_FIELD_NUMBER: _ClassVar[int]
    EXPLAIN_PATH_FIELD_NUMBER: _ClassVar[int]
    methods: _containers.RepeatedCompositeFieldContainer[MethodInfo]
    model: str
    architecture: str
    explain_path: _types_pb2.ExplainPath
    def __init__(self, methods: _Optional[_Iterable[_Union[MethodInfo, _Mapping]]] = ..., model: _Optional[str] = ..., architecture: _Optional[str] = ..., explain_path: _Optional[_Union[_types_pb2.ExplainPath, str]] = ...) -> None: ...
