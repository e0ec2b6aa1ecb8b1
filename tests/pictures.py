"""The constructed VLM's ground truth: a coloured square on a white picture, and the question it answers from it."""

from __future__ import annotations

from PIL import Image, ImageDraw
from sightline.v1 import types_pb2

from explainers.constructed_vlm import CELL_PIXELS, COLOUR_RGB, IMAGE_SIZE

# The wording the 135M text model answers with one colour word (docs/multimodal.md).
QUESTION = "What color is the square? Answer with one word."
SQUARE_CELLS = 3  # the square covers 3 x 3 cells


def square_picture(colour: str, row: int, col: int) -> Image.Image:
    """A white picture with a square of `colour` covering cells row..row+2, col..col+2 of the 7 x 7 grid."""
    picture = Image.new("RGB", (IMAGE_SIZE, IMAGE_SIZE), COLOUR_RGB["white"])
    x0, y0 = col * CELL_PIXELS, row * CELL_PIXELS
    size = SQUARE_CELLS * CELL_PIXELS
    ImageDraw.Draw(picture).rectangle([x0, y0, x0 + size - 1, y0 + size - 1], fill=COLOUR_RGB[colour])
    return picture


def question_about(picture: bytes) -> types_pb2.ChatMessages:
    """The chat that asks QUESTION about `picture` (PNG or JPEG bytes), picture first, as raw protos."""
    message = types_pb2.ChatMessage(
        role="user",
        parts=[types_pb2.ContentPart(image=types_pb2.ImageData(data=picture)), types_pb2.ContentPart(text=QUESTION)],
    )
    return types_pb2.ChatMessages(messages=[message])
