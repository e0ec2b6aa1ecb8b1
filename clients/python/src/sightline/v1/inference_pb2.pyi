from sightline.v1 import types_pb2 as _types_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class GenerationInput(_message.Message):
    __slots__ = ("prompt", "chat", "prompt_token_ids")
    PROMPT_FIELD_NUMBER: _ClassVar[int]
    CHAT_FIELD_NUMBER: _ClassVar[int]
    PROMPT_TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    prompt: str
    chat: _types_pb2.ChatMessages
    prompt_token_ids: _types_pb2.TokenIds
    def __init__(self, prompt: _Optional[str] = ..., chat: _Optional[_Union[_types_pb2.ChatMessages, _Mapping]] = ..., prompt_token_ids: _Optional[_Union[_types_pb2.TokenIds, _Mapping]] = ...) -> None: ...

class GenerateRequest(_message.Message):
    __slots__ = ("model", "input", "sampling", "explain", "request_id")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    INPUT_FIELD_NUMBER: _ClassVar[int]
    SAMPLING_FIELD_NUMBER: _ClassVar[int]
    EXPLAIN_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    model: str
    input: GenerationInput
    sampling: _types_pb2.SamplingParams
    explain: _types_pb2.ExplainSpec
    request_id: str
    def __init__(self, model: _Optional[str] = ..., input: _Optional[_Union[GenerationInput, _Mapping]] = ..., sampling: _Optional[_Union[_types_pb2.SamplingParams, _Mapping]] = ..., explain: _Optional[_Union[_types_pb2.ExplainSpec, _Mapping]] = ..., request_id: _Optional[str] = ...) -> None: ...

class GenerateResponse(_message.Message):
    __slots__ = ("request_id", "trace_id", "model", "text", "prompt_token_ids", "output_tokens", "finish_reason", "usage", "explanation_id", "explanation")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    TRACE_ID_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    TEXT_FIELD_NUMBER: _ClassVar[int]
    PROMPT_TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    OUTPUT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    FINISH_REASON_FIELD_NUMBER: _ClassVar[int]
    USAGE_FIELD_NUMBER: _ClassVar[int]
    EXPLANATION_ID_FIELD_NUMBER: _ClassVar[int]
    EXPLANATION_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    trace_id: str
    model: str
    text: str
    prompt_token_ids: _containers.RepeatedScalarFieldContainer[int]
    output_tokens: _containers.RepeatedCompositeFieldContainer[_types_pb2.Token]
    finish_reason: _types_pb2.FinishReason
    usage: _types_pb2.Usage
    explanation_id: str
    explanation: _types_pb2.Explanation
    def __init__(self, request_id: _Optional[str] = ..., trace_id: _Optional[str] = ..., model: _Optional[str] = ..., text: _Optional[str] = ..., prompt_token_ids: _Optional[_Iterable[int]] = ..., output_tokens: _Optional[_Iterable[_Union[_types_pb2.Token, _Mapping]]] = ..., finish_reason: _Optional[_Union[_types_pb2.FinishReason, str]] = ..., usage: _Optional[_Union[_types_pb2.Usage, _Mapping]] = ..., explanation_id: _Optional[str] = ..., explanation: _Optional[_Union[_types_pb2.Explanation, _Mapping]] = ...) -> None: ...

class GenerateStreamStart(_message.Message):
    __slots__ = ("model", "prompt_token_ids")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    PROMPT_TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    model: str
    prompt_token_ids: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, model: _Optional[str] = ..., prompt_token_ids: _Optional[_Iterable[int]] = ...) -> None: ...

class GenerateStreamDelta(_message.Message):
    __slots__ = ("output_tokens", "text_delta")
    OUTPUT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    TEXT_DELTA_FIELD_NUMBER: _ClassVar[int]
    output_tokens: _containers.RepeatedCompositeFieldContainer[_types_pb2.Token]
    text_delta: str
    def __init__(self, output_tokens: _Optional[_Iterable[_Union[_types_pb2.Token, _Mapping]]] = ..., text_delta: _Optional[str] = ...) -> None: ...

class GenerateStreamEnd(_message.Message):
    __slots__ = ("finish_reason", "usage", "explanation_id", "explanation")
    FINISH_REASON_FIELD_NUMBER: _ClassVar[int]
    USAGE_FIELD_NUMBER: _ClassVar[int]
    EXPLANATION_ID_FIELD_NUMBER: _ClassVar[int]
    EXPLANATION_FIELD_NUMBER: _ClassVar[int]
    finish_reason: _types_pb2.FinishReason
    usage: _types_pb2.Usage
    explanation_id: str
    explanation: _types_pb2.Explanation
    def __init__(self, finish_reason: _Optional[_Union[_types_pb2.FinishReason, str]] = ..., usage: _Optional[_Union[_types_pb2.Usage, _Mapping]] = ..., explanation_id: _Optional[str] = ..., explanation: _Optional[_Union[_types_pb2.Explanation, _Mapping]] = ...) -> None: ...

class GenerateStreamResponse(_message.Message):
    __slots__ = ("request_id", "trace_id", "start", "delta", "end")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    TRACE_ID_FIELD_NUMBER: _ClassVar[int]
    START_FIELD_NUMBER: _ClassVar[int]
    DELTA_FIELD_NUMBER: _ClassVar[int]
    END_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    trace_id: str
    start: GenerateStreamStart
    delta: GenerateStreamDelta
    end: GenerateStreamEnd
    def __init__(self, request_id: _Optional[str] = ..., trace_id: _Optional[str] = ..., start: _Optional[_Union[GenerateStreamStart, _Mapping]] = ..., delta: _Optional[_Union[GenerateStreamDelta, _Mapping]] = ..., end: _Optional[_Union[GenerateStreamEnd, _Mapping]] = ...) -> None: ...
