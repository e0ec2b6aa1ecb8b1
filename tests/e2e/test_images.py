"""Pictures through the real gateway: the Python SDK sends a chat message mixing a picture and text, the gateway
checks the picture and forwards it to vLLM serving the constructed VLM, and the answer comes from the picture. Bad
pictures are refused with INVALID_ARGUMENT naming the limit."""

from __future__ import annotations

import io
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from sightline import Client
from sightline.cli import main as cli_main
from sightline.errors import SightlineError

from deploy.local_stack import LocalStack, StackConfig
from explainers.constructed_vlm import prepare_vlm
from tests.explainers.test_constructed_vlm import SERVED_NAME, vllm_vlm  # noqa: F401 (the session's VLM server)
from tests.gateway_process import GatewayProcess
from tests.pictures import QUESTION, square_picture


@pytest.fixture(scope="module")
def vlm_gateway(vllm_vlm: str, redis_server: int, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:  # noqa: F811
    port = int(vllm_vlm.rsplit(":", 1)[1])
    stack = LocalStack(
        StackConfig(
            model_dir=prepare_vlm().model_dir,
            state_dir=tmp_path_factory.mktemp("vlm-gateway"),
            vllm_port=port,
            redis_port=redis_server,
            served_model_name=SERVED_NAME,
        )
    )
    limits = {"SIGHTLINE_MAX_IMAGES": "1", "SIGHTLINE_MAX_IMAGE_PIXELS": "250000"}
    # No explainer here (it cannot load the VLM yet): the gateway is ready once it can generate.
    with GatewayProcess(stack, "vlm-gateway", limits, health_service="sightline.v1.InferenceService") as gateway:
        yield gateway.address


def png(colour: str, row: int, col: int) -> bytes:
    buffer = io.BytesIO()
    square_picture(colour, row, col).save(buffer, "PNG")
    return buffer.getvalue()


def ask(address: str, *content: object, **kwargs: object) -> str:
    with Client(address) as client:
        result = client.generate([{"role": "user", "content": list(content)}], max_tokens=8, timeout=300, **kwargs)  # type: ignore[arg-type]
    return str(result.text)


def test_the_answer_comes_from_the_picture_in_every_sdk_form(vlm_gateway: str, tmp_path: Path) -> None:
    assert "red" in ask(vlm_gateway, png("red", 1, 1), QUESTION).lower()
    path = tmp_path / "square.png"
    path.write_bytes(png("blue", 3, 2))
    assert "blue" in ask(vlm_gateway, path, QUESTION).lower()
    assert "green" in ask(vlm_gateway, square_picture("green", 0, 4), QUESTION).lower()


def refusal(address: str, *content: object, **kwargs: object) -> SightlineError:
    with pytest.raises(SightlineError) as caught:
        ask(address, *content, **kwargs)
    return caught.value


def test_bad_pictures_are_refused_naming_the_limit(vlm_gateway: str) -> None:
    whole = png("red", 1, 1)
    truncated = refusal(vlm_gateway, whole[: len(whole) // 2], QUESTION)
    assert truncated.code == grpc.StatusCode.INVALID_ARGUMENT and "truncated" in truncated.details
    too_many = refusal(vlm_gateway, whole, whole, QUESTION)
    assert too_many.code == grpc.StatusCode.INVALID_ARGUMENT and "SIGHTLINE_MAX_IMAGES" in too_many.details
    big = io.BytesIO()
    square_picture("red", 1, 1).resize((600, 600)).save(big, "PNG")
    too_big = refusal(vlm_gateway, big.getvalue(), QUESTION)
    assert too_big.code == grpc.StatusCode.INVALID_ARGUMENT and "SIGHTLINE_MAX_IMAGE_PIXELS" in too_big.details
    gif = io.BytesIO()
    square_picture("red", 1, 1).save(gif, "GIF")
    unsupported = refusal(vlm_gateway, gif.getvalue(), QUESTION)
    assert unsupported.code == grpc.StatusCode.INVALID_ARGUMENT and "SIGHTLINE_IMAGE_FORMATS" in unsupported.details


def test_the_cli_sends_a_picture(vlm_gateway: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "square.png"
    path.write_bytes(png("yellow", 2, 2))
    status = cli_main(
        ["--target", vlm_gateway, "--timeout", "300", "generate", "--image", str(path), "--max-tokens", "8", QUESTION]
    )
    assert status == 0
    assert "yellow" in capsys.readouterr().out.lower()
    with pytest.raises(SystemExit) as usage_error:
        cli_main(["--target", vlm_gateway, "generate", "--image", str(tmp_path / "missing.png"), QUESTION])
    assert usage_error.value.code == 2
    assert "missing.png: no such file" in capsys.readouterr().err


def test_a_stream_with_a_picture_answers_from_the_picture(vlm_gateway: str) -> None:
    with Client(vlm_gateway) as client:
        chunks = list(
            client.generate_stream(
                [{"role": "user", "content": [png("blue", 2, 3), QUESTION]}], max_tokens=8, timeout=300
            )
        )
        whole = client.generate([{"role": "user", "content": [png("blue", 2, 3), QUESTION]}], max_tokens=8, timeout=300)
    start, deltas, end = chunks[0], chunks[1:-1], chunks[-1]
    assert start.kind == "start" and end.kind == "end" and all(chunk.kind == "delta" for chunk in deltas)
    # The prompt as vLLM's processor expanded it, picture tokens included: the same ids Generate reports.
    assert start.prompt_token_ids == whole.prompt_token_ids and len(start.prompt_token_ids) > 49
    streamed = [token for chunk in deltas for token in chunk.output_tokens]
    assert [token.id for token in streamed] == [token.id for token in whole.output_tokens]
    assert all(token.logprob is not None for token in streamed)
    text = "".join(chunk.text_delta for chunk in deltas)
    assert "blue" in text.lower() and text == whole.text
    assert end.finish_reason is not None and end.usage is not None and end.usage.output_tokens == len(streamed)


def test_a_stream_checks_its_pictures_like_generate(vlm_gateway: str) -> None:
    whole = png("red", 1, 1)
    with Client(vlm_gateway) as client, pytest.raises(SightlineError) as caught:
        list(client.generate_stream([{"role": "user", "content": [whole, whole, QUESTION]}], max_tokens=4))
    assert caught.value.code == grpc.StatusCode.INVALID_ARGUMENT and "SIGHTLINE_MAX_IMAGES" in caught.value.details


def test_the_cli_streams_a_picture(vlm_gateway: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "square.png"
    path.write_bytes(png("green", 4, 0))
    status = cli_main(
        ["--target", vlm_gateway, "--timeout", "300", "stream", "--image", str(path), "--max-tokens", "8", QUESTION]
    )
    assert status == 0
    assert "green" in capsys.readouterr().out.lower()
