"""The trail's settings at gateway start: off means no service and no database; an unusable database stops
the gateway with a message naming it."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import grpc
import pytest
from sightline.v1 import audit_pb2, audit_pb2_grpc

from deploy.local_stack import free_port
from tests.audit.harness import REPO_ROOT, Gateway, backend


def test_audit_off_serves_no_audit_service_and_writes_no_database(tmp_path: Path) -> None:
    with backend(tmp_path) as running:
        gateway = Gateway(running, "unaudited", {"SIGHTLINE_AUDIT": "off"})
        try:
            with grpc.insecure_channel(gateway.address) as channel, pytest.raises(grpc.RpcError) as missing:
                audit_pb2_grpc.AuditServiceStub(channel).GetCheckpoint(audit_pb2.GetCheckpointRequest(), timeout=10)
        finally:
            gateway.stop()
    assert missing.value.code() == grpc.StatusCode.UNIMPLEMENTED
    assert not (tmp_path / "audit").exists()


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"SIGHTLINE_DATABASE_URL": "mysql://db/audit"}, "SIGHTLINE_DATABASE_URL must be a postgresql:// URL"),
        ({"SIGHTLINE_DATABASE_URL": "postgresql://127.0.0.1:1/audit"}, "cannot open the audit database"),
        ({"SIGHTLINE_AUDIT_RETENTION_DAYS": "0"}, "SIGHTLINE_AUDIT_RETENTION_DAYS must be a positive number"),
        ({"SIGHTLINE_AUDIT": "maybe"}, "SIGHTLINE_AUDIT must be on or off"),
    ],
)
def test_an_unusable_audit_setting_stops_the_gateway_naming_it(
    tmp_path: Path, env: dict[str, str], message: str
) -> None:
    completed = subprocess.run(
        [sys.executable, "-m", "server"],
        env={
            **os.environ,
            "PYTHONPATH": os.pathsep.join([str(REPO_ROOT), str(REPO_ROOT / "clients" / "python" / "src")]),
            "SIGHTLINE_GATEWAY_LISTEN": f"127.0.0.1:{free_port()}",
            "SIGHTLINE_STATE_DIR": str(tmp_path),
            "OTEL_SDK_DISABLED": "true",
            **env,
        },
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert completed.returncode == 2, completed.stderr[-2000:]
    assert message in completed.stderr


def test_a_signing_key_that_is_not_ed25519_stops_the_gateway(tmp_path: Path) -> None:
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.hazmat.primitives.serialization import Encoding, NoEncryption, PrivateFormat

    key = tmp_path / "p256.pem"
    key.write_bytes(
        ec.generate_private_key(ec.SECP256R1()).private_bytes(Encoding.PEM, PrivateFormat.PKCS8, NoEncryption())
    )
    completed = subprocess.run(
        [sys.executable, "-m", "server"],
        env={
            **os.environ,
            "PYTHONPATH": os.pathsep.join([str(REPO_ROOT), str(REPO_ROOT / "clients" / "python" / "src")]),
            "SIGHTLINE_GATEWAY_LISTEN": f"127.0.0.1:{free_port()}",
            "SIGHTLINE_STATE_DIR": str(tmp_path),
            "SIGHTLINE_AUDIT_SIGNING_KEY": str(key),
            "OTEL_SDK_DISABLED": "true",
        },
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert completed.returncode == 2
    assert f"the audit signing key {key} is not an Ed25519 key" in completed.stderr
