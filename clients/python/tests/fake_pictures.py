"""What the fake gateway answers about pictures: for a request whose chat holds pictures, an "occlusion" result that
scores each picture's cells (and no tokens), on the grid the spec asks for (7 x 7 by default) over a picture the
model saw at 224 x 224, with the picture/text split of its attribution.

Target 0's strongest cell is HOT_CELL_0 (+0.875), target 1's is (0, 0) (-0.75); every other cell scores
(row * cols + col) / 1024, and the cells of later pictures half that, so picture 0 always ranks first. All values
are exact in float32.
"""

from __future__ import annotations

import hashlib
import io

from PIL import Image
from sightline.v1 import inference_pb2, types_pb2

SEEN_SIZE = 224
DEFAULT_GRID = 7
HOT_SCORES = (0.875, -0.75)
IMAGE_SHARE = [0.75, 0.25]
TEXT_SHARE = [0.25, 0.75]


def hot_cell(target_index: int, rows: int, cols: int) -> tuple[int, int]:
    return (rows // 2, cols - 1) if target_index == 0 else (0, 0)


def cell_score(target_index: int, image_index: int, row: int, col: int, rows: int, cols: int) -> float:
    if image_index == 0 and (row, col) == hot_cell(target_index, rows, cols):
        return HOT_SCORES[target_index]
    return (row * cols + col) / 1024 / (1 + image_index)


def pictures_of(request: inference_pb2.GenerateRequest) -> list[bytes]:
    return [
        part.image.data
        for message in request.input.chat.messages
        for part in message.parts
        if part.WhichOneof("part") == "image"
    ]


def attach_picture_results(explanation: types_pb2.Explanation | None, request: inference_pb2.GenerateRequest) -> None:
    pictures = pictures_of(request)
    if explanation is None or not pictures:
        return
    rows = request.explain.images.grid_rows or DEFAULT_GRID
    cols = request.explain.images.grid_cols or DEFAULT_GRID
    targets = len(explanation.target_positions)
    occlusion = explanation.results.add(method="occlusion", seconds=0.125)
    for image_index, data in enumerate(pictures):
        width, height = Image.open(io.BytesIO(data)).size
        explanation.image_grids.add(
            image_index=image_index,
            rows=rows,
            cols=cols,
            height=SEEN_SIZE,
            width=SEEN_SIZE,
            row_edges=[round(i * SEEN_SIZE / rows) for i in range(rows + 1)],
            col_edges=[round(i * SEEN_SIZE / cols) for i in range(cols + 1)],
            original_height=height,
            original_width=width,
            digest=hashlib.sha256(data).hexdigest(),
        )
        scores = [
            cell_score(target, image_index, row, col, rows, cols)
            for target in range(targets)
            for row in range(rows)
            for col in range(cols)
        ]
        occlusion.image_attributions.add(
            image_index=image_index,
            cells=types_pb2.Tensor(dtype=types_pb2.DTYPE_FLOAT32, shape=[targets, rows, cols], float_values=scores),
        )
    occlusion.modality.image.extend(IMAGE_SHARE[:targets])
    occlusion.modality.text.extend(TEXT_SHARE[:targets])
