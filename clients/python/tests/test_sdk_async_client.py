from __future__ import annotations

import grpc
import pytest
from fake_sightline import GENERATED_TEXT, FakeSightline
from sightline import AsyncClient, ExplainOptions, ExplanationState, FinishReason, SightlineError
from sightline.v1 import explanations_pb2, inference_pb2, types_pb2


async def test_generate_with_sync_explanation(fake: FakeSightline) -> None:
    async with AsyncClient(fake.target, api_key="secret-key") as client:
        generation = await client.generate([464, 3139], explain=["saliency"], temperature=0.5)

    request = fake.requests[-1]
    assert isinstance(request, inference_pb2.GenerateRequest)
    assert request.input.WhichOneof("kind") == "prompt_token_ids"
    assert request.sampling.temperature == 0.5
    assert request.explain.mode == types_pb2.EXPLAIN_MODE_SYNC
    assert fake.metadata[-1]["authorization"] == "Bearer secret-key"
    assert generation.text == GENERATED_TEXT
    assert generation.explanation is not None
    assert generation.explanation.top_sources(0, k=1)[0].position == 1


async def test_generate_stream_iterates_asynchronously(fake: FakeSightline) -> None:
    async with AsyncClient(fake.target) as client:
        chunks = [chunk async for chunk in client.generate_stream([{"role": "user", "content": "hi"}])]

    request = fake.requests[-1]
    assert isinstance(request, inference_pb2.GenerateRequest)
    assert request.input.WhichOneof("kind") == "chat"
    assert "".join(chunk.text_delta for chunk in chunks) == GENERATED_TEXT
    assert chunks[-1].finish_reason is FinishReason.LENGTH


async def test_leaving_a_stream_early_cancels_it(fake: FakeSightline) -> None:
    async with AsyncClient(fake.target) as client:
        chunks = client.generate_stream("x")
        async for chunk in chunks:
            if chunk.kind == "start":
                continue
            assert chunk.text_delta == " is"
            break
        await chunks.aclose()
        assert (await client.list_methods())[0].name == "saliency"


async def test_explain_get_explanation_and_list_methods(fake: FakeSightline) -> None:
    async with AsyncClient(fake.target) as client:
        explanation_id = await client.explain([1, 2], [3], ["saliency"], mode="async")
        explanation = await client.get_explanation(explanation_id, wait_seconds=1)
        attached = await client.explain([1, 2], [3], ["saliency"])
        methods = await client.list_methods()

    assert explanation_id == "exp-1"
    assert explanation.state is ExplanationState.SUCCEEDED
    assert attached.explanation_id == "exp-1"
    assert [method.name for method in methods] == ["saliency", "logit_lens"]


async def test_status_errors_become_sightline_errors(fake: FakeSightline) -> None:
    async with AsyncClient(fake.target) as client:
        with pytest.raises(SightlineError) as raised:
            await client.get_explanation("exp-missing")

    assert raised.value.code == grpc.StatusCode.NOT_FOUND
    assert str(raised.value) == "NOT_FOUND: no explanation 'exp-missing'"
    assert isinstance(raised.value.__cause__, grpc.RpcError)


async def test_stream_errors_become_sightline_errors() -> None:
    async with AsyncClient("127.0.0.1:1", timeout=5) as client:
        with pytest.raises(SightlineError) as raised:
            async for _ in client.generate_stream("x"):
                pass

    assert raised.value.code == grpc.StatusCode.UNAVAILABLE


async def test_every_call_sends_the_explain_options(fake: FakeSightline) -> None:
    options = ExplainOptions(output_indices=[1], granularity="word", faithfulness=True)
    async with AsyncClient(fake.target) as client:
        generation = await client.generate("x", explain="saliency", options=options)
        chunks = [chunk async for chunk in client.generate_stream("x", explain="saliency", options=options)]
        explanation = await client.explain([1, 2], [3], ["saliency"], options=options)

    requests = fake.requests[-3:]
    assert [type(request) for request in requests] == [
        inference_pb2.GenerateRequest,
        inference_pb2.GenerateRequest,
        explanations_pb2.ExplainRequest,
    ]
    for request in requests:
        assert isinstance(
            request,
            inference_pb2.GenerateRequest | inference_pb2.GenerateRequest | explanations_pb2.ExplainRequest,
        )
        assert list(request.explain.targets.output_indices) == [1]
        assert request.explain.aggregation.granularity == types_pb2.GRANULARITY_WORD
        assert request.explain.faithfulness
    assert generation.explanation is not None
    assert generation.explanation.result("saliency").faithfulness is not None
    assert chunks[-1].explanation is not None
    assert chunks[-1].explanation.source_groups
    assert explanation.top_groups(1, k=1)[0][1] == -0.9375


async def test_list_explanations(fake: FakeSightline) -> None:
    async with AsyncClient(fake.target, api_key="k") as client:
        page = await client.list_explanations(page_token="page-2")

    assert [summary.explanation_id for summary in page.explanations] == ["exp-failed"]
    assert page.next_page_token == ""
    assert fake.metadata[-1]["authorization"] == "Bearer k"
