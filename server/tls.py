"""TLS and mutual TLS for the gateway's gRPC port, from PEM files."""

from __future__ import annotations

from pathlib import Path

import grpc

from server.errors import ConfigError


def server_credentials(
    cert_file: str | None, key_file: str | None, client_ca_file: str | None
) -> grpc.ServerCredentials | None:
    """TLS credentials, requiring client certificates signed by ``client_ca_file`` when given; None: plaintext."""
    if not cert_file and not key_file:
        if client_ca_file:
            raise ConfigError(
                "SIGHTLINE_TLS_CLIENT_CA (--tls-client-ca) needs SIGHTLINE_TLS_CERT and SIGHTLINE_TLS_KEY too: "
                "mutual TLS is TLS in which clients also present a certificate"
            )
        return None
    if not cert_file or not key_file:
        raise ConfigError(
            "TLS needs both a certificate chain and its private key: set SIGHTLINE_TLS_CERT and SIGHTLINE_TLS_KEY "
            "(--tls-cert, --tls-key)"
        )
    certificate = _read_pem(cert_file, "SIGHTLINE_TLS_CERT")
    private_key = _read_pem(key_file, "SIGHTLINE_TLS_KEY")
    client_ca = _read_pem(client_ca_file, "SIGHTLINE_TLS_CLIENT_CA") if client_ca_file else None
    return grpc.ssl_server_credentials(
        [(private_key, certificate)], root_certificates=client_ca, require_client_auth=client_ca is not None
    )


def _read_pem(path: str, variable: str) -> bytes:
    try:
        content = Path(path).read_bytes()
    except OSError as exc:
        raise ConfigError(f"cannot read {variable} file {path}: {exc.strerror}") from exc
    if b"-----BEGIN " not in content:
        raise ConfigError(f"{variable} file {path} is not PEM (no '-----BEGIN' line)")
    return content
