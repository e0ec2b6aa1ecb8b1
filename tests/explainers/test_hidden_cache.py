"""The pickle-free tensor codec and the Redis hidden-state cache."""

from __future__ import annotations

import hashlib
import json
import socket
import struct
from collections.abc import Callable

import pytest
import redis
import torch
import xxhash
from redis.backoff import NoBackoff
from redis.retry import Retry

from explainers.hidden_cache import (
    MAGIC,
    STORAGE_DTYPE,
    CorruptEntryError,
    HiddenStateCache,
    decode_tensor,
    encode_tensor,
)

DIGEST = "feedface"
TOKEN_IDS = [5, 1, 60, 2]
TENANT = "acme"


def hidden_states(dtype: torch.dtype = torch.float32) -> torch.Tensor:
    torch.manual_seed(0)
    # Magnitudes from 1e-2 to 1e3 per hidden unit, like a residual stream with outlier dimensions.
    return (torch.randn(3, 4, 8) * torch.logspace(-2, 3, 8)).to(dtype)


def flip_byte(blob: bytes, index: int) -> bytes:
    return blob[:index] + bytes([blob[index] ^ 0xFF]) + blob[index + 1 :]


@pytest.mark.parametrize(
    "dtype", [torch.bfloat16, torch.float16, torch.float32, torch.float64, torch.int32, torch.int64]
)
def test_codec_round_trip_is_bit_exact(dtype: torch.dtype) -> None:
    original = (hidden_states(torch.float64) * (1 if dtype.is_floating_point else 1000)).to(dtype)[:, 1:]  # strided

    decoded = decode_tensor(encode_tensor(original))

    assert decoded.dtype == dtype and decoded.shape == original.shape
    assert torch.equal(decoded.view(torch.uint8), original.contiguous().view(torch.uint8))


def test_codec_layout_is_magic_header_then_little_endian_payload() -> None:
    blob = encode_tensor(torch.tensor([1.0, -2.0], dtype=torch.float32))

    magic, header_length = struct.unpack_from("<4sI", blob)
    assert magic == MAGIC == b"SLT2"
    payload = struct.pack("<2f", 1.0, -2.0)
    # The checksum is xxh3-128 of the JSON [dtype, shape], then the payload: what another reader must compute.
    checksum = xxhash.xxh3_128(b'["float32", [2]]' + payload).hexdigest()
    assert json.loads(blob[8 : 8 + header_length]) == {"dtype": "float32", "shape": [2], "checksum": checksum}
    assert blob[8 + header_length :] == payload


def test_codec_refuses_unsupported_dtypes() -> None:
    with pytest.raises(TypeError, match="complex64"):
        encode_tensor(torch.zeros(2, dtype=torch.complex64))


CORRUPTIONS: dict[str, Callable[[bytes], bytes]] = {
    "flipped payload byte": lambda blob: flip_byte(blob, len(blob) - 3),
    "flipped shape digit": lambda blob: blob.replace(b'"shape": [3, 4, 8]', b'"shape": [4, 3, 8]'),
    "flipped header byte": lambda blob: flip_byte(blob, 10),
    "truncated payload": lambda blob: blob[:-1],
    "truncated prefix": lambda blob: blob[:5],
    "header longer than entry": lambda blob: blob[:4] + struct.pack("<I", len(blob)) + blob[8:],
    "wrong magic": lambda blob: b"PK\x03\x04" + blob[4:],
    "empty": lambda blob: b"",
}


@pytest.mark.parametrize("corrupt", CORRUPTIONS.values(), ids=CORRUPTIONS.keys())
def test_decode_rejects_corrupt_entries(corrupt: Callable[[bytes], bytes]) -> None:
    blob = encode_tensor(hidden_states(STORAGE_DTYPE))
    with pytest.raises(CorruptEntryError):
        decode_tensor(corrupt(blob))


def test_key_is_per_tenant_and_hashes_token_ids_as_little_endian_int32() -> None:
    packed = struct.pack("<4i", *TOKEN_IDS)
    key = HiddenStateCache.key(TENANT, DIGEST, TOKEN_IDS)
    assert key == f"sl:hs:{TENANT}:{DIGEST}:{hashlib.sha256(packed).hexdigest()}"
    assert key != HiddenStateCache.key(TENANT, DIGEST, TOKEN_IDS[:-1])
    assert key != HiddenStateCache.key("globex", DIGEST, TOKEN_IDS)


def test_put_then_get_returns_bfloat16_states_with_a_ttl(redis_client: redis.Redis) -> None:
    cache = HiddenStateCache(redis_client, ttl_seconds=600, tenant=TENANT)
    states = hidden_states()

    assert cache.get(DIGEST, TOKEN_IDS) is None
    assert cache.put(DIGEST, TOKEN_IDS, states)
    cached = cache.get(DIGEST, TOKEN_IDS)

    assert cached is not None and torch.equal(cached, states.to(torch.bfloat16))
    assert 0 < redis_client.ttl(HiddenStateCache.key(TENANT, DIGEST, TOKEN_IDS)) <= 600
    assert cache.get("another-digest", TOKEN_IDS) is None


