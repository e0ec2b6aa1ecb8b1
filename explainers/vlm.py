"""The explainer's replica of a served image-text model (transformers' Idefics3 layout, e.g. the constructed VLM of
docs/multimodal.md) with its own processor, and how it rebuilds a request's model inputs from the chat messages and
pictures a job carries.

The prompt is rendered as vLLM renders a chat whose template takes text content (as SmolLM2's does): each
message's picture placeholders first, then its text parts, joined by newlines; the processor then expands each
placeholder into the picture's image tokens and makes the pixels. The worker explains only if those ids are exactly
the ids vLLM generated from (``rebuild_inputs`` refuses otherwise), so the pixels explained are the pixels served.
"""

from __future__ import annotations

import functools
import io
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from torch import nn
from transformers import AutoModelForImageTextToText, AutoProcessor, PreTrainedTokenizerBase

from common.explain_spec import InvalidInputError
from explainers.architectures import IMAGE_TEXT_ARCHITECTURES

# How many differing positions a refusal quotes.
_SHOWN_DIFFERENCES = 3


@dataclass(frozen=True)
class LoadedVlm:
    """An image-text model in eval mode with frozen weights, its processor, and what identifies its weights."""

    model: nn.Module
    processor: Any  # transformers' ProcessorMixin for the model (untyped upstream)
    weights_digest: str
    model_name: str
    architecture: str  # config.model_type, a key of IMAGE_TEXT_ARCHITECTURES

    @property
    def tokenizer(self) -> PreTrainedTokenizerBase:
        tokenizer: PreTrainedTokenizerBase = self.processor.tokenizer
        return tokenizer

    @property
    def vocab_size(self) -> int:
        embeddings = self.model.get_input_embeddings()  # type: ignore[operator]
        return int(embeddings.num_embeddings)

    @property
    def image_token_id(self) -> int:
        return int(self.model.config.image_token_id)  # type: ignore[union-attr, arg-type]

    @property
    def max_positions(self) -> int:
        return int(self.model.config.text_config.max_position_embeddings)  # type: ignore[union-attr, arg-type]

    @functools.cached_property
    def pixel_statistics(self) -> tuple[tuple[float, ...], tuple[float, ...], float]:
        """The processor's normalisation: per-channel mean and std, and the factor 0-255 values are rescaled by."""
        image_processor = self.processor.image_processor
        return (
            tuple(float(m) for m in image_processor.image_mean),
            tuple(float(s) for s in image_processor.image_std),
            float(image_processor.rescale_factor),
        )

    def normalise(self, rgb: tuple[int, int, int]) -> tuple[float, float, float]:
        """A 0-255 colour as the model's normalised pixel values."""
        mean, std, rescale = self.pixel_statistics
        red, green, blue = ((value * rescale - m) / s for value, m, s in zip(rgb, mean, std, strict=True))
        return red, green, blue


def load_vlm(model_dir: Path, weights_digest: str, model_name: str, dtype: torch.dtype = torch.float32) -> LoadedVlm:
    """Load a local image-text model directory (safetensors, processor, tokenizer) for the image methods."""
    model = AutoModelForImageTextToText.from_pretrained(
        model_dir, dtype=dtype, attn_implementation="sdpa", local_files_only=True
    )
    model.train(False)
    model.requires_grad_(False)
    processor = AutoProcessor.from_pretrained(model_dir, local_files_only=True)  # type: ignore[no-untyped-call]
    model_type = str(model.config.model_type)
    if model_type not in IMAGE_TEXT_ARCHITECTURES:
        raise ValueError(f"{model_type!r} is not an image-text architecture the explainer knows")
    return LoadedVlm(model, processor, weights_digest, model_name, model_type)


@dataclass(frozen=True)
class RebuiltInputs:
    """A request's model inputs as the explainer's processor makes them."""

    prompt_ids: list[int]
    pixel_values: torch.Tensor  # [num_images, channels, height, width]
    pictures: list[Image.Image]  # as decoded, for their original sizes
    # Per picture, the index of the message that holds it.
    picture_messages: list[int]


def decode_pictures(images: Sequence[bytes]) -> list[Image.Image]:
    """The job's pictures as RGB images; a picture that does not decode is an invalid input (the gateway checked
    them, so this is a job that did not come from it)."""
    pictures = []
    for index, data in enumerate(images):
        try:
            with Image.open(io.BytesIO(data)) as opened:
                pictures.append(opened.convert("RGB"))
        except (OSError, SyntaxError, ValueError) as exc:
            raise InvalidInputError(f"picture {index} of the job does not decode: {str(exc)[:80]}") from exc
    return pictures


def rendered_messages(messages: Sequence[Mapping[str, Any]], placeholder: str) -> list[dict[str, str]]:
    """The messages with text content, as vLLM renders picture parts for a text chat template: a message's
    placeholders first, then its text parts, joined by newlines."""
    rendered = []
    for message in messages:
        parts = message["content"]
        placeholders = [placeholder for part in parts if part["type"] == "image"]
        texts = [str(part["text"]) for part in parts if part["type"] == "text"]
        rendered.append({"role": str(message["role"]), "content": "\n".join([*placeholders, "\n".join(texts)])})
    return rendered


def rebuild_inputs(
    vlm: LoadedVlm, messages: Sequence[Mapping[str, Any]], images: Sequence[bytes], served_prompt_ids: Sequence[int]
) -> RebuiltInputs:
    """The prompt ids and pixels of the request, made by the model's own processor from its messages and pictures;
    InvalidInputError unless the ids are those vLLM generated from."""
    pictures = decode_pictures(images)
    placeholders = sum(1 for message in messages for part in message["content"] if part["type"] == "image")
    if placeholders != len(pictures):
        raise InvalidInputError(f"the job's messages hold {placeholders} pictures but it carries {len(pictures)}")
    if not pictures:
        raise InvalidInputError(
            "this explainer holds an image-text model and explains requests with pictures only; send a picture"
        )
    picture_messages = [
        index for index, message in enumerate(messages) for part in message["content"] if part["type"] == "image"
    ]
    placeholder = str(vlm.processor.image_token)
    prompt = vlm.tokenizer.apply_chat_template(
        rendered_messages(messages, placeholder), tokenize=False, add_generation_prompt=True
    )
    inputs = vlm.processor(text=prompt, images=[[picture] for picture in pictures], return_tensors="pt")
    ids: list[int] = inputs["input_ids"][0].tolist()
    if ids != list(served_prompt_ids):
        differing = [i for i, (a, b) in enumerate(zip(ids, served_prompt_ids, strict=False)) if a != b]
        raise InvalidInputError(
            f"the explainer's processor renders this request as {len(ids)} prompt tokens, but vLLM generated from "
            f"{len(served_prompt_ids)}"
            + (f", differing first at positions {differing[:_SHOWN_DIFFERENCES]}" if differing else "")
            + ": the explainer's model files (processor, chat template) must be those vLLM serves"
        )
    # [batch 1, images, channels, height, width] for one picture per processed image (no tiling).
    pixel_values: torch.Tensor = inputs["pixel_values"].reshape(-1, *inputs["pixel_values"].shape[-3:])
    if pixel_values.shape[0] != len(pictures):
        raise InvalidInputError(
            f"the processor split {len(pictures)} pictures into {pixel_values.shape[0]} images; the image methods "
            "explain untiled pictures (do_image_splitting off)"
        )
    return RebuiltInputs(ids, pixel_values.to(vlm.model.dtype), pictures, picture_messages)  # type: ignore[arg-type]
