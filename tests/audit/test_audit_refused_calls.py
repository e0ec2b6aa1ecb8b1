"""Refused calls are logged with their status and what they sent, even what JSON cannot hold, and logging them
never changes the status their caller gets."""

from __future__ import annotations

import json
import math
from pathlib import Path

import grpc
from sightline import Client
from sightline.v1 import inference_pb2, inference_pb2_grpc, types_pb2

from tests.audit.harness import Gateway, backend
from tests.params import param_values


def test_refused_calls_keep_their_status_and_are_logged_with_what_they_sent(tmp_path: Path) -> None:
    nan_params = param_values({"steps": math.nan})
    requests = {
        "nan-temperature": inference_pb2.GenerateRequest(
            request_id="nan-temperature",
            input=inference_pb2.GenerationInput(prompt="hi"),
            sampling=types_pb2.SamplingParams(temperature=math.nan),
        ),
        "odd-explain": inference_pb2.GenerateRequest(
            request_id="odd-explain",
            input=inference_pb2.GenerationInput(prompt="hi"),
            explain=types_pb2.ExplainSpec(
                methods=[types_pb2.MethodSpec(name="saliency", params=nan_params)],
                mode=99,  # type: ignore[arg-type]  # an enum value the API does not define
            ),
        ),
    }
    with backend(tmp_path) as running:
        gateway = Gateway(running, "gateway", {})
        try:
            codes = {}
            with grpc.insecure_channel(gateway.address) as channel:
                stub = inference_pb2_grpc.InferenceServiceStub(channel)
                for name, request in requests.items():
                    try:
                        stub.Generate(request, timeout=30)
                    except grpc.RpcError as error:
                        codes[name] = error.code()
            with Client(gateway.address, timeout=30) as client:
                client.export_audit(tmp_path / "trail.jsonl")
        finally:
            gateway.stop()

    assert codes["nan-temperature"] == grpc.StatusCode.INVALID_ARGUMENT
    # No explainer registered: the catalogue is unavailable, which is what the caller must hear, not INTERNAL.
    assert codes["odd-explain"] == grpc.StatusCode.UNAVAILABLE
    records = [json.loads(line) for line in (tmp_path / "trail.jsonl").read_text().splitlines()]
    entries = {e["request_id"]: e for e in (json.loads(r["entry"]) for r in records if r["type"] == "entry")}
    assert entries["nan-temperature"]["status"] == "INVALID_ARGUMENT"
    assert entries["nan-temperature"]["sampling"] == {"temperature": "NaN"}
    assert entries["odd-explain"]["status"] == "UNAVAILABLE"
    assert entries["odd-explain"]["methods"] == [{"name": "saliency", "params": {"steps": "NaN"}}]
    assert entries["odd-explain"]["explain_mode"] == "99"
