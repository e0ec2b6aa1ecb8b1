"""A heatmap of one method's cell scores for one explained token, drawn over the picture as it was sent.

Needs Pillow, an optional extra of the SDK: ``pip install 'sightline-client[images]'``.
"""

from __future__ import annotations

import hashlib
import io
import os
from typing import Any

from sightline.image_results import ImageResults
from sightline.images import ImageInput, image_bytes

# Cells that raise the explained token's score are drawn red, those that lower it blue.
POSITIVE_RGB = (255, 0, 0)
NEGATIVE_RGB = (0, 0, 255)
PILLOW_HINT = "pip install 'sightline-client[images]'"


def overlay_png(
    explanation: ImageResults,
    picture: ImageInput,
    target_index: int = 0,
    *,
    method: str | None = None,
    image_index: int = 0,
    opacity: float = 0.6,
) -> bytes:
    """A PNG of ``picture`` with each cell of its grid tinted by ``method``'s score for explained token
    ``target_index``: the strongest cell at ``opacity``, the others in proportion to their absolute score.

    ``picture`` is the picture as it was sent (bytes, a path or a PIL image); bytes and paths are checked against
    the grid's digest, so a heatmap is never drawn over another picture. Cells are drawn at their boxes in the
    original picture (``ImageGrid.box``), scaled from the size the model saw.
    """
    if not 0.0 <= opacity <= 1.0:
        raise ValueError(f"opacity must be between 0 and 1, got {opacity}")
    grid = explanation.image_grid(image_index)
    scores = explanation.image_cells(target_index, method, image_index)
    data = image_bytes(picture)
    sent_as_is = isinstance(picture, bytes | bytearray | os.PathLike)  # a PIL image is re-encoded: no digest check
    if sent_as_is and grid.digest and hashlib.sha256(data).hexdigest() != grid.digest:
        raise ValueError(f"this is not picture {image_index} of the explanation: its sha256 differs from the grid's")
    image, draw = _pillow()
    base = image.open(io.BytesIO(data)).convert("RGBA")
    if base.size != (grid.original_width, grid.original_height):
        raise ValueError(
            f"the picture is {base.size[0]}x{base.size[1]}; picture {image_index} of the explanation was"
            f" {grid.original_width}x{grid.original_height}"
        )
    peak = max(abs(score) for row in scores for score in row)
    layer = image.new("RGBA", base.size, (0, 0, 0, 0))
    pen = draw.Draw(layer)
    for row, row_scores in enumerate(scores):
        for col, score in enumerate(row_scores):
            alpha = round(255 * opacity * abs(score) / peak) if peak > 0 else 0
            box = grid.box(row, col)
            if alpha and box.right > box.left and box.bottom > box.top:
                colour = POSITIVE_RGB if score >= 0 else NEGATIVE_RGB
                pen.rectangle((box.left, box.top, box.right - 1, box.bottom - 1), fill=(*colour, alpha))
    buffer = io.BytesIO()
    image.alpha_composite(base, layer).convert("RGB").save(buffer, format="PNG")
    return buffer.getvalue()


def _pillow() -> tuple[Any, Any]:
    """PIL's Image and ImageDraw modules, or an ImportError saying which extra brings them."""
    try:
        from PIL import Image, ImageDraw
    except ImportError as error:
        raise ImportError(f"drawing an overlay needs Pillow: {PILLOW_HINT}") from error
    return Image, ImageDraw
