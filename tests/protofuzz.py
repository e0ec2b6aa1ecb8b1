"""Hypothesis strategies for protobuf requests, drawn from message descriptors and encoded to wire bytes by hand.

Encoding by hand lets a request carry what protobuf's own serializer refuses to write: invalid UTF-8 in string
fields, nesting deeper than the parser accepts, unknown fields, truncated or corrupted bytes. Each field's value
is either *plausible* (an override by field path, so requests get past the first checks and reach deeper code)
or *hostile*, drawn from the field's type: boundaries, huge and negative numbers, NaN and infinities, unknown
enum values, empty and enormous strings and repeated fields.

A drawn message is a plain dict (field name to value; a list for a repeated field, a dict for a message, ``bytes``
for a string field holding invalid UTF-8), so tests can look at what they sent.
"""

from __future__ import annotations

import functools
import math
import struct
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from google.protobuf.descriptor import Descriptor, FieldDescriptor
from hypothesis import strategies as st

Fields = dict[str, Any]
Strategy = st.SearchStrategy[Any]

# Key of a drawn message's unknown fields, already encoded.
UNKNOWN_FIELDS = "__unknown__"
# Drawn for a field that is then left out.
ABSENT = object()
INT_EDGES = (0, 1, -1, 2, 4, 5, 50, 51, 2047, 2048, 2049, 49151, 49152, 2**31 - 1, -(2**31), 2**32, 2**63 - 1, -(2**63))
FLOAT_EDGES = (math.nan, math.inf, -math.inf, -0.0, 1e-45, -1.0, 3.4e38)
DOUBLE_EDGES = (*FLOAT_EDGES, 1e308, 5e-324)
INVALID_UTF8 = (
    b"\xff",  # never valid
    b"\xc3",  # a lead byte with no continuation
    b"\xed\xa0\x80",  # an encoded UTF-16 surrogate
    b"\xc0\xaf",  # an overlong encoding of "/"
    b"\xf4\x90\x80\x80",  # past U+10FFFF
)
ODD_TEXT = ("", " ", "\x00", "\u202e", "\U0001f600", "exp_", "../../etc/passwd", "%s%n", "\r\n")
VARINT, FIXED64, LENGTH_DELIMITED, FIXED32 = 0, 1, 2, 5
INTEGER_TYPES = (FieldDescriptor.TYPE_INT32, FieldDescriptor.TYPE_INT64, FieldDescriptor.TYPE_UINT32,
                 FieldDescriptor.TYPE_UINT64)  # fmt: skip


def invalid_utf8() -> st.SearchStrategy[bytes]:
    return st.tuples(st.text(max_size=4), st.sampled_from(INVALID_UTF8), st.text(max_size=4)).map(
        lambda parts: parts[0].encode() + parts[1] + parts[2].encode()
    )