def test_one_tenants_entries_are_invisible_to_another(redis_client: redis.Redis) -> None:
    owner = HiddenStateCache(redis_client, ttl_seconds=600, tenant=TENANT)
    other = HiddenStateCache(redis_client, ttl_seconds=600, tenant="globex")
    states = hidden_states()
    last_layer = states[-1].float()

    assert owner.put(DIGEST, TOKEN_IDS, states)
    owner.put_last_layer(DIGEST, TOKEN_IDS, last_layer)

    assert other.get(DIGEST, TOKEN_IDS) is None
    assert other.get_last_layer(DIGEST, TOKEN_IDS) is None
    assert owner.get(DIGEST, TOKEN_IDS) is not None
    assert torch.equal(owner.get_last_layer(DIGEST, TOKEN_IDS), last_layer)  # type: ignore[arg-type]
    # Every key the owner wrote is under its tenant's prefix, and the other tenant's miss wrote nothing.
    assert sorted(key.decode().split(":")[2] for key in redis_client.scan_iter("sl:hs:*")) == [TENANT, TENANT]


READOUT = {"logprobs": torch.tensor([-0.5, -2.25], dtype=torch.float64), "ranks": torch.tensor([1, 7])}


def test_a_derived_entry_is_kept_by_name_with_a_ttl_and_replaced_whole(redis_client: redis.Redis) -> None:
    cache = HiddenStateCache(redis_client, ttl_seconds=600, tenant=TENANT)
    other = HiddenStateCache(redis_client, ttl_seconds=600, tenant="globex")
    derived = cache.derived(DIGEST, TOKEN_IDS)

    assert derived.get("readout:2") is None
    derived.put("readout:2", READOUT)
    stored = cache.get_derived(DIGEST, TOKEN_IDS, "readout:2")

    assert stored is not None and stored.keys() == READOUT.keys()
    for name, tensor in READOUT.items():
        assert stored[name].dtype == tensor.dtype and torch.equal(stored[name], tensor)
    key = HiddenStateCache.key(TENANT, DIGEST, TOKEN_IDS) + ":readout:2"
    assert 0 < redis_client.ttl(key) <= 600
    assert derived.get("readout:1") is None  # another split
    assert derived.get("logit_lens") is None  # another name
    assert cache.derived(DIGEST, TOKEN_IDS[:-1]).get("readout:2") is None  # another sequence
    assert other.derived(DIGEST, TOKEN_IDS).get("readout:2") is None  # another tenant

    # A later entry replaces every tensor of the earlier one, not only those it shares names with.
    derived.put("readout:2", {"ranks": torch.tensor([2, 3])})
    assert list(derived.get("readout:2") or {}) == ["ranks"]


@pytest.mark.parametrize("name", ["", "readout:", "Readout", "a:b:1", "lens*", "x" * 33, "readout:1234567890"])
def test_a_derived_entry_name_that_could_break_a_key_apart_is_refused(redis_client: redis.Redis, name: str) -> None:
    derived = HiddenStateCache(redis_client, ttl_seconds=600, tenant=TENANT).derived(DIGEST, TOKEN_IDS)
    with pytest.raises(ValueError, match="not a derived entry name"):
        derived.put(name, READOUT)
    with pytest.raises(ValueError, match="not a derived entry name"):
        derived.get(name)


def test_a_corrupt_derived_entry_is_a_miss_and_is_deleted(redis_client: redis.Redis) -> None:
    derived = HiddenStateCache(redis_client, ttl_seconds=600, tenant=TENANT).derived(DIGEST, TOKEN_IDS)
    derived.put("readout:2", READOUT)
    key = HiddenStateCache.key(TENANT, DIGEST, TOKEN_IDS) + ":readout:2"
    redis_client.hset(key, "ranks", encode_tensor(READOUT["ranks"])[:-1])

    assert derived.get("readout:2") is None
    assert redis_client.exists(key) == 0


def test_tenant_names_that_could_break_a_key_apart_are_refused(redis_client: redis.Redis) -> None:
    for tenant in ("", "a:b", "a*", "x" * 65):
        with pytest.raises(ValueError, match="not a tenant name"):
            HiddenStateCache(redis_client, ttl_seconds=600, tenant=tenant)


@pytest.mark.parametrize("corrupt", CORRUPTIONS.values(), ids=CORRUPTIONS.keys())
def test_a_corrupt_entry_is_a_miss_and_is_deleted(redis_client: redis.Redis, corrupt: Callable[[bytes], bytes]) -> None:
    cache = HiddenStateCache(redis_client, ttl_seconds=600, tenant=TENANT)
    key = HiddenStateCache.key(TENANT, DIGEST, TOKEN_IDS)
    redis_client.set(key, corrupt(encode_tensor(hidden_states(STORAGE_DTYPE))))

    assert cache.get(DIGEST, TOKEN_IDS) is None
    assert redis_client.exists(key) == 0


def test_an_unreachable_redis_is_a_miss_and_a_skipped_write() -> None:
    # A real client on a port nothing listens on: every command fails to connect, as while Redis restarts.
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        closed_port = probe.getsockname()[1]
    unreachable = redis.Redis(port=closed_port, socket_connect_timeout=1, retry=Retry(NoBackoff(), 0))
    cache = HiddenStateCache(unreachable, ttl_seconds=600, tenant="acme")

    assert cache.get(DIGEST, TOKEN_IDS) is None
    assert cache.put(DIGEST, TOKEN_IDS, hidden_states()) is False
    cache.put_last_layer(DIGEST, TOKEN_IDS, torch.zeros(3, 4))
    assert cache.get_last_layer(DIGEST, TOKEN_IDS) is None
    cache.derived(DIGEST, TOKEN_IDS).put("readout:2", READOUT)
    assert cache.derived(DIGEST, TOKEN_IDS).get("readout:2") is None
