"""Redis cache of every layer's hidden states for a (weights, token ids) pair, in a pickle-free tensor codec.

Layout of a cached tensor: [num_layers + 1, num_tokens, hidden]; index 0 is the embedding output and index l the
output of decoder layer l, all BEFORE the final norm (see `explainers.model.forward_with_hidden_states`), in
bfloat16; for a sequence with pictures the key also names the pictures' digests. Beside it, under the same key +
":last", the last layer [num_tokens, hidden] in float32, and under the same key + ":" + a name, hashes of named
tensors derived from the states (`DerivedTensors`): under
":readout:{prompt length}" what that last layer read out for one prompt/output split
(`explainers.step_scores.Readout`), under ":logit_lens" what every layer read out at some positions
(`explainers.methods.logit_lens`).

Entry format: MAGIC | header length (uint32 LE) | JSON header {dtype, shape, checksum (xxh3-128)} | raw little-endian
payload.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
import struct
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, fields
from typing import Any, Self, TypeVar

import numpy as np
import torch
import xxhash
from redis import Redis
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from common.jobs import TENANT_NAME

logger = logging.getLogger(__name__)

# Sightline tensor, format version 2 (version 1 had a blake2b checksum: such an entry reads as corrupt, so an
# upgrade recomputes it once).
MAGIC = b"SLT2"
_PREFIX = struct.Struct("<4sI")  # magic, header length
_MAX_HEADER_BYTES = 4096

# bfloat16, not float16: Llama-family residual streams carry outlier activations in the thousands that grow with
# depth and can overflow float16 (max 65504), while bfloat16 has float32's range. Its 8-bit mantissa (relative
# error <= 2**-9) is the precision vLLM itself computes bf16 checkpoints at.
STORAGE_DTYPE = torch.bfloat16
# The last layer is also kept at the explainer's serving precision: step scores and fidelity are read out of it.
LAST_LAYER_DTYPE = torch.float32

# Element dtype -> (its name in the header, the same-width integer its raw bits travel as). Going through the
# integer view keeps bfloat16 (which numpy lacks) bit-exact.
_CODEC_DTYPES: dict[torch.dtype, tuple[str, torch.dtype]] = {
    torch.bfloat16: ("bfloat16", torch.int16),
    torch.float16: ("float16", torch.int16),
    torch.float32: ("float32", torch.int32),
    torch.float64: ("float64", torch.int64),
    torch.int32: ("int32", torch.int32),
    torch.int64: ("int64", torch.int64),
}
_DTYPES_BY_NAME = {name: dtype for dtype, (name, _) in _CODEC_DTYPES.items()}

Decoded = TypeVar("Decoded")

REDIS_UNREACHABLE = (RedisConnectionError, RedisTimeoutError)

# A derived entry's name: "readout:{prompt length}", "logit_lens".
_DERIVED_NAME = re.compile(r"[a-z_]{1,32}(:[0-9]{1,9})?")

# Redis refuses string values above proto-max-bulk-len (512 MiB by default).
MAX_ENTRY_BYTES = 512 * 1024 * 1024


class CorruptEntryError(ValueError):
    """A cache entry that is not a well-formed, checksum-valid encoded tensor."""


def _checksum(dtype_name: str, shape: Sequence[int], payload: bytes | memoryview) -> str:
    # dtype and shape are hashed too, so a corrupted header that still fits the payload size is caught. The checksum
    # guards against accidents (a truncated write, a flipped bit), not an adversary: Redis is inside the trust
    # boundary. xxh3 reads tens of GB/s where blake2b read 0.3-1, which was a fifth of a warm attention call.
    digest = xxhash.xxh3_128()
    digest.update(json.dumps([dtype_name, list(shape)]).encode())
    digest.update(payload)
    return digest.hexdigest()


def encode_tensor(tensor: torch.Tensor) -> bytes:
    """Encode a bfloat16, float16, float32, float64, int32 or int64 tensor as header + raw little-endian bytes."""
    if tensor.dtype not in _CODEC_DTYPES:
        raise TypeError(f"cannot encode {tensor.dtype}; supported: {', '.join(_DTYPES_BY_NAME)}")
    dtype_name, bits_dtype = _CODEC_DTYPES[tensor.dtype]
    bits = tensor.detach().cpu().contiguous().view(bits_dtype).numpy()
    payload = bits.astype(_little_endian(tensor.dtype), copy=False).tobytes()
    shape = list(tensor.shape)
    header = json.dumps(
        {"dtype": dtype_name, "shape": shape, "checksum": _checksum(dtype_name, shape, payload)}
    ).encode()
    return _PREFIX.pack(MAGIC, len(header)) + header + payload


def decode_tensor(blob: bytes) -> torch.Tensor:
    """Decode `encode_tensor` output; raise CorruptEntryError on a bad magic, size, header or checksum."""
    if len(blob) < _PREFIX.size:
        raise CorruptEntryError(f"entry of {len(blob)} bytes is shorter than its {_PREFIX.size}-byte prefix")
    magic, header_length = _PREFIX.unpack_from(blob)
    if magic != MAGIC:
        raise CorruptEntryError(f"bad magic {magic!r}, expected {MAGIC!r}")
    if header_length > min(_MAX_HEADER_BYTES, len(blob) - _PREFIX.size):
        raise CorruptEntryError(f"header length {header_length} does not fit an entry of {len(blob)} bytes")
    header_end = _PREFIX.size + header_length
    dtype_name, shape, checksum = _parse_header(blob[_PREFIX.size : header_end])

    dtype = _DTYPES_BY_NAME[dtype_name]
    payload = memoryview(blob)[header_end:]  # no copy of a payload that may be hundreds of MB
    expected_bytes = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    if len(payload) != expected_bytes:
        raise CorruptEntryError(f"payload is {len(payload)} bytes, {dtype_name}{shape} needs {expected_bytes}")
    if _checksum(dtype_name, shape, payload) != checksum:
        raise CorruptEntryError("checksum mismatch")
    # astype to native order also copies out of the read-only buffer, so the tensor owns writable memory.
    bits = np.frombuffer(payload, dtype=_little_endian(dtype)).astype(_little_endian(dtype).newbyteorder("="))
    return torch.from_numpy(bits).view(dtype).reshape(shape)


def _blob(value: object) -> bytes:
    if not isinstance(value, bytes):
        raise TypeError("HiddenStateCache needs a Redis client with decode_responses=False")
    return value


def _tensors(fields: object) -> dict[str, torch.Tensor]:
    """A hash of encoded tensors, decoded."""
    if not isinstance(fields, dict):
        raise TypeError("HiddenStateCache needs a synchronous Redis client")
    try:
        return {_blob(name).decode(): decode_tensor(_blob(blob)) for name, blob in fields.items()}
    except UnicodeDecodeError as error:
        raise CorruptEntryError(f"a field name is not UTF-8: {error}") from error


def _little_endian(dtype: torch.dtype) -> np.dtype[np.signedinteger]:
    return np.dtype(f"<i{dtype.itemsize}")


def _parse_header(raw: bytes) -> tuple[str, list[int], str]:
    try:
        header: Any = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise CorruptEntryError(f"header is not JSON: {error}") from error
    if not isinstance(header, dict):
        raise CorruptEntryError("header is not a JSON object")
    dtype_name, shape, checksum = header.get("dtype"), header.get("shape"), header.get("checksum")
    if dtype_name not in _DTYPES_BY_NAME:
        raise CorruptEntryError(f"unknown dtype {dtype_name!r}")
    if not isinstance(shape, list) or not all(type(size) is int and size >= 0 for size in shape):
        raise CorruptEntryError(f"bad shape {shape!r}")
    if not isinstance(checksum, str):
        raise CorruptEntryError("missing checksum")
    return dtype_name, shape, checksum


class HiddenStateCache:
    """One tenant's per-layer hidden states keyed by weights digest and token ids, stored as bfloat16 with a TTL.

    Entries belong to the tenant whose explanation computed them: another tenant explaining the same
    tokens misses and computes its own, so it can neither read the states nor learn from a hit (or its
    speed) that someone else explained that text.

    The Redis client must return bytes (decode_responses=False).
    """

    def __init__(self, redis: Redis, ttl_seconds: int, tenant: str) -> None:
        if ttl_seconds <= 0:
            raise ValueError(f"ttl_seconds must be positive, got {ttl_seconds}")
        if not TENANT_NAME.fullmatch(tenant):
            raise ValueError(f"not a tenant name: {tenant!r}")
        self._redis = redis
        self._ttl_seconds = ttl_seconds
        self._tenant = tenant

    @staticmethod
    def key(tenant: str, weights_digest: str, token_ids: Sequence[int], image_digests: Sequence[str] = ()) -> str:
        """The entry of a sequence; with pictures in it, their sha256 digests (in order) are part of the key, since
        the same token ids (image placeholders included) with another picture are another input."""
        identity = hashlib.sha256(np.asarray(token_ids, dtype="<i4").tobytes())
        for image_digest in image_digests:
            identity.update(b"|image:" + image_digest.encode())
        return f"sl:hs:{tenant}:{weights_digest}:{identity.hexdigest()}"

    def get(
        self, weights_digest: str, token_ids: Sequence[int], image_digests: Sequence[str] = ()
    ) -> torch.Tensor | None:
        """The cached bfloat16 states, or None on a miss. A corrupt entry is deleted and counts as a miss."""
        return self._get(self.key(self._tenant, weights_digest, token_ids, image_digests))

    def get_last_layer(
        self, weights_digest: str, token_ids: Sequence[int], image_digests: Sequence[str] = ()
    ) -> torch.Tensor | None:
        """The last layer's states [num_tokens, hidden] at full precision (float32) stored with the states, if any."""
        return self._get(self._last_layer_key(weights_digest, token_ids, image_digests))

    def put_last_layer(
        self,
        weights_digest: str,
        token_ids: Sequence[int],
        last_layer: torch.Tensor,
        image_digests: Sequence[str] = (),
    ) -> None:
        """Keep the forward pass's last layer at full precision (float32), so that a hit reads step scores and
        fidelity out of the states the miss read them from, for any prompt/output split, instead of out of the
        bfloat16 states (~1e-2 worse in log-probability). 1/(num_layers + 1) of the entry, at twice the width."""
        self._set(
            self._last_layer_key(weights_digest, token_ids, image_digests),
            encode_tensor(last_layer.to(LAST_LAYER_DTYPE)),
        )

    def _last_layer_key(self, weights_digest: str, token_ids: Sequence[int], image_digests: Sequence[str] = ()) -> str:
        return f"{self.key(self._tenant, weights_digest, token_ids, image_digests)}:last"

    def derived(self, weights_digest: str, token_ids: Sequence[int]) -> DerivedTensors:
        """The entries derived from one sequence's states (what a readout of them gave), by name."""
        return DerivedTensors(self, weights_digest, token_ids)

    def get_derived(self, weights_digest: str, token_ids: Sequence[int], name: str) -> dict[str, torch.Tensor] | None:
        """The named tensors put_derived stored under name, or None. A corrupt one deletes the entry (a miss)."""
        return self._read(self._derived_key(weights_digest, token_ids, name), self._redis.hgetall, _tensors)

    def put_derived(
        self, weights_digest: str, token_ids: Sequence[int], name: str, tensors: Mapping[str, torch.Tensor]
    ) -> None:
        """Keep named tensors derived from the states under name, replacing all of an earlier entry's tensors."""
        key = self._derived_key(weights_digest, token_ids, name)
        transaction = self._redis.pipeline(transaction=True)
        transaction.delete(key)
        transaction.hset(key, mapping={field: encode_tensor(tensor) for field, tensor in tensors.items()})
        transaction.expire(key, self._ttl_seconds)
        try:
            transaction.execute()
        except REDIS_UNREACHABLE as error:
            logger.warning("hidden-state cache unreachable, not caching: %s", error)

    def _derived_key(self, weights_digest: str, token_ids: Sequence[int], name: str) -> str:
        if not _DERIVED_NAME.fullmatch(name):
            raise ValueError(f"not a derived entry name: {name!r}")
        return f"{self.key(self._tenant, weights_digest, token_ids)}:{name}"

    def _get(self, key: str) -> torch.Tensor | None:
        return self._read(key, self._redis.get, lambda blob: decode_tensor(_blob(blob)))

    def _read(self, key: str, fetch: Callable[[str], object], decode: Callable[[object], Decoded]) -> Decoded | None:
        try:
            raw = fetch(key)
        except REDIS_UNREACHABLE as error:
            # The cache only saves work: unreachable, it is a miss, not a failed explanation.
            logger.warning("hidden-state cache unreachable, computing without it: %s", error)
            return None
        if raw is None or raw == {}:  # GET and HGETALL of a missing key
            return None
        try:
            return decode(raw)
        except CorruptEntryError as error:
            logger.warning("deleting corrupt hidden-state cache entry %s: %s", key, error)
            self._redis.delete(key)
            return None

    def put(
        self,
        weights_digest: str,
        token_ids: Sequence[int],
        hidden_states: torch.Tensor,
        image_digests: Sequence[str] = (),
    ) -> bool:
        """Store hidden states (cast to bfloat16); False when the entry is too large for Redis or Redis is
        unreachable."""
        blob = encode_tensor(hidden_states.to(STORAGE_DTYPE))
        if len(blob) > MAX_ENTRY_BYTES:
            logger.warning("not caching %d-byte hidden states, above Redis' %d-byte limit", len(blob), MAX_ENTRY_BYTES)
            return False
        return self._set(self.key(self._tenant, weights_digest, token_ids, image_digests), blob)

    def _set(self, key: str, blob: bytes) -> bool:
        try:
            self._redis.set(key, blob, ex=self._ttl_seconds)
        except REDIS_UNREACHABLE as error:
            logger.warning("hidden-state cache unreachable, not caching: %s", error)
            return False
        return True


