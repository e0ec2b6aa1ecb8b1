"""TLS settings of a client's channel: which servers to trust and, for mutual TLS, the client's certificate."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import grpc


@dataclass(frozen=True)
class TLS:
    """Connect over TLS.

    ``root_certificates`` are the PEM CA certificates that may sign the server's certificate
    (None: the system's trust store). ``client_certificate`` and ``client_key`` are the PEM
    certificate chain and private key this client presents to a server that requires mutual TLS.
    ``server_name`` checks the server's certificate against this name instead of the target's
    host, e.g. when connecting by IP address to a certificate issued for a DNS name.
    """

    root_certificates: bytes | None = None
    client_certificate: bytes | None = field(default=None, repr=False)
    client_key: bytes | None = field(default=None, repr=False)
    server_name: str | None = None

    def __post_init__(self) -> None:
        if (self.client_certificate is None) != (self.client_key is None):
            raise ValueError("mutual TLS needs both client_certificate and client_key")

    @classmethod
    def from_files(
        cls,
        ca: str | Path | None = None,
        cert: str | Path | None = None,
        key: str | Path | None = None,
        server_name: str | None = None,
    ) -> TLS:
        """Read the PEM files: ``ca`` to verify the server, ``cert`` and ``key`` to identify this client."""
        return cls(
            root_certificates=_read(ca),
            client_certificate=_read(cert),
            client_key=_read(key),
            server_name=server_name,
        )

    def credentials(self) -> grpc.ChannelCredentials:
        return grpc.ssl_channel_credentials(
            root_certificates=self.root_certificates,
            private_key=self.client_key,
            certificate_chain=self.client_certificate,
        )

    def channel_options(self) -> list[tuple[str, str]]:
        return [("grpc.ssl_target_name_override", self.server_name)] if self.server_name else []


def _read(path: str | Path | None) -> bytes | None:
    return None if path is None else Path(path).read_bytes()
