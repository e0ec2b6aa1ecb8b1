"""Spread generation over several vLLM replicas: least outstanding requests, health, failover.

``SIGHTLINE_VLLM_URL`` names the replicas, as one URL, a comma-separated list, or a headless Service
(``dns+http://vllm-headless.sightline.svc:8000``) whose name is resolved to one replica per address on
every health round, so replicas that Kubernetes adds or removes join or leave the pool by themselves.

Routing: each call goes to the healthy replica with the fewest calls outstanding from this gateway
(ties rotate), which follows what each replica actually has queued better than round-robin when
generations differ in length. A replica leaves the pool when its ``/health`` probe fails
(``DependencyMonitor`` probes every ``SIGHTLINE_HEALTH_INTERVAL_SECONDS``) or at once when a call on it
fails UNAVAILABLE (refused, reset, HTTP 5xx, silent too long); it rejoins when a probe succeeds again.

What happens to calls when a replica dies:

* a call that has delivered nothing to its caller yet (every unary call, a tokenization, a stream before
  its first chunk) is retried on another healthy replica it has not tried, within its own deadline; the
  caller sees only the extra latency;
* a stream that has already sent tokens to its caller cannot resume elsewhere (another replica would
  sample different tokens), so it fails UNAVAILABLE saying how much was sent and that the call may be
  retried;
* a call that has tried every healthy replica fails UNAVAILABLE with the last replica's error. When no replica
  is healthy, a call tries each of them anyway (the marks may be stale; one that is down refuses at once), so a
  single-replica gateway behaves as a plain client of that replica.

A replica that stops answering without closing its connections (a lost node rather than a killed process)
fails its calls only at the silence timeout; the health probe has taken it out of routing for new calls
long before then.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import itertools
import logging
import socket
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar
from urllib.parse import urlsplit

import grpc

from server.errors import ConfigError, GatewayError, deadline_exceeded, unavailable
from server.vllm_client import SILENCE_TIMEOUT_SECONDS, CompletionChunk, Prompt, Sampling, ServedModel, VLLMClient

log = logging.getLogger(__name__)

# A replica URL of this scheme names a headless Service: one replica per address its host resolves to.
DNS_SCHEME_PREFIX = "dns+"

Resolver = Callable[[str, int], Awaitable[list[str]]]
Result = TypeVar("Result")


@dataclass(eq=False)
class Replica:
    """One vLLM server and what this gateway knows of it."""

    client: VLLMClient
    healthy: bool = True
    # Calls from this gateway in flight on it: the routing signal.
    outstanding: int = 0
    # Why it is out of the pool, for logs and error messages.
    failure: str = ""

    @property
    def url(self) -> str:
        return self.client.base_url


@dataclass(frozen=True)
class ReplicaSource:
    """Where the replicas come from: fixed URLs, or a DNS name resolved each health round."""

    urls: tuple[str, ...] = ()
    dns_scheme: str = ""
    dns_host: str = ""
    dns_port: int = 0

    @classmethod
    def parse(cls, spec: str) -> ReplicaSource:
        entries = [entry.strip().rstrip("/") for entry in spec.split(",") if entry.strip()]
        if not entries:
            raise ConfigError("SIGHTLINE_VLLM_URL is empty; name one vLLM URL, a comma-separated list, or dns+http://")
        dns_entries = [entry for entry in entries if entry.startswith(DNS_SCHEME_PREFIX)]
        if dns_entries:
            if len(entries) != 1:
                raise ConfigError(
                    f"SIGHTLINE_VLLM_URL mixes a dns+ name with other URLs ({spec[:120]!r}); give one dns+http:// "
                    "name of a headless Service, or a list of plain URLs"
                )
            parts = urlsplit(entries[0][len(DNS_SCHEME_PREFIX) :])
            if parts.scheme not in ("http", "https") or not parts.hostname or parts.path not in ("", "/"):
                raise ConfigError(
                    f"SIGHTLINE_VLLM_URL {entries[0][:120]!r} is not dns+http://HOST:PORT (a headless Service)"
                )
            port = parts.port or (443 if parts.scheme == "https" else 80)
            return cls(dns_scheme=parts.scheme, dns_host=parts.hostname, dns_port=port)
        for entry in entries:
            parts = urlsplit(entry)
            if parts.scheme not in ("http", "https") or not parts.hostname:
                raise ConfigError(f"SIGHTLINE_VLLM_URL entry {entry[:120]!r} is not an http:// or https:// URL")
        if len(set(entries)) != len(entries):
            raise ConfigError(f"SIGHTLINE_VLLM_URL names a replica twice ({spec[:120]!r})")
        return cls(urls=tuple(entries))

    @property
    def described(self) -> str:
        if self.urls:
            return ",".join(self.urls)
        return f"{DNS_SCHEME_PREFIX}{self.dns_scheme}://{self.dns_host}:{self.dns_port}"

    def url_of(self, address: str) -> str:
        host = f"[{address}]" if ipaddress.ip_address(address).version == 6 else address
        return f"{self.dns_scheme}://{host}:{self.dns_port}"


async def resolve_addresses(host: str, port: int) -> list[str]:
    """Every address ``host`` resolves to (a headless Service resolves to one per ready pod)."""
    infos = await asyncio.get_running_loop().getaddrinfo(host, port, type=socket.SOCK_STREAM)
    return sorted({str(info[4][0]) for info in infos})


class VLLMPool:
    """The gateway's view of every vLLM replica; the same calls as :class:`VLLMClient`, routed and retried.

    Create it inside the event loop that will use it.
    """

    def __init__(
        self,
        spec: str,
        *,
        silence_timeout: float = SILENCE_TIMEOUT_SECONDS,
        resolve: Resolver = resolve_addresses,
    ) -> None:
        self.source = ReplicaSource.parse(spec)
        self._silence_timeout = silence_timeout
        self._resolve = resolve
        self._replicas: dict[str, Replica] = {url: self._new_replica(url) for url in self.source.urls}
        # Replicas whose address left the DNS answer, closed once their last call is done.
        self._retired: list[Replica] = []
        self._turn = itertools.count()

    @property
    def base_url(self) -> str:
        """The replicas as configured, for messages."""
        return self.source.described

    @property
    def replicas(self) -> list[Replica]:
        return list(self._replicas.values())

    def _new_replica(self, url: str) -> Replica:
        return Replica(VLLMClient(url, silence_timeout=self._silence_timeout))

    async def aclose(self) -> None:
        for replica in [*self._replicas.values(), *self._retired]:
            await replica.client.aclose()
        self._replicas.clear()
        self._retired.clear()

    async def healthy(self) -> bool:
        """Probe every replica (re-resolving a DNS name first); True when at least one can take calls."""
        if not self.source.urls:
            await self._refresh_addresses()
        replicas = self.replicas
        results = await asyncio.gather(*(replica.client.healthy() for replica in replicas))
        for replica, ok in zip(replicas, results, strict=True):
            if ok and not replica.healthy:
                log.info("vLLM replica %s is healthy again; routing to it", replica.url)
            elif not ok and replica.healthy:
                log.warning("vLLM replica %s failed its /health probe; taken out of routing", replica.url)
            replica.healthy = ok
            replica.failure = "" if ok else "its /health probe failed"
        await self._close_retired()
        return any(results)

    async def _refresh_addresses(self) -> None:
        try:
            addresses = await self._resolve(self.source.dns_host, self.source.dns_port)
        except OSError as exc:
            # Keep routing to the replicas already known: a DNS blip must not empty the pool.
            log.warning(
                "cannot resolve vLLM replicas of %s (%s); keeping the %d known", self.base_url, exc, len(self._replicas)
            )
            return
        wanted = {self.source.url_of(address) for address in addresses}
        for url in wanted - self._replicas.keys():
            log.info("vLLM replica %s joined (%s)", url, self.base_url)
            self._replicas[url] = self._new_replica(url)
        for url in self._replicas.keys() - wanted:
            log.info("vLLM replica %s left (%s)", url, self.base_url)
            self._retired.append(self._replicas.pop(url))

    async def _close_retired(self) -> None:
        done = [replica for replica in self._retired if replica.outstanding == 0]
        self._retired = [replica for replica in self._retired if replica.outstanding > 0]
        for replica in done:
            await replica.client.aclose()

    def any_healthy(self) -> bool:
        return any(replica.healthy for replica in self._replicas.values())

    def pick(self, tried: Sequence[Replica] = (), *, unhealthy_too: bool = False) -> Replica | None:
        """The healthy replica not in ``tried`` with the fewest outstanding calls; None if there is none.

        ``unhealthy_too`` (when no replica is healthy) picks among all: the marks may be stale, and a replica
        that is really down refuses at once, with the error saying why.
        """
        candidates = [
            replica
            for replica in self._replicas.values()
            if (replica.healthy or unhealthy_too) and replica not in tried
        ]
        if not candidates:
            return None
        # Rotating where ties start spreads an idle pool's calls evenly instead of always picking the first.
        start = next(self._turn) % len(candidates)
        rotated = candidates[start:] + candidates[:start]
        return min(rotated, key=lambda replica: replica.outstanding)

    def _eject(self, replica: Replica, error: GatewayError) -> None:
        if replica.healthy:
            log.warning(
                "vLLM replica %s failed a call (%s); taken out of routing until /health passes",
                replica.url,
                error.message,
            )
        replica.healthy = False
        replica.failure = error.message

    def _no_replica(self, tried: Sequence[Replica], last_error: GatewayError | None) -> GatewayError:
        if last_error is not None:
            if len(self._replicas) == 1:
                return last_error
            return unavailable(f"{last_error.message} (tried {len(tried)} of {len(self._replicas)} vLLM replicas)")
        return unavailable(f"no vLLM replica resolved from {self.base_url}; retry in a few seconds")

    async def _with_failover(
        self, call: Callable[[VLLMClient, float | None], Awaitable[Result]], timeout: float | None
    ) -> Result:
        """Run ``call`` on the best replica; on UNAVAILABLE, again on the next, until one answers or none is left."""
        deadline = None if timeout is None else time.monotonic() + timeout
        tried: list[Replica] = []
        last_error: GatewayError | None = None
        unhealthy_too = not self.any_healthy()
        while (replica := self.pick(tried, unhealthy_too=unhealthy_too)) is not None:
            tried.append(replica)
            replica.outstanding += 1
            try:
                return await call(replica.client, _remaining(deadline))
            except GatewayError as exc:
                if exc.code != grpc.StatusCode.UNAVAILABLE:
                    raise
                self._eject(replica, exc)
                last_error = exc
            finally:
                replica.outstanding -= 1
        raise self._no_replica(tried, last_error)

    async def served_model(self) -> ServedModel:
        return await self._with_failover(lambda client, _: client.served_model(), None)

    async def tokenize_chat(self, model: str, messages: Sequence[dict[str, Any]], timeout: float | None) -> list[int]:
        return await self._with_failover(lambda client, left: client.tokenize_chat(model, messages, left), timeout)

    async def tokenize_text(self, model: str, text: str, timeout: float | None) -> list[int]:
        return await self._with_failover(lambda client, left: client.tokenize_text(model, text, left), timeout)

    async def detokenize(self, model: str, token_ids: Sequence[int], timeout: float | None) -> str:
        return await self._with_failover(lambda client, left: client.detokenize(model, token_ids, left), timeout)

    async def chat_complete(
        self, model: str, messages: Sequence[dict[str, Any]], sampling: Sampling, timeout: float | None
    ) -> CompletionChunk:
        return await self._with_failover(
            lambda client, left: client.chat_complete(model, messages, sampling, left), timeout
        )

    async def complete(self, model: str, prompt: Prompt, sampling: Sampling, timeout: float | None) -> CompletionChunk:
        # A unary completion delivers nothing until it is done, so one that failed is retried whole.
        return await self._with_failover(lambda client, left: client.complete(model, prompt, sampling, left), timeout)

    def complete_stream(
        self, model: str, prompt: Prompt, sampling: Sampling, timeout: float | None
    ) -> AsyncIterator[CompletionChunk]:
        return self._stream_with_failover(
            lambda client, left: client.complete_stream(model, prompt, sampling, left), timeout
        )

    def chat_complete_stream(
        self, model: str, messages: Sequence[dict[str, Any]], sampling: Sampling, timeout: float | None
    ) -> AsyncIterator[CompletionChunk]:
        return self._stream_with_failover(
            lambda client, left: client.chat_complete_stream(model, messages, sampling, left), timeout
        )

    async def _stream_with_failover(
        self, open_stream: Callable[[VLLMClient, float | None], AsyncIterator[CompletionChunk]], timeout: float | None
    ) -> AsyncIterator[CompletionChunk]:
        """Stream from the best replica; fail over only while nothing has been yielded to the caller."""
        deadline = None if timeout is None else time.monotonic() + timeout
        tried: list[Replica] = []
        last_error: GatewayError | None = None
        unhealthy_too = not self.any_healthy()
        while (replica := self.pick(tried, unhealthy_too=unhealthy_too)) is not None:
            tried.append(replica)
            replica.outstanding += 1
            stream = open_stream(replica.client, _remaining(deadline))
            chunks_sent = 0
            tokens_sent = 0
            try:
                async for chunk in stream:
                    chunks_sent += 1
                    tokens_sent += len(chunk.token_ids)
                    yield chunk
                return
            except GatewayError as exc:
                if exc.code != grpc.StatusCode.UNAVAILABLE:
                    raise
                self._eject(replica, exc)
                if chunks_sent:
                    raise unavailable(
                        f"{exc.message}; the stream had sent {tokens_sent} tokens and cannot resume on another "
                        "replica (it would sample different ones): retry the whole call"
                    ) from exc
                last_error = exc
            finally:
                replica.outstanding -= 1
                with contextlib.suppress(GatewayError):
                    await stream.aclose()  # type: ignore[attr-defined]
        raise self._no_replica(tried, last_error)


def _remaining(deadline: float | None) -> float | None:
    if deadline is None:
        return None
    left = deadline - time.monotonic()
    if left <= 0:
        raise deadline_exceeded("the call's deadline passed while its generation was moved to another vLLM replica")
    return left
