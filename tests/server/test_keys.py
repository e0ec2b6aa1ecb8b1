"""The API key file, its env form, the mint command, and the authenticator that checks presented keys."""

from __future__ import annotations

import hashlib
import hmac
import io
import json
import logging
import re
from pathlib import Path
from types import SimpleNamespace

import grpc
import pytest

from server import auth, keys
from server.auth import INVALID_KEY, MISSING_KEY, NOT_BEARER, Authenticator
from server.errors import ConfigError, GatewayError
from server.keys import KeyFile, KeyFileError, configured_keys, hash_key, keys_from_env, load_key_file
from server.limits import TenantLimits

DEFAULTS = TenantLimits(requests_per_minute=100, max_tokens=512)
ACME_KEY = "sl_acme-test-key"
GLOBEX_KEY = "sl_globex-test-key"
KEY_FILE = {
    "keys": [
        {"id": "acme-ci", "tenant": "acme", "sha256": hashlib.sha256(ACME_KEY.encode()).hexdigest()},
        {"id": "globex-1", "tenant": "globex", "sha256": hashlib.sha256(GLOBEX_KEY.encode()).hexdigest()},
    ],
    "tenants": {"acme": {"requests_per_minute": 5, "max_explanation_cost": 1e6}},
}
KEY_FILE_TOML = f"""
[[keys]]
id = "acme-ci"
tenant = "acme"
sha256 = "{hashlib.sha256(ACME_KEY.encode()).hexdigest()}"

[[keys]]
id = "globex-1"
tenant = "globex"
sha256 = "{hashlib.sha256(GLOBEX_KEY.encode()).hexdigest()}"

[tenants.acme]
requests_per_minute = 5
max_explanation_cost = 1e6
"""


def write_json(tmp_path: Path, document: object) -> Path:
    path = tmp_path / "keys.json"
    path.write_text(json.dumps(document))
    return path


def test_json_and_toml_key_files_read_the_same(tmp_path: Path) -> None:
    from_json = load_key_file(write_json(tmp_path, KEY_FILE), DEFAULTS)
    toml_path = tmp_path / "keys.toml"
    toml_path.write_text(KEY_FILE_TOML)
    from_toml = load_key_file(toml_path, DEFAULTS)

    assert from_json.keys == from_toml.keys
    assert [(k.key_id, k.tenant, k.sha256) for k in from_json.keys] == [
        ("acme-ci", "acme", hash_key(ACME_KEY)),
        ("globex-1", "globex", hash_key(GLOBEX_KEY)),
    ]
    assert from_json.tenants == ["acme", "globex"]
    # Overrides replace the defaults they name and keep the others; a tenant without overrides gets the defaults.
    assert from_toml.limits_for("acme", DEFAULTS) == TenantLimits(
        requests_per_minute=5, max_tokens=512, max_explanation_cost=1e6
    )
    assert from_json.limits_for("globex", DEFAULTS) == DEFAULTS


def entry(**fields: object) -> dict[str, object]:
    return {"id": "k1", "tenant": "acme", "sha256": "ab" * 32, **fields}


@pytest.mark.parametrize(
    ("document", "message"),
    [
        ({"keys": []}, "'keys' must be a non-empty list"),
        ({"keys": [entry()], "extra": 1}, "expected an object with a 'keys' list"),
        ({"keys": [entry(key="sl_plain")]}, r"keys\[0\] holds a key in clear; store its sha256"),
        ({"keys": [entry(sha265="ab" * 32)]}, "exactly the fields id, tenant and sha256"),
        ({"keys": [entry(sha256="AB" * 32)]}, "sha256 must be 64 lowercase hex digits"),
        ({"keys": [entry(role="admin")]}, "role must be one of tenant, operator; got 'admin'"),
        ({"keys": [entry(sha256="ab" * 31)]}, "sha256 must be 64 lowercase hex digits"),
        ({"keys": [entry(tenant="a:b")]}, "tenant must be 1-64 letters"),
        ({"keys": [entry(tenant="")]}, "tenant must be 1-64 letters"),
        ({"keys": [entry(id="has space")]}, "id must be 1-64 letters"),
        ({"keys": [entry(), entry(sha256="cd" * 32)]}, "key id 'k1' appears twice"),
        ({"keys": [entry(), entry(id="k2")]}, r"the same key \(sha256\)"),
        ({"keys": [entry()], "tenants": {"acm": {"max_tokens": 5}}}, r"sets limits for \['acm'\], which have no key"),
        ({"keys": [entry()], "tenants": {"acme": {"max_token": 5}}}, "unknown limit 'max_token'"),
        ({"keys": [entry()], "tenants": {"acme": {"max_tokens": -1}}}, "must be a number >= 0"),
        ({"keys": [entry()], "tenants": {"acme": {"max_tokens": 2.5}}}, "must be a whole number"),
        ({"keys": [entry()], "tenants": {"acme": {"max_tokens": True}}}, "must be a number"),
        ({"keys": [entry()], "tenants": {"acme": 5}}, "'tenants' must map tenant names to tables"),
    ],
)
def test_a_bad_key_file_is_refused_naming_the_problem(tmp_path: Path, document: object, message: str) -> None:
    path = write_json(tmp_path, document)
    with pytest.raises(ConfigError, match=message) as caught:
        load_key_file(path, DEFAULTS)
    assert str(path) in str(caught.value)


