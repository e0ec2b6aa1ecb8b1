"""Server reflection answers clients that speak grpc.reflection.v1 as well as those that speak v1alpha.

The client is ``buf curl`` (buf is a dev dependency), a real reflection client that can be told which protocol to
speak, over a real socket to the gateway's reflection setup.
"""

from __future__ import annotations

import asyncio
import shutil
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import pytest
from google.protobuf import descriptor_pb2, descriptor_pool, json_format, message_factory
from sightline.v1 import explanations_pb2_grpc, inference_pb2_grpc

from deploy.local_stack import free_port
from server.app import EXPLANATIONS_SERVICE, INFERENCE_SERVICE
from server.reflection import V1_FILE_NAME, V1_SERVICE_NAME, V1ALPHA_SERVICE_NAME, add_v1_descriptors, enable_reflection

BUF = shutil.which("buf", path=str(Path(sys.executable).parent))


@pytest.fixture
async def address() -> AsyncIterator[str]:
    server = grpc.aio.server()
    # Unimplemented servicers: reflection only needs the services registered and their descriptors.
    inference_pb2_grpc.add_InferenceServiceServicer_to_server(inference_pb2_grpc.InferenceServiceServicer(), server)
    explanations_pb2_grpc.add_ExplanationsServiceServicer_to_server(
        explanations_pb2_grpc.ExplanationsServiceServicer(), server
    )
    enable_reflection([INFERENCE_SERVICE, EXPLANATIONS_SERVICE], server)
    port = free_port()
    server.add_insecure_port(f"127.0.0.1:{port}")
    await server.start()
    try:
        yield f"127.0.0.1:{port}"
    finally:
        await server.stop(None)


async def _buf_curl(address: str, protocol: str, *args: str) -> list[str]:
    assert BUF, "buf is a dev dependency (buf-bin)"
    process = await asyncio.create_subprocess_exec(
        BUF,
        "curl",
        "--protocol=grpc",
        "--http2-prior-knowledge",
        f"--reflect-protocol={protocol}",
        *args,
        f"http://{address}",
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    stdout, stderr = await asyncio.wait_for(process.communicate(), 60)
    assert process.returncode == 0, stderr.decode()
    return stdout.decode().split()


@pytest.mark.parametrize("protocol", ["grpc-v1", "grpc-v1alpha"])
async def test_each_reflection_protocol_lists_the_services(address: str, protocol: str) -> None:
    services = await _buf_curl(address, protocol, "--list-services")
    assert {INFERENCE_SERVICE, EXPLANATIONS_SERVICE, V1_SERVICE_NAME, V1ALPHA_SERVICE_NAME} <= set(services)


async def test_a_v1_client_gets_the_api_descriptors(address: str) -> None:
    # Listing methods needs each service's file descriptor (and its imports), fetched over v1 by symbol.
    methods = await _buf_curl(address, "grpc-v1", "--list-methods")
    assert "sightline.v1.InferenceService/GenerateStream" in methods
    assert "sightline.v1.ExplanationsService/ListMethods" in methods
    assert f"{V1_SERVICE_NAME}/ServerReflectionInfo" in methods


async def test_the_v1_service_describes_itself_in_v1_messages(address: str) -> None:
    # A client holding only v1's messages (built here from the v1 descriptors) reflects on the v1 service.
    pool = descriptor_pool.DescriptorPool()
    add_v1_descriptors(pool)
    request_type = message_factory.GetMessageClass(pool.FindMessageTypeByName(f"{V1_SERVICE_NAME}Request"))
    response_type = message_factory.GetMessageClass(pool.FindMessageTypeByName(f"{V1_SERVICE_NAME}Response"))
    async with grpc.aio.insecure_channel(address) as channel:
        call = channel.stream_stream(
            f"/{V1_SERVICE_NAME}/ServerReflectionInfo",
            request_serializer=request_type.SerializeToString,
            response_deserializer=response_type.FromString,
        )
        requests = [
            json_format.ParseDict({"file_containing_symbol": V1_SERVICE_NAME}, request_type()),
            json_format.ParseDict({"list_services": ""}, request_type()),
        ]
        responses = [response async for response in call(iter(requests))]
    described, listed = responses
    assert not described.HasField("error_response")
    files = [
        descriptor_pb2.FileDescriptorProto.FromString(blob)
        for blob in described.file_descriptor_response.file_descriptor_proto
    ]
    assert [(f.name, f.package, [s.name for s in f.service]) for f in files] == [
        (V1_FILE_NAME, "grpc.reflection.v1", ["ServerReflection"])
    ]
    assert {service.name for service in listed.list_services_response.service} >= {V1_SERVICE_NAME, INFERENCE_SERVICE}
