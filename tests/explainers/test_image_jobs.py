"""Jobs with pictures, the explain spec's image rules, the image-method registry's parameters, and the hidden-state
cache key naming the pictures: the parts of explaining a request with pictures that need no model."""

from __future__ import annotations

import json

import pytest
import redis
import torch

from common.explain_spec import (
    MAX_IMAGE_GRID_SIDE,
    InvalidInputError,
    InvalidParamsError,
    UnknownMethodError,
    check_explain_options,
    check_image_methods,
    check_image_options,
)
from common.jobs import ExplainOptions, ExplanationJob, MethodRequest
from explainers.hidden_cache import HiddenStateCache
from explainers.image_methods.registry import IMAGE_METHODS, get_image_method, image_catalog

PICTURE = b"\x89PNG\r\n\x1a\n" + bytes(range(256))  # bytes that are not UTF-8: they must travel intact
MESSAGES = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What color is the square?"}]}]


def job(**changes: object) -> ExplanationJob:
    fields: dict[str, object] = {
        "explanation_id": "exp_1",
        "tenant": "t",
        "model": "m",
        "weights_digest": "d",
        "prompt_token_ids": [1, 2, 3],
        "output_token_ids": [4],
        "served_logprobs": [-0.5],
        "methods": [MethodRequest("occlusion", {"baseline": "white"})],
        "traceparent": "",
        "options": ExplainOptions(image_grid_rows=2, image_grid_cols=3),
        "image_messages": MESSAGES,
        "images": [PICTURE, PICTURE[:20]],
    }
    fields.update(changes)
    return ExplanationJob(**fields)  # type: ignore[arg-type]


def test_a_job_carries_its_pictures_and_messages_as_json() -> None:
    original = job()
    text = original.to_json()
    assert json.loads(text)["image_messages"]  # plain JSON (never pickle): readable by any process
    decoded = ExplanationJob.from_json(text)
    assert decoded == original
    assert decoded.images == [PICTURE, PICTURE[:20]]
    assert decoded.options.image_grid_rows == 2 and decoded.options.image_grid_cols == 3
    plain = job(image_messages=None, images=[])
    assert "images" not in plain.to_fields() and ExplanationJob.from_json(plain.to_json()) == plain


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("images", json.dumps(["not base64!"])),
        ("images", json.dumps([3])),
        ("image_messages", json.dumps([{"role": "user", "content": [{"type": "video"}]}])),
        ("image_messages", json.dumps({"role": "user"})),
    ],
)
def test_a_malformed_picture_field_is_a_malformed_job(field: str, value: str) -> None:
    fields = job().to_fields()
    fields[field] = value
    with pytest.raises(ValueError, match="malformed explanation job"):
        ExplanationJob.from_fields(fields)


def test_grid_sizes_outside_the_allowed_values_are_refused_naming_them() -> None:
    for rows, cols in ((0, 0), (1, 1), (7, 7), (MAX_IMAGE_GRID_SIDE, 2)):
        check_explain_options(ExplainOptions(image_grid_rows=rows, image_grid_cols=cols))
    for rows, cols in ((0, 3), (3, 0), (MAX_IMAGE_GRID_SIDE + 1, 2), (-1, -1)):
        with pytest.raises(InvalidInputError, match=f"both be 0 .* or both between 1 and {MAX_IMAGE_GRID_SIDE}"):
            check_explain_options(ExplainOptions(image_grid_rows=rows, image_grid_cols=cols))


def test_methods_that_do_not_explain_pictures_are_refused_naming_those_that_do() -> None:
    catalogue = {"occlusion": True, "attention": True, "value_zeroing": False}
    check_image_methods(["occlusion", "attention"], catalogue)
    with pytest.raises(InvalidInputError, match=r"value_zeroing.*those that do: attention, occlusion"):
        check_image_methods(["occlusion", "value_zeroing"], catalogue)
    with pytest.raises(InvalidInputError, match="no method offered here does"):
        check_image_methods(["saliency"], {"saliency": False})


def test_image_requests_explain_log_probabilities_without_foils_or_faithfulness() -> None:
    check_image_options(ExplainOptions())
    for options, named in (
        (ExplainOptions(foil_token_ids=[3]), "foil_token_ids"),
        (ExplainOptions(score="probability"), "explain.targets.score"),
        (ExplainOptions(faithfulness=True), "explain.faithfulness"),
    ):
        with pytest.raises(InvalidInputError, match=named):
            check_image_options(options)


def test_the_registry_offers_every_image_method_with_its_parameters() -> None:
    catalogue = image_catalog("constructed-colour-vlm", "idefics3")
    assert [info.name for info in catalogue.methods] == sorted(IMAGE_METHODS)
    assert all(info.multimodal for info in catalogue.methods)
    assert set(IMAGE_METHODS) == {
        "occlusion",
        "saliency",
        "input_x_gradient",
        "integrated_gradients",
        "attention",
        "logit_lens",
    }
    occlusion = get_image_method("occlusion")
    assert occlusion.parse_params({}) == {"baseline": "grey", "batch_size": 8}
    assert occlusion.parse_params({"baseline": "blur"})["baseline"] == "blur"
    with pytest.raises(InvalidParamsError, match="must be one of grey, white, black, blur"):
        occlusion.parse_params({"baseline": "purple"}, "explain.methods[0].params")
    integrated = get_image_method("integrated_gradients")
    assert integrated.parse_params({"steps": 4}) == {
        "baseline": "black",
        "steps": 4,
        "batch_size": 8,
        "with_text": False,
    }
    assert integrated.parse_params({"baseline": "white"})["baseline"] == "white"
    with pytest.raises(InvalidParamsError, match="must be one of black, white, blur"):
        integrated.parse_params({"baseline": "grey"})
    with pytest.raises(InvalidParamsError, match=r"1\.\.256"):
        integrated.parse_params({"steps": 0})
    with pytest.raises(UnknownMethodError, match="available methods: attention, input_x_gradient"):
        get_image_method("value_zeroing")


def test_the_same_tokens_with_another_picture_are_another_cache_entry(redis_client: redis.Redis) -> None:
    cache = HiddenStateCache(redis_client, 60, "tenant")
    ids = [5, 6, 7]
    states = torch.randn(3, 3, 4)
    red, blue = "a" * 64, "b" * 64
    assert cache.put("w", ids, states, [red])
    cache.put_last_layer("w", ids, states[-1], [red])
    assert cache.get("w", ids, [red]) is not None
    assert cache.get_last_layer("w", ids, [red]) is not None
    # The same text with another picture, or with none: a miss.
    assert cache.get("w", ids, [blue]) is None and cache.get_last_layer("w", ids, [blue]) is None
    assert cache.get("w", ids) is None
    assert cache.get("w", ids, [red, red]) is None
    # Without pictures the key is what it always was.
    assert HiddenStateCache.key("tenant", "w", ids, ()) == HiddenStateCache.key("tenant", "w", ids)
    assert HiddenStateCache.key("tenant", "w", ids, [red]) != HiddenStateCache.key("tenant", "w", ids)