def test_a_key_may_carry_the_operator_role(tmp_path: Path) -> None:
    path = write_json(tmp_path, {"keys": [entry(), entry(id="ops", sha256="cd" * 32, role="operator")]})
    keys = load_key_file(path, DEFAULTS).keys
    assert [(k.key_id, k.role, k.operator) for k in keys] == [("k1", "tenant", False), ("ops", "operator", True)]


def test_unreadable_or_unparsable_files_are_refused(tmp_path: Path) -> None:
    with pytest.raises(KeyFileError, match="cannot read the API key file"):
        load_key_file(tmp_path / "missing.json", DEFAULTS)
    (tmp_path / "keys.yaml").write_text("keys: []")
    with pytest.raises(KeyFileError, match=r"must be \.json or \.toml"):
        load_key_file(tmp_path / "keys.yaml", DEFAULTS)
    (tmp_path / "keys.json").write_text("{not json")
    with pytest.raises(KeyFileError, match="is not valid JSON"):
        load_key_file(tmp_path / "keys.json", DEFAULTS)


def test_env_form_holds_tenant_and_sha256_pairs() -> None:
    digest = hash_key(ACME_KEY).hex()
    ring = keys_from_env(f"acme:{digest}, globex:{hash_key(GLOBEX_KEY).hex()}", DEFAULTS)
    assert [(k.key_id, k.tenant) for k in ring.keys] == [("env-1", "acme"), ("env-2", "globex")]
    assert ring.limits_for("acme", DEFAULTS) == DEFAULTS
    with pytest.raises(KeyFileError, match="entry 1 must be tenant:sha256"):
        keys_from_env(digest, DEFAULTS)
    with pytest.raises(KeyFileError, match="SIGHTLINE_API_KEYS: keys\\[0\\]: sha256 must be"):
        keys_from_env(f"acme:{ACME_KEY}", DEFAULTS)


def test_configured_keys_are_none_without_keys_and_refuse_both_forms(tmp_path: Path) -> None:
    assert configured_keys(None, None, DEFAULTS) is None
    with pytest.raises(KeyFileError, match="not both"):
        configured_keys(str(write_json(tmp_path, KEY_FILE)), f"acme:{'ab' * 32}", DEFAULTS)