def enormous_text() -> st.SearchStrategy[str]:
    return st.integers(20_000, 200_000).map(lambda n: ("word " * (n // 5 + 1))[:n])


def mostly(plausible: Strategy, hostile: Strategy) -> Strategy:
    """Three draws in four from ``plausible``."""
    return st.sampled_from((True, True, True, False)).flatmap(lambda pick: plausible if pick else hostile)


class RequestStrategies:
    """Strategies for messages of one descriptor tree, with plausible values by field path (``a.b.c``)."""

    def __init__(self, plausible: Mapping[str, Strategy], *, max_depth: int = 9) -> None:
        self._plausible = plausible
        self._max_depth = max_depth

    def message(self, descriptor: Descriptor, path: str = "", depth: int = 0) -> st.SearchStrategy[Fields]:
        if depth > self._max_depth:
            return st.just({})
        usual: dict[str, Strategy] = {}
        optional: dict[str, Strategy] = {}
        for field in descriptor.fields:
            if field.containing_oneof is None:
                # Fields the test gives plausible values (or whose fields it does) are usually sent.
                chosen = usual if self._concerns(_path(path, field)) else optional
                chosen[field.name] = self.field(field, path, depth)
        usual = {name: mostly(strategy, st.just(ABSENT)) for name, strategy in usual.items()}
        if depth == 0:
            optional[UNKNOWN_FIELDS] = unknown_fields()
        # Each oneof: none of its members, or one.
        choices = [
            st.one_of(st.just({}), *(st.fixed_dictionaries({m.name: self.field(m, path, depth)}) for m in oneof.fields))
            for oneof in descriptor.oneofs
        ]
        return st.tuples(st.fixed_dictionaries(usual, optional=optional), *choices).map(_merge)

    def _concerns(self, where: str) -> bool:
        return any(key == where or key.startswith(where + ".") for key in self._plausible)

    def field(self, field: FieldDescriptor, path: str, depth: int) -> Strategy:
        where = _path(path, field)
        hostile = self._hostile(field, where, depth)
        plausible = self._plausible.get(where)
        return hostile if plausible is None else mostly(plausible, hostile)

    def _hostile(self, field: FieldDescriptor, where: str, depth: int) -> Strategy:
        single = self._value(field, where, depth)
        if not field.is_repeated:
            return single
        # Enormous lists repeat one small value: a list of enormous strings would not fit in a request.
        small = st.just({}) if field.type == FieldDescriptor.TYPE_MESSAGE else self._value(field, where, depth, True)
        enormous = st.tuples(small, st.integers(3_000, 60_000)).map(lambda drawn: [drawn[0]] * drawn[1])
        return st.one_of(st.lists(single, max_size=4), enormous)

    def _value(self, field: FieldDescriptor, where: str, depth: int, small: bool = False) -> Strategy:
        kind = field.type
        if kind in INTEGER_TYPES:
            return st.one_of(st.integers(-2, 8), st.sampled_from(INT_EDGES), st.integers(-(2**63), 2**63 - 1))
        if kind == FieldDescriptor.TYPE_FLOAT:
            return st.one_of(st.sampled_from(FLOAT_EDGES), st.floats(width=32))
        if kind == FieldDescriptor.TYPE_DOUBLE:
            return st.one_of(st.sampled_from(DOUBLE_EDGES), st.floats())
        if kind == FieldDescriptor.TYPE_BOOL:
            return st.booleans()
        if kind == FieldDescriptor.TYPE_ENUM:
            assert field.enum_type is not None
            known = [value.number for value in field.enum_type.values]
            return st.one_of(st.sampled_from(known), st.integers(-(2**31), 2**31 - 1))
        if kind == FieldDescriptor.TYPE_STRING:
            if small:
                return st.one_of(st.text(max_size=3), invalid_utf8())
            return st.one_of(st.text(max_size=12), st.sampled_from(ODD_TEXT), invalid_utf8(), enormous_text())
        if kind == FieldDescriptor.TYPE_BYTES:
            return st.binary(max_size=16)
        if kind == FieldDescriptor.TYPE_MESSAGE:
            assert field.message_type is not None
            return self.message(field.message_type, where, depth + 1)
        raise NotImplementedError(f"{where}: protobuf field type {kind} has no strategy yet; add one here")


def _path(path: str, field: FieldDescriptor) -> str:
    return f"{path}.{field.name}" if path else field.name


def _merge(parts: tuple[Fields, ...]) -> Fields:
    return {name: value for part in parts for name, value in part.items() if value is not ABSENT}


def unknown_fields() -> st.SearchStrategy[bytes]:
    """Fields no message here declares, well framed: a parser must skip them."""
    one = st.tuples(st.integers(100, 2**29 - 1), st.sampled_from((VARINT, FIXED64, LENGTH_DELIMITED, FIXED32)),
                    st.binary(max_size=8))  # fmt: skip
    return st.lists(one, min_size=1, max_size=3).map(lambda fields: b"".join(_unknown(*f) for f in fields))


def _unknown(number: int, wire_type: int, payload: bytes) -> bytes:
    tag = _varint(number << 3 | wire_type)
    if wire_type == VARINT:
        return tag + _varint(int.from_bytes(payload, "little") % 2**64)
    if wire_type in (FIXED64, FIXED32):
        width = 8 if wire_type == FIXED64 else 4
        return tag + payload.ljust(width, b"\0")[:width]
    return tag + _varint(len(payload)) + payload


def param_entries(values: Mapping[str, bool | int | float | str]) -> list[Fields]:
    """MethodSpec.params holding ``values`` (NaN and the infinities among the floats), as drawn map entries: an int
    as int_value, a float as float_value."""
    return [{"key": key, "value": _param_value(value)} for key, value in values.items()]


def _param_value(value: bool | int | float | str) -> Fields:
    if isinstance(value, bool):
        return {"bool_value": value}
    if isinstance(value, int):
        return {"int_value": value}
    if isinstance(value, float):
        return {"float_value": value}
    return {"string_value": value}


def deep_struct(levels: int) -> Fields:
    """A google.protobuf.Struct nesting ``levels`` Structs: {"a": {"a": ...}}; each level is three protobuf messages
    deep."""
    inner: Fields = {"fields": [{"key": "k", "value": {"number_value": 1.0}}]}
    for _ in range(levels):
        inner = {"fields": [{"key": "a", "value": {"struct_value": inner}}]}
    return inner


def encode(descriptor: Descriptor, fields: Fields) -> bytes:
    """The wire bytes of a drawn message; repeated numbers packed, as proto3 writes them."""
    out = bytearray()
    for name, value in fields.items():
        if name == UNKNOWN_FIELDS:
            out += value
            continue
        field = descriptor.fields_by_name[name]
        values = value if field.is_repeated else [value]
        if field.is_repeated and _packable(field):
            if values:
                packed = _joined(values, functools.partial(_scalar, field))
                out += _varint(field.number << 3 | LENGTH_DELIMITED) + _varint(len(packed)) + packed
            continue
        out += _joined(values, functools.partial(_tagged, field))
    return bytes(out)


def _joined(values: list[Any], encode_one: Callable[[Any], bytes]) -> bytes:
    if values and values.count(values[0]) == len(values):
        # Enormous lists repeat one value: encode it once.
        return encode_one(values[0]) * len(values)
    return b"".join(encode_one(value) for value in values)


def _tagged(field: FieldDescriptor, value: Any) -> bytes:
    return _varint(field.number << 3 | _wire_type(field)) + _payload(field, value)


def _packable(field: FieldDescriptor) -> bool:
    return field.type not in (FieldDescriptor.TYPE_STRING, FieldDescriptor.TYPE_BYTES, FieldDescriptor.TYPE_MESSAGE)


def _wire_type(field: FieldDescriptor) -> int:
    if field.type == FieldDescriptor.TYPE_FLOAT:
        return FIXED32
    if field.type == FieldDescriptor.TYPE_DOUBLE:
        return FIXED64
    return VARINT if _packable(field) else LENGTH_DELIMITED


def _payload(field: FieldDescriptor, value: Any) -> bytes:
    if field.type == FieldDescriptor.TYPE_MESSAGE:
        assert field.message_type is not None
        body = encode(field.message_type, value)
    elif field.type in (FieldDescriptor.TYPE_STRING, FieldDescriptor.TYPE_BYTES):
        body = value.encode() if isinstance(value, str) else value
    else:
        return _scalar(field, value)
    return _varint(len(body)) + body


def _scalar(field: FieldDescriptor, value: Any) -> bytes:
    if field.type == FieldDescriptor.TYPE_FLOAT:
        return struct.pack("<f", value)
    if field.type == FieldDescriptor.TYPE_DOUBLE:
        return struct.pack("<d", value)
    # Negative numbers are ten-byte two's complement varints; values past a field's width are truncated by the parser.
    return _varint(int(value) % 2**64)


def _varint(value: int) -> bytes:
    out = bytearray()
    while True:
        byte = value & 0x7F
        value >>= 7
        if value:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


@dataclass(frozen=True)
class WireRequest:
    """A drawn request: what was drawn, and the bytes sent (``damage`` says how they were corrupted, if at all)."""

    fields: Fields
    wire: bytes
    damage: str

    def __repr__(self) -> str:
        shown = repr(self.fields)
        if len(shown) > 600:
            shown = shown[:600] + f"… ({len(shown)} characters)"
        return f"WireRequest({self.damage}, {len(self.wire)} bytes, fields={shown}, wire[:80]={self.wire[:80]!r})"


def wire_requests(descriptor: Descriptor, strategies: RequestStrategies) -> st.SearchStrategy[WireRequest]:
    """Drawn messages as bytes; one in four is truncated, has a byte flipped, or is replaced by garbage."""
    damage = st.sampled_from(("intact",) * 9 + ("truncated", "flipped", "garbage"))
    return st.tuples(
        strategies.message(descriptor), damage, st.integers(0, 2**20), st.binary(min_size=1, max_size=40)
    ).map(lambda drawn: _damaged(descriptor, *drawn))


def _damaged(descriptor: Descriptor, fields: Fields, damage: str, where: int, garbage: bytes) -> WireRequest:
    wire = encode(descriptor, fields)
    if damage == "truncated" and wire:
        wire = wire[: where % len(wire)]
    elif damage == "flipped" and wire:
        index = where % len(wire)
        wire = wire[:index] + bytes([wire[index] ^ (garbage[0] or 0xFF)]) + wire[index + 1 :]
    elif damage == "garbage":
        wire = garbage
    else:
        damage = "intact"
    return WireRequest(fields, wire, damage)