@dataclass(frozen=True)
class DerivedTensors:
    """What was read out of one sequence's states, kept beside them as hashes of named tensors, so that a hit needs
    no readout again. An entry is computed from the sequence's states alone, so it serves whether the states
    themselves were a hit or a miss."""

    cache: HiddenStateCache
    weights_digest: str
    token_ids: Sequence[int]

    def get(self, name: str) -> dict[str, torch.Tensor] | None:
        return self.cache.get_derived(self.weights_digest, self.token_ids, name)

    def put(self, name: str, tensors: Mapping[str, torch.Tensor]) -> None:
        """Replaces all of an earlier entry's tensors."""
        self.cache.put_derived(self.weights_digest, self.token_ids, name, tensors)


class DerivedEntry:
    """A frozen dataclass of tensors that a DerivedTensors entry keeps, one hash field per dataclass field."""

    def tensors(self) -> dict[str, torch.Tensor]:
        return {field.name: getattr(self, field.name) for field in fields(self)}  # type: ignore[arg-type]

    @classmethod
    def with_fields(cls, tensors: Mapping[str, torch.Tensor]) -> Self | None:
        """The instance `tensors()` gave, if these are exactly its fields (shapes unchecked); else None."""
        names = [field.name for field in fields(cls)]  # type: ignore[arg-type]
        if set(tensors) != set(names):
            return None
        return cls(**{name: tensors[name] for name in names})