def test_mint_prints_a_fresh_key_once_and_the_entry_that_accepts_it(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert keys.main(["new", "--tenant", "acme", "--id", "acme-laptop"]) == 0
    printed = capsys.readouterr().out
    key = re.search(r"^  (sl_\S+)$", printed, re.MULTILINE)
    listed = re.search(r"^  (\{.*\})$", printed, re.MULTILINE)
    assert key and listed
    minted = key.group(1)
    assert len(minted) >= len("sl_") + 43  # 32 random bytes, base64url
    document = json.loads(listed.group(1))
    assert document == {"id": "acme-laptop", "tenant": "acme", "sha256": hashlib.sha256(minted.encode()).hexdigest()}
    assert printed.count(minted) == 1

    ring = load_key_file(write_json(tmp_path, {"keys": [document]}), DEFAULTS)
    tenant = Authenticator(ring, DEFAULTS, open_tenant="default").authenticate([("authorization", f"Bearer {minted}")])
    assert tenant.name == "acme"

    assert keys.main(["new", "--tenant", "acme"]) == 0
    assert minted not in capsys.readouterr().out


def test_hash_prints_the_sha256_of_a_key_from_stdin(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr("sys.stdin", io.StringIO(ACME_KEY + "\n"))
    assert keys.main(["hash"]) == 0
    assert capsys.readouterr().out.strip() == hashlib.sha256(ACME_KEY.encode()).hexdigest()


@pytest.fixture
def authenticator(tmp_path: Path) -> Authenticator:
    return Authenticator(load_key_file(write_json(tmp_path, KEY_FILE), DEFAULTS), DEFAULTS, open_tenant="default")


def unauthenticated(authenticator: Authenticator, metadata: list[tuple[str, str | bytes]]) -> str:
    with pytest.raises(GatewayError) as caught:
        authenticator.authenticate(metadata)
    assert caught.value.code == grpc.StatusCode.UNAUTHENTICATED
    return caught.value.message


def test_a_good_key_resolves_its_tenant_with_its_limits(authenticator: Authenticator) -> None:
    acme = authenticator.authenticate([("x-other", "1"), ("authorization", f"Bearer {ACME_KEY}")])
    assert (acme.name, acme.limits.requests_per_minute, acme.limits.max_tokens) == ("acme", 5, 512)
    assert authenticator.authenticate([("authorization", f"bearer  {GLOBEX_KEY}")]).name == "globex"


def test_missing_malformed_and_unknown_keys_are_told_apart_without_naming_any_key(
    authenticator: Authenticator,
) -> None:
    assert unauthenticated(authenticator, []) == MISSING_KEY
    assert unauthenticated(authenticator, [("authorization", ACME_KEY)]) == NOT_BEARER
    assert unauthenticated(authenticator, [("authorization", f"Basic {ACME_KEY}")]) == NOT_BEARER
    assert unauthenticated(authenticator, [("authorization", "Bearer sl_guess")]) == INVALID_KEY
    assert unauthenticated(authenticator, [("authorization", f"Bearer {ACME_KEY}x")]) == INVALID_KEY
    assert unauthenticated(authenticator, [("authorization", "Bearer ")]) == INVALID_KEY
    for message in (MISSING_KEY, NOT_BEARER, INVALID_KEY):
        assert not {"acme", "globex", "acme-ci", "globex-1"} & set(re.findall(r"[\w-]+", message))


def test_every_key_is_compared_in_constant_time_even_after_a_match(
    authenticator: Authenticator, monkeypatch: pytest.MonkeyPatch
) -> None:
    compared: list[tuple[bytes, bytes]] = []
    constant_time_compare = hmac.compare_digest

    def counting_compare(a: bytes, b: bytes) -> bool:
        compared.append((a, b))
        return constant_time_compare(a, b)

    monkeypatch.setattr(auth, "hmac", SimpleNamespace(compare_digest=counting_compare))
    authenticator.authenticate([("authorization", f"Bearer {ACME_KEY}")])  # the first entry matches
    assert [b for _, b in compared] == [hash_key(ACME_KEY), hash_key(GLOBEX_KEY)]
    assert all(a == hash_key(ACME_KEY) for a, _ in compared)  # the presented key's digest, never the key


def test_without_keys_every_call_is_the_open_tenant() -> None:
    open_auth = Authenticator(None, DEFAULTS, open_tenant="default")
    assert not open_auth.enabled
    for metadata in ([], [("authorization", "Bearer anything")]):
        tenant = open_auth.authenticate(metadata)
        assert (tenant.name, tenant.limits) == ("default", DEFAULTS)


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_a_changed_key_file_applies_to_the_next_call_and_a_broken_one_keeps_the_keys_in_force(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="server.keys")
    path = write_json(tmp_path, KEY_FILE)
    clock = Clock()
    authenticator = Authenticator(KeyFile(path, DEFAULTS, clock=clock), DEFAULTS, open_tenant="default")
    acme: list[tuple[str, str | bytes]] = [("authorization", f"Bearer {ACME_KEY}")]
    initech: list[tuple[str, str | bytes]] = [("authorization", "Bearer sl_initech-key")]
    assert authenticator.authenticate(acme).name == "acme"

    # acme's key revoked, a key for a new tenant with its own limits: applied at the next look at the file.
    globex = {"id": "globex-1", "tenant": "globex", "sha256": hash_key(GLOBEX_KEY).hex()}
    rotated = {
        "keys": [globex, {"id": "initech-1", "tenant": "initech", "sha256": hash_key("sl_initech-key").hex()}],
        "tenants": {"initech": {"requests_per_minute": 7}},
    }
    path.write_text(json.dumps(rotated))
    assert authenticator.authenticate(acme).name == "acme"  # within the recheck interval: not looked at yet
    clock.now += 1.0
    assert unauthenticated(authenticator, acme) == INVALID_KEY
    tenant = authenticator.authenticate(initech)
    assert (tenant.name, tenant.limits.requests_per_minute) == ("initech", 7)
    assert "reloaded 2 API keys of 2 tenants" in caplog.text

    # An edit that does not load (bad JSON, a bad limit, the file gone) keeps the keys in force, saying why.
    for broken in ('{"keys": [', json.dumps({**rotated, "tenants": {"initech": {"requests_per_minut": 1}}}), None):
        caplog.clear()
        if broken is None:
            path.unlink()
        else:
            path.write_text(broken)
        clock.now += 1.0
        assert authenticator.authenticate(initech).name == "initech"
        assert unauthenticated(authenticator, acme) == INVALID_KEY
        assert "the API key file changed but cannot be used; the keys loaded before stay in force" in caplog.text

    write_json(tmp_path, KEY_FILE)
    clock.now += 1.0
    assert authenticator.authenticate(acme).name == "acme"
    assert unauthenticated(authenticator, initech) == INVALID_KEY
