"""The worker's image path on the constructed VLM, without the stack: it rebuilds the prompt vLLM used from the job's
messages and pictures (and refuses a job whose ids differ, saying where), reads the generated tokens'
log-probabilities out of the model with the picture in the prompt, keeps them in the hidden-state cache under the
picture's digest, and reports grids, cells and roles."""

from __future__ import annotations

import hashlib
import io
from collections.abc import Iterator

import pytest
import redis
import torch
from sightline.v1 import types_pb2

from common.explain_spec import InvalidInputError
from common.jobs import ExplainOptions, ExplanationJob, MethodRequest
from explainers.constructed_vlm import GRID_SIDE, IMAGE_SEQ_LEN, prepare_vlm
from explainers.hidden_cache import HiddenStateCache
from explainers.image_explain import explain_images
from explainers.model import load_explained_model
from explainers.vlm import LoadedVlm, rebuild_inputs
from tests.pictures import QUESTION, square_picture

MESSAGES = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": QUESTION}]}]


@pytest.fixture(scope="module")
def vlm() -> Iterator[LoadedVlm]:
    loaded = load_explained_model(prepare_vlm().model_dir)
    assert isinstance(loaded, LoadedVlm) and loaded.architecture == "idefics3"
    yield loaded


def png(colour: str, row: int, col: int) -> bytes:
    buffer = io.BytesIO()
    square_picture(colour, row, col).save(buffer, "PNG")
    return buffer.getvalue()


def served_prompt(vlm: LoadedVlm, picture: bytes) -> list[int]:
    """The prompt ids as vLLM makes them: the processor over the chat template with the placeholder before the text
    (tests/explainers/test_constructed_vlm.py checks vLLM's ids are these)."""
    from PIL import Image

    prompt = vlm.tokenizer.apply_chat_template(
        [{"role": "user", "content": "<image>\n" + QUESTION}], tokenize=False, add_generation_prompt=True
    )
    image = Image.open(io.BytesIO(picture)).convert("RGB")
    ids: list[int] = vlm.processor(text=prompt, images=[image], return_tensors="pt")["input_ids"][0].tolist()
    return ids


def test_the_prompt_is_rebuilt_and_a_different_one_refused(vlm: LoadedVlm) -> None:
    picture = png("red", 2, 2)
    ids = served_prompt(vlm, picture)
    rebuilt = rebuild_inputs(vlm, MESSAGES, [picture], ids)
    assert rebuilt.prompt_ids == ids and tuple(rebuilt.pixel_values.shape) == (1, 3, 224, 224)
    assert ids.count(vlm.image_token_id) == IMAGE_SEQ_LEN
    altered = [*ids[:5], ids[5] + 1, *ids[6:]]
    with pytest.raises(InvalidInputError, match=r"differing first at positions \[5\].*processor, chat template"):
        rebuild_inputs(vlm, MESSAGES, [picture], altered)
    with pytest.raises(InvalidInputError, match="hold 1 pictures but it carries 2"):
        rebuild_inputs(vlm, MESSAGES, [picture, picture], ids)
    with pytest.raises(InvalidInputError, match="does not decode"):
        rebuild_inputs(vlm, MESSAGES, [picture[:40]], ids)


def job_for(vlm: LoadedVlm, picture: bytes, output_ids: list[int], served: list[float] | None) -> ExplanationJob:
    return ExplanationJob(
        explanation_id="exp_test",
        tenant="t",
        model=vlm.model_name,
        weights_digest=vlm.weights_digest,
        prompt_token_ids=served_prompt(vlm, picture),
        output_token_ids=output_ids,
        served_logprobs=served,
        methods=[MethodRequest("attention", {})],
        traceparent="",
        options=ExplainOptions(output_indices=[len(output_ids) - 1]),
        image_messages=MESSAGES,
        images=[picture],
    )


def test_logprobs_grid_roles_and_a_cache_keyed_by_the_picture(vlm: LoadedVlm, redis_client: redis.Redis) -> None:
    picture = png("red", 2, 2)
    ids = served_prompt(vlm, picture)
    # The model's own log-probabilities of a short answer, as a server would report them.
    answer = vlm.tokenizer.encode(" The square is", add_special_tokens=False)
    pixels = rebuild_inputs(vlm, MESSAGES, [picture], ids).pixel_values[None]
    with torch.no_grad():
        logits = vlm.model(input_ids=torch.tensor([ids + answer]), pixel_values=pixels, use_cache=False).logits[0]
    expected = torch.log_softmax(logits.float(), -1)[torch.arange(len(ids) - 1, len(ids) + len(answer) - 1)]
    served = expected.gather(-1, torch.tensor(answer)[:, None])[:, 0].tolist()

    cache = HiddenStateCache(redis_client, 60, "t")
    first = explain_images(vlm, cache, job_for(vlm, picture, answer, served))
    assert not first.cache_hit and first.fidelity.max_abs_logprob_diff < 1e-4
    (grid,) = first.image_grids
    assert (grid.rows, grid.cols, grid.digest) == (GRID_SIDE, GRID_SIDE, hashlib.sha256(picture).hexdigest())
    image_tokens = [token for token in first.tokens if token.role == types_pb2.TOKEN_ROLE_IMAGE]
    assert len(image_tokens) == IMAGE_SEQ_LEN and all(token.message_index == 0 for token in image_tokens)
    (result,) = first.results
    assert tuple(result.image_attributions[0].cells.shape) == (1, GRID_SIDE, GRID_SIDE)
    assert result.modality.image[0] + result.modality.text[0] == pytest.approx(1.0)

    again = explain_images(vlm, cache, job_for(vlm, picture, answer, served))
    assert again.cache_hit and list(again.fidelity.recomputed_logprobs) == list(first.fidelity.recomputed_logprobs)
    # The same token ids with another picture: a miss.
    other = png("red", 3, 1)
    assert served_prompt(vlm, other) == ids
    assert not explain_images(vlm, cache, job_for(vlm, other, answer, None)).cache_hit
