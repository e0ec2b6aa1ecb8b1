"""Pictures in chat messages: a message's content may be a list mixing text (str) with pictures, each given as its
encoded bytes (PNG or JPEG), a file path (pathlib.Path) or a PIL image (sent as PNG; PIL itself is not a dependency
of this package, any object with PIL's ``save(fp, format)`` works)."""

from __future__ import annotations

import io
import os
from collections.abc import Sequence
from typing import Protocol, TypeAlias, runtime_checkable

from sightline.v1 import types_pb2


@runtime_checkable
class SavesImage(Protocol):
    """What the SDK needs of a PIL image."""

    def save(self, fp: io.BytesIO, format: str) -> None: ...


ImageInput: TypeAlias = bytes | os.PathLike[str] | SavesImage
ContentPart: TypeAlias = str | ImageInput


def image_bytes(image: ImageInput) -> bytes:
    """The encoded bytes of a picture given as bytes, a path or a PIL image."""
    if isinstance(image, bytes | bytearray):
        return bytes(image)
    if isinstance(image, os.PathLike):
        with open(image, "rb") as fh:
            return fh.read()
    if isinstance(image, SavesImage):
        buffer = io.BytesIO()
        image.save(buffer, format="PNG")
        return buffer.getvalue()
    raise TypeError(f"a picture is bytes, a pathlib.Path or a PIL image, not {type(image).__name__}")


def content_parts(parts: Sequence[ContentPart]) -> list[types_pb2.ContentPart]:
    """A message's content parts in order: each str is text, anything else a picture."""
    return [
        types_pb2.ContentPart(text=part)
        if isinstance(part, str)
        else types_pb2.ContentPart(image=types_pb2.ImageData(data=image_bytes(part)))
        for part in parts
    ]
