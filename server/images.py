"""Pictures in chat messages: the gateway checks each against configurable limits before anything reaches vLLM, and
names what it checked (format, size, digest) for the forwarding and the explanation's cache key.

A picture is refused with INVALID_ARGUMENT naming the limit it breaks: too many pictures in one request, too many
bytes, a format that is not allowed (PNG and JPEG by default, told by their magic bytes, not by what the client
says), too many pixels (checked from the header, before decoding, so a decompression bomb is never expanded), or a
file that does not decode in full (truncated or corrupt).
"""

from __future__ import annotations

import base64
import hashlib
import io
import warnings
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from sightline.v1 import types_pb2

from server.errors import GatewayError, invalid_argument

# Magic bytes of the formats a picture may have, by the name the limits and messages use.
MAGIC: dict[str, bytes] = {"png": b"\x89PNG\r\n\x1a\n", "jpeg": b"\xff\xd8\xff"}
MEDIA_TYPES: dict[str, str] = {"png": "image/png", "jpeg": "image/jpeg"}


@dataclass(frozen=True)
class ImageLimits:
    """Per-request limits on pictures (environment: SIGHTLINE_MAX_IMAGES, SIGHTLINE_MAX_IMAGE_BYTES,
    SIGHTLINE_MAX_IMAGE_PIXELS, SIGHTLINE_IMAGE_FORMATS as a comma-separated list)."""

    max_images: int = 4
    max_image_bytes: int = 4 * 1024 * 1024
    max_image_pixels: int = 4096 * 4096
    formats: tuple[str, ...] = ("png", "jpeg")

    def __post_init__(self) -> None:
        unknown = [name for name in self.formats if name not in MAGIC]
        if unknown:
            raise ValueError(f"image formats {unknown} are not supported; choose from {sorted(MAGIC)}")
        if min(self.max_images, self.max_image_bytes, self.max_image_pixels) < 1:
            raise ValueError("image limits must be positive")

    @classmethod
    def from_env(cls, env: Mapping[str, str]) -> ImageLimits:
        formats = env.get("SIGHTLINE_IMAGE_FORMATS")
        return cls(
            max_images=int(env.get("SIGHTLINE_MAX_IMAGES", cls.max_images)),
            max_image_bytes=int(env.get("SIGHTLINE_MAX_IMAGE_BYTES", cls.max_image_bytes)),
            max_image_pixels=int(env.get("SIGHTLINE_MAX_IMAGE_PIXELS", cls.max_image_pixels)),
            formats=tuple(f.strip().lower() for f in formats.split(",") if f.strip()) if formats else cls.formats,
        )


@dataclass(frozen=True)
class CheckedImage:
    """A picture that passed the limits."""

    data: bytes
    format: str  # a key of MAGIC
    width: int
    height: int

    @property
    def digest(self) -> str:
        """sha256 of the bytes as sent: what the hidden-state cache key and the audit record name."""
        return hashlib.sha256(self.data).hexdigest()

    @property
    def data_url(self) -> str:
        """As OpenAI-style chat content (vLLM's image_url part) carries it."""
        return f"data:{MEDIA_TYPES[self.format]};base64,{base64.b64encode(self.data).decode()}"


def _format_of(data: bytes) -> str | None:
    return next((name for name, magic in MAGIC.items() if data.startswith(magic)), None)


def check_image(data: bytes, field: str, limits: ImageLimits) -> CheckedImage:
    """The picture in `data`, or INVALID_ARGUMENT naming `field` and the limit it breaks."""
    # Imported here: only requests with pictures pay for Pillow's import.
    from PIL import Image

    if len(data) > limits.max_image_bytes:
        raise invalid_argument(
            f"{field} is {len(data):,} bytes; the limit is {limits.max_image_bytes:,} bytes per image "
            "(SIGHTLINE_MAX_IMAGE_BYTES)"
        )
    kind = _format_of(data)
    if kind is None or kind not in limits.formats:
        named = f"a {kind.upper()} file" if kind else "not a PNG or JPEG file (by its first bytes)"
        raise invalid_argument(
            f"{field} is {named}; allowed image formats: {', '.join(limits.formats)} (SIGHTLINE_IMAGE_FORMATS)"
        )
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            picture = Image.open(io.BytesIO(data), formats=[kind.upper()])
            width, height = picture.size
            if width * height > limits.max_image_pixels:
                raise invalid_argument(
                    f"{field} is {width}x{height} = {width * height:,} pixels; the limit is "
                    f"{limits.max_image_pixels:,} pixels per image (SIGHTLINE_MAX_IMAGE_PIXELS)"
                )
            picture.load()
    except GatewayError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        # Pillow's own guard fires on opening when the header claims far more pixels than any limit here.
        raise invalid_argument(
            f"{field} claims more pixels than the limit of {limits.max_image_pixels:,} per image "
            f"(SIGHTLINE_MAX_IMAGE_PIXELS): {str(exc)[:60]}"
        ) from exc
    except (OSError, SyntaxError, ValueError) as exc:
        raise invalid_argument(
            f"{field} does not decode as a whole {kind.upper()} image (truncated or corrupt: {str(exc)[:80]})"
        ) from exc
    return CheckedImage(data=data, format=kind, width=width, height=height)


def check_images(images: list[tuple[str, bytes]], limits: ImageLimits) -> list[CheckedImage]:
    """Every (field, bytes) of one request checked, the count first so a flood is refused before any decoding."""
    if len(images) > limits.max_images:
        raise invalid_argument(
            f"the request has {len(images)} images; the limit is {limits.max_images} per request (SIGHTLINE_MAX_IMAGES)"
        )
    return [check_image(data, field, limits) for field, data in images]


@dataclass(frozen=True)
class ImagePrompt:
    """Chat messages holding pictures, as vLLM's chat endpoint takes them (text and image_url parts), and the
    checked pictures in order. Generated through /v1/chat/completions: a token-id prompt cannot carry pictures."""

    messages: list[dict[str, Any]]
    images: list[CheckedImage]


def has_images(chat: types_pb2.ChatMessages) -> bool:
    return any(part.WhichOneof("part") == "image" for message in chat.messages for part in message.parts)


def image_prompt(chat: types_pb2.ChatMessages, roles: tuple[str, ...], limits: ImageLimits) -> ImagePrompt:
    """The chat with its pictures checked (count first), or INVALID_ARGUMENT naming the field and limit."""
    fields = [
        (f"input.chat.messages[{m}].parts[{p}].image", part.image.data)
        for m, message in enumerate(chat.messages)
        for p, part in enumerate(message.parts)
        if part.WhichOneof("part") == "image"
    ]
    images = check_images(fields, limits)
    checked = iter(images)
    messages: list[dict[str, Any]] = []
    for index, message in enumerate(chat.messages):
        if message.role not in roles:
            raise invalid_argument(f"input.chat.messages[{index}].role must be one of {', '.join(roles)}")
        content: list[dict[str, Any]] = [{"type": "text", "text": message.content}] if message.content else []
        for part in message.parts:
            if part.WhichOneof("part") == "image":
                content.append({"type": "image_url", "image_url": {"url": next(checked).data_url}})
            elif part.text:
                content.append({"type": "text", "text": part.text})
        messages.append({"role": message.role, "content": content})
    return ImagePrompt(messages, images)
