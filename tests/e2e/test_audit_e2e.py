"""The audit trail on the real stack: an explained Generate is logged with what served it, its final
explanation record is archived with the trail, and the CLI's export verifies offline."""

from __future__ import annotations

import datetime
import hashlib
import json
import subprocess
import sys
import time
from pathlib import Path

import grpc
import pytest
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from sightline import Client, ExplanationState
from sightline.v1 import explanations_pb2, explanations_pb2_grpc

from deploy.local_stack import LocalStack

pytestmark = pytest.mark.e2e

QUESTION = [{"role": "user", "content": "What is the capital of France?"}]


def _cli(stack: LocalStack, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(Path(sys.executable).parent / "sightline"), "--target", stack.config.gateway_address, *args],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )


def _entries(path: Path) -> list[dict[str, object]]:
    records = [json.loads(line) for line in path.read_text().splitlines()]
    return [json.loads(str(r["entry"])) for r in records if r["type"] == "entry"]


def test_an_explained_generate_is_logged_archived_exported_and_verified(
    stack: LocalStack, channel: grpc.Channel, tmp_path: Path
) -> None:
    since = datetime.datetime.now(datetime.UTC).isoformat()
    with Client(stack.config.gateway_address, timeout=300) as client:
        generation = client.generate(QUESTION, max_tokens=8, explain=["input_x_gradient"])
    explanation = generation.explanation
    assert explanation is not None and explanation.state == ExplanationState.SUCCEEDED
    public_key = stack.config.state_dir / "audit" / "signing-key.pem.pub"
    trail = tmp_path / "trail.jsonl"

    # The final record reaches the trail within a few archive sweeps (every 2 s).
    deadline = time.monotonic() + 60
    while True:
        exported = _cli(stack, "audit", "export", "--since", since, "--out", str(trail))
        assert exported.returncode == 0, exported.stderr
        archived = [e for e in _entries(trail) if e["kind"] == "explanation"]
        if archived or time.monotonic() > deadline:
            break
        time.sleep(1)

    verified = _cli(stack, "audit", "verify", str(trail), "--public-key", str(public_key))
    assert verified.returncode == 0, verified.stderr
    assert verified.stdout.startswith("OK: ") and "tenant 'default'" in verified.stdout

    (request,) = [e for e in _entries(trail) if e["kind"] == "request" and e["request_id"] == generation.request_id]
    assert request["rpc"] == "Generate" and request["status"] == "OK"
    assert request["output_token_ids"] == [t.id for t in generation.output_tokens]
    assert request["trace_id"] == generation.trace_id
    assert request["model"] == "smollm2-135m-instruct"
    assert request["weights_digest"] == explanation.weights_digest != ""
    assert request["explanation_id"] == generation.explanation_id
    assert request["explanation_state"] == "EXPLANATION_STATE_SUCCEEDED"
    assert explanation.fidelity is not None
    assert request["fidelity_max_abs_logprob_diff"] == pytest.approx(explanation.fidelity.max_abs_logprob_diff)
    assert request["methods"] == [{"name": "input_x_gradient", "params": {}}]
    assert len(str(request["method_catalog_sha256"])) == 64 and len(str(request["input_sha256"])) == 64

    (record_entry,) = [e for e in archived if e["explanation_id"] == generation.explanation_id]
    stub = explanations_pb2_grpc.ExplanationsServiceStub(channel)
    stored = stub.GetExplanation(
        explanations_pb2.GetExplanationRequest(explanation_id=generation.explanation_id), timeout=30
    ).explanation
    assert record_entry["record_sha256"] == hashlib.sha256(stored.SerializeToString(deterministic=True)).hexdigest()
    assert record_entry["state"] == "EXPLANATION_STATE_SUCCEEDED" and record_entry["methods"] == ["input_x_gradient"]


def test_reflection_lists_the_audit_service(channel: grpc.Channel) -> None:
    stub = reflection_pb2_grpc.ServerReflectionStub(channel)
    responses = stub.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")]), timeout=10)
    assert "sightline.v1.AuditService" in {s.name for r in responses for s in r.list_services_response.service}
