"""What an undecodable request is told (server/rpc.py); the gateway's answer over a socket is in tests/e2e."""

from __future__ import annotations

from typing import cast

import pytest
from google.protobuf import struct_pb2
from google.protobuf.descriptor import Descriptor
from google.protobuf.message import DecodeError
from sightline.v1 import inference_pb2

from server.rpc import describe_decode_error
from tests.protofuzz import deep_struct, encode

GENERATE = cast(Descriptor, inference_pb2.GenerateRequest.DESCRIPTOR)


def _problem(wire: bytes) -> str:
    with pytest.raises(DecodeError) as caught:
        inference_pb2.GenerateRequest.FromString(wire)
    return describe_decode_error(GENERATE, wire, caught.value)


def test_invalid_utf8_is_named_by_field_path_and_byte() -> None:
    wire = encode(
        GENERATE,
        {"input": {"chat": {"messages": [{"role": "user", "content": "ok"}, {"role": b"us\xc3r"}]}}},
    )
    assert _problem(wire) == (
        "the request is not a valid sightline.v1.GenerateRequest: input.chat.messages[1].role is not valid UTF-8 "
        "(byte 2: b'\\xc3r'); string fields must hold UTF-8 text"
    )


def test_a_truncated_request_says_which_field_runs_past_the_end() -> None:
    wire = encode(GENERATE, {"request_id": "abc", "sampling": {"stop": ["a long enough stop string"]}})
    assert "sampling: its length (27 bytes) runs past the end of the request" in _problem(wire[:-3])


# The API has no recursive message since method params are typed (issue 16); Struct, which nests, stands in for
# whatever message may one day nest.
STRUCT = struct_pb2.Struct.DESCRIPTOR


def test_nesting_past_the_parser_limit_is_named() -> None:
    wire = encode(STRUCT, deep_struct(40))
    with pytest.raises(DecodeError) as caught:
        struct_pb2.Struct.FromString(wire)
    problem = describe_decode_error(STRUCT, wire, caught.value)
    assert "fields[0].value.struct_value.fields[0].value.struct_value" in problem
    assert "is nested more than 100 messages deep" in problem


def test_nesting_within_the_limit_parses() -> None:
    struct = struct_pb2.Struct.FromString(encode(STRUCT, deep_struct(20)))
    assert struct.fields["a"].struct_value.fields["a"].HasField("struct_value")


def test_field_number_zero_and_undefined_wire_types() -> None:
    assert "has a field numbered 0" in _problem(b"\x00\x01")
    assert "GenerateRequest: model: wire type 7 is not one this API uses" in _problem(b"\x0f")
    assert "GenerateRequest: field 113: wire type 7" in _problem(b"\x8f\x07")
