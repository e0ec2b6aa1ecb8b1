"""The gateway's picture checks: every limit refuses with INVALID_ARGUMENT naming it, a good picture passes with its
format, size and digest, and different pictures never share a digest."""

from __future__ import annotations

import io
import struct
import zlib

import grpc
import pytest
from PIL import Image

from server.errors import GatewayError
from server.images import ImageLimits, check_image, check_images


def encoded(size: tuple[int, int] = (32, 24), colour: tuple[int, int, int] = (255, 0, 0), kind: str = "PNG") -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, colour).save(buffer, kind)
    return buffer.getvalue()


DEFAULT_LIMITS = ImageLimits()


def refused(data: bytes, limits: ImageLimits = DEFAULT_LIMITS) -> str:
    with pytest.raises(GatewayError) as caught:
        check_image(data, "input.chat.messages[0].parts[1].image", limits)
    assert caught.value.code == grpc.StatusCode.INVALID_ARGUMENT
    message = caught.value.message
    assert "input.chat.messages[0].parts[1].image" in message
    return message


def test_png_and_jpeg_pass_with_their_geometry_and_digest() -> None:
    png = check_image(encoded(), "f", ImageLimits())
    assert (png.format, png.width, png.height) == ("png", 32, 24)
    assert png.data_url.startswith("data:image/png;base64,")
    jpeg = check_image(encoded(kind="JPEG"), "f", ImageLimits())
    assert jpeg.format == "jpeg" and jpeg.data_url.startswith("data:image/jpeg;base64,")
    assert png.digest != jpeg.digest


def test_each_limit_is_named() -> None:
    assert "SIGHTLINE_MAX_IMAGE_BYTES" in refused(encoded(), ImageLimits(max_image_bytes=10))
    assert "SIGHTLINE_MAX_IMAGE_PIXELS" in refused(encoded((100, 100)), ImageLimits(max_image_pixels=9_999))
    assert "SIGHTLINE_IMAGE_FORMATS" in refused(encoded(kind="JPEG"), ImageLimits(formats=("png",)))
    gif = io.BytesIO()
    Image.new("RGB", (4, 4)).save(gif, "GIF")
    assert "not a PNG or JPEG" in refused(gif.getvalue())
    with pytest.raises(GatewayError, match="SIGHTLINE_MAX_IMAGES") as caught:
        check_images([("a", encoded()), ("b", encoded())], ImageLimits(max_images=1))
    assert caught.value.code == grpc.StatusCode.INVALID_ARGUMENT


def test_truncated_and_corrupt_pictures_are_refused() -> None:
    whole = encoded((64, 64), kind="JPEG")
    assert "truncated or corrupt" in refused(whole[: len(whole) // 2])
    png = encoded((64, 64))
    assert "truncated or corrupt" in refused(png[: len(png) - 30])
    assert "truncated or corrupt" in refused(png[:8] + b"\x00" * 40)


def claiming(width: int, height: int) -> bytes:
    """A small PNG whose header claims width x height pixels (IHDR rewritten, its CRC recomputed)."""
    data = bytearray(encoded((4, 4)))
    data[16:24] = struct.pack(">II", width, height)
    data[29:33] = struct.pack(">I", zlib.crc32(bytes(data[12:29])))
    return bytes(data)


def test_the_pixel_limit_is_checked_before_decoding() -> None:
    # Headers claiming many pixels over a few bytes of data: refused on their size, never decoded.
    assert "SIGHTLINE_MAX_IMAGE_PIXELS" in refused(claiming(5_000, 5_000), ImageLimits(max_image_pixels=1_000_000))
    assert "25,000,000 pixels" in refused(claiming(5_000, 5_000), ImageLimits(max_image_pixels=1_000_000))
    assert "SIGHTLINE_MAX_IMAGE_PIXELS" in refused(claiming(30_000, 30_000))


def test_digests_tell_pictures_apart() -> None:
    red = check_image(encoded(), "a", ImageLimits())
    blue = check_image(encoded(colour=(0, 0, 255)), "b", ImageLimits())
    assert red.digest != blue.digest and len(red.digest) == 64
    assert check_image(encoded(), "c", ImageLimits()).digest == red.digest


def test_limits_from_the_environment() -> None:
    limits = ImageLimits.from_env(
        {"SIGHTLINE_MAX_IMAGES": "2", "SIGHTLINE_MAX_IMAGE_BYTES": "1000", "SIGHTLINE_IMAGE_FORMATS": "PNG"}
    )
    assert (limits.max_images, limits.max_image_bytes, limits.formats) == (2, 1000, ("png",))
    with pytest.raises(ValueError, match="not supported"):
        ImageLimits(formats=("gif",))
