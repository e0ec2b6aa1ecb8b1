"""Authentication: which tenant a call acts for, from its ``authorization: Bearer <key>`` metadata."""

from __future__ import annotations

import hmac
from collections.abc import Iterable

import grpc

from server.errors import GatewayError
from server.keys import ApiKey, KeyRing, KeySource, hash_key
from server.limits import Tenant, TenantLimits

BEARER = "bearer "
MISSING_KEY = (
    "this gateway needs an API key: send the metadata 'authorization: Bearer <key>' "
    "(SDK: Client(api_key=...); CLI: --api-key or SIGHTLINE_API_KEY); ask the operator for a key"
)
NOT_BEARER = "the authorization metadata must be 'Bearer <key>'"
INVALID_KEY = "the API key is not valid: check that it was copied whole, or ask the operator whether it was revoked"


def unauthenticated(message: str) -> GatewayError:
    return GatewayError(grpc.StatusCode.UNAUTHENTICATED, message)


class Authenticator:
    """Resolves each call's tenant from the keys in force (a KeyFile's change out from under a running gateway
    applies to the next call). Without keys, authentication is off and every call is ``open_tenant``."""

    def __init__(self, keys: KeySource | None, default_limits: TenantLimits, *, open_tenant: str) -> None:
        self._keys = keys
        self._default_limits = default_limits
        self._open = Tenant(open_tenant, default_limits)
        self._indexed: KeyRing | None = None
        self._tenants: dict[str, Tenant] = {}
        self._digests: list[tuple[bytes, ApiKey]] = []
        if keys is not None:
            self._index(keys.current())

    def _index(self, key_ring: KeyRing) -> None:
        self._tenants = {
            name: Tenant(name, key_ring.limits_for(name, self._default_limits)) for name in key_ring.tenants
        }
        self._digests = [(key.sha256, key) for key in key_ring.keys]
        self._indexed = key_ring

    @property
    def enabled(self) -> bool:
        return self._keys is not None

    def authenticate(self, metadata: Iterable[tuple[str, str | bytes]]) -> Tenant:
        """The caller's tenant; UNAUTHENTICATED when auth is on and the key is missing or unknown."""
        key = self.api_key(metadata)
        return self._open if key is None else self._tenants[key.tenant]

    def api_key(self, metadata: Iterable[tuple[str, str | bytes]]) -> ApiKey | None:
        """The caller's key (None while authentication is off); UNAUTHENTICATED when it is missing or unknown."""
        if self._keys is None:
            return None
        key_ring = self._keys.current()
        if key_ring is not self._indexed:
            self._index(key_ring)
        values = [value for name, value in metadata if name == "authorization"]
        if not values:
            raise unauthenticated(MISSING_KEY)
        value = values[0]
        if not isinstance(value, str) or not value[: len(BEARER)].lower() == BEARER:
            raise unauthenticated(NOT_BEARER)
        key = self._key_of(value[len(BEARER) :].strip())
        if key is None:
            raise unauthenticated(INVALID_KEY)
        return key

    def _key_of(self, key: str) -> ApiKey | None:
        # Hashing first makes every comparison the same length whatever was sent; comparing against
        # every entry, in constant time and without stopping at a match, keeps the time it takes
        # independent of which key (if any) matched.
        presented = hash_key(key)
        found: ApiKey | None = None
        for digest, api_key in self._digests:
            if hmac.compare_digest(presented, digest):
                found = api_key
        return found
