"""The constructed VLM: built once and cached, served by the real vLLM CPU build (no torchvision: Idefics3's PIL
image processor), which answers an image question from the picture with log-probabilities that match transformers."""

from __future__ import annotations

import base64
import io
import subprocess
import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
import torch
from PIL import Image

from deploy.local_stack import LocalStack, StackConfig, free_port
from explainers.constructed_vlm import IMAGE_SEQ_LEN, MODEL_NAME, default_vlm_dir, prepare_vlm
from explainers.embedded_model import verify_manifest
from tests.pictures import QUESTION, square_picture

# The name the explainer publishes the weights under (the manifest's), so a whole stack can share this server.
SERVED_NAME = MODEL_NAME
VLLM_START_S = 600


def test_prepared_once_and_verified() -> None:
    first = prepare_vlm()
    assert first.model_name == MODEL_NAME and first.model_dir == default_vlm_dir()
    started = time.monotonic()
    again = prepare_vlm()
    assert again == first and time.monotonic() - started < 30  # cached: only the digests are recomputed
    assert verify_manifest(first.model_dir).weights_digest == first.weights_digest
    assert importable_without("torchvision")


def importable_without(module: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(module) is None


@pytest.fixture(scope="session")
def vllm_vlm(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A real vLLM server serving the constructed VLM (session-wide: tests/e2e/test_images.py shares it); yields
    its URL."""
    manifest = prepare_vlm()
    state = tmp_path_factory.mktemp("vllm-vlm")
    stack = LocalStack(
        StackConfig(model_dir=manifest.model_dir, state_dir=state, vllm_port=free_port(), served_model_name=SERVED_NAME)
    )
    command = stack.vllm_command()
    log = (state / "vllm.log").open("wb")
    process = subprocess.Popen(command.argv, env=command.env, stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + VLLM_START_S
        while not stack.vllm_ready():
            assert process.poll() is None, (state / "vllm.log").read_text()[-4000:]
            assert time.monotonic() < deadline, "vLLM did not become healthy"
            time.sleep(2)
        yield stack.config.vllm_url
    finally:
        process.terminate()
        try:
            process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        log.close()


def data_url(picture: Image.Image) -> str:
    buffer = io.BytesIO()
    picture.save(buffer, "PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


def chat(url: str, picture: Image.Image) -> dict[str, Any]:
    body = {
        "model": SERVED_NAME,
        "messages": [
            {
                "role": "user",
                "content": [
                    {"type": "image_url", "image_url": {"url": data_url(picture)}},
                    {"type": "text", "text": QUESTION},
                ],
            }
        ],
        "max_tokens": 8,
        "temperature": 0,
        "logprobs": True,
        "return_token_ids": True,
    }
    response = httpx.post(f"{url}/v1/chat/completions", json=body, timeout=300)
    assert response.status_code == 200, response.text[:2000]
    result: dict[str, Any] = response.json()
    return result


def test_vllm_answers_from_the_picture_and_matches_transformers(vllm_vlm: str) -> None:
    from transformers import AutoProcessor, Idefics3ForConditionalGeneration

    model_dir = str(default_vlm_dir())
    processor = AutoProcessor.from_pretrained(model_dir, local_files_only=True)  # type: ignore[no-untyped-call]
    model = Idefics3ForConditionalGeneration.from_pretrained(model_dir, local_files_only=True).eval()  # type: ignore[no-untyped-call]
    for colour in ("red", "blue"):
        picture = square_picture(colour, 2, 2)
        served = chat(vllm_vlm, picture)
        choice = served["choices"][0]
        assert colour in choice["message"]["content"].lower()
        prompt_ids: list[int] = served["prompt_token_ids"]
        output_ids: list[int] = choice["token_ids"]
        assert prompt_ids.count(model.config.image_token_id) == IMAGE_SEQ_LEN
        # The same prompt as the processor renders it; the explainer can rebuild the pixels from the image alone.
        prompt = processor.tokenizer.apply_chat_template(
            [{"role": "user", "content": "<image>\n" + QUESTION}], tokenize=False, add_generation_prompt=True
        )
        inputs = processor(text=prompt, images=[picture], return_tensors="pt")
        assert inputs.input_ids[0].tolist() == prompt_ids
        with torch.no_grad():
            logits = model(input_ids=torch.tensor([prompt_ids + output_ids]), pixel_values=inputs.pixel_values).logits
        log_probs = torch.log_softmax(logits[0, len(prompt_ids) - 1 : -1], dim=-1)
        ours = log_probs.gather(-1, torch.tensor(output_ids)[:, None])[:, 0]
        theirs = torch.tensor([entry["logprob"] for entry in choice["logprobs"]["content"]])
        torch.testing.assert_close(ours, theirs, atol=2e-4, rtol=0)
