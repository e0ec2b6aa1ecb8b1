"""Explanations of requests with pictures: the grid each picture was explained on, each method's score per cell
for every explained token, how attribution split between the pictures and the text, and the strongest cells.

A grid is given in the pixels of the picture as the model saw it (after its processor resized it); ``ImageGrid``
scales a cell's box to the picture as it was sent, so a client can draw on the original.
"""

from __future__ import annotations

import itertools
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import NamedTuple, Protocol

from sightline.matrix import Matrix
from sightline.v1 import types_pb2


class Box(NamedTuple):
    """A rectangle of pixels, half-open: columns ``left`` to ``right - 1``, rows ``top`` to ``bottom - 1``."""

    left: int
    top: int
    right: int
    bottom: int


class Cell(NamedTuple):
    """One cell of a picture's grid with one method's score for one explained token."""

    image_index: int
    row: int
    col: int
    box: Box
    """The cell's pixels in the picture as it was sent."""
    score: float


@dataclass(frozen=True)
class ImageGrid:
    """The grid one picture's attributions are reported on (see the ``ImageGrid`` message)."""

    image_index: int
    rows: int
    cols: int
    height: int
    """Height in pixels of the picture the model saw."""
    width: int
    row_edges: tuple[int, ...]
    """The ``rows + 1`` horizontal cell edges, in the pixels the model saw, from 0 to ``height``."""
    col_edges: tuple[int, ...]
    original_height: int
    """Height in pixels of the picture as sent."""
    original_width: int
    digest: str
    """sha256 of the picture's bytes as sent, hex."""

    def __post_init__(self) -> None:
        if self.rows < 1 or self.cols < 1:
            raise ValueError(f"picture {self.image_index}'s grid has {self.rows} x {self.cols} cells")
        for name, edges, cells, size in (
            ("row", self.row_edges, self.rows, self.height),
            ("column", self.col_edges, self.cols, self.width),
        ):
            ascending = all(a < b for a, b in itertools.pairwise(edges))
            if len(edges) != cells + 1 or edges[0] != 0 or edges[-1] != size or not ascending:
                raise ValueError(
                    f"picture {self.image_index}'s {name} edges {list(edges)[:8]} do not split 0..{size} into {cells}"
                )
        if self.original_height < 1 or self.original_width < 1:
            raise ValueError(
                f"picture {self.image_index}'s original size {self.original_width}x{self.original_height} is empty"
            )

    @classmethod
    def from_proto(cls, grid: types_pb2.ImageGrid) -> ImageGrid:
        return cls(
            image_index=grid.image_index,
            rows=grid.rows,
            cols=grid.cols,
            height=grid.height,
            width=grid.width,
            row_edges=tuple(grid.row_edges),
            col_edges=tuple(grid.col_edges),
            original_height=grid.original_height,
            original_width=grid.original_width,
            digest=grid.digest,
        )

    def seen_box(self, row: int, col: int) -> Box:
        """Cell (``row``, ``col``) in the pixels of the picture as the model saw it."""
        if not (0 <= row < self.rows and 0 <= col < self.cols):
            raise IndexError(f"cell ({row}, {col}) is outside the {self.rows} x {self.cols} grid")
        return Box(self.col_edges[col], self.row_edges[row], self.col_edges[col + 1], self.row_edges[row + 1])

    def box(self, row: int, col: int) -> Box:
        """Cell (``row``, ``col``) in the pixels of the picture as it was sent: its edges scaled by original/seen."""
        seen = self.seen_box(row, col)
        x_scale, y_scale = self.original_width / self.width, self.original_height / self.height
        return Box(
            round(seen.left * x_scale),
            round(seen.top * y_scale),
            round(seen.right * x_scale),
            round(seen.bottom * y_scale),
        )


@dataclass(frozen=True)
class ModalityShare:
    """How one method's absolute attribution split between the pictures and the text, per explained token."""

    image: tuple[float, ...]
    """The pictures' share (all cells of all pictures), in [0, 1], one per explained token."""
    text: tuple[float, ...]
    """The text tokens' share (1 - image)."""

    @classmethod
    def from_proto(cls, share: types_pb2.ModalityShare) -> ModalityShare | None:
        if not share.image and not share.text:
            return None
        if len(share.image) != len(share.text):
            raise ValueError(f"modality share has {len(share.image)} image and {len(share.text)} text values")
        return cls(tuple(share.image), tuple(share.text))


def image_attributions(attributions: Sequence[types_pb2.ImageAttribution]) -> dict[int, Matrix]:
    """Each picture's cells ``[targets, rows, cols]`` by picture index."""
    cells: dict[int, Matrix] = {}
    for attribution in attributions:
        if attribution.image_index in cells:
            raise ValueError(f"two cell tensors for picture {attribution.image_index}")
        cells[attribution.image_index] = Matrix.from_proto(attribution.cells)
    return cells


class ScoresPictures(Protocol):
    """What the accessors below read of a method's result (``sightline.types.MethodResult``)."""

    @property
    def image_attributions(self) -> Mapping[int, Matrix]: ...

    @property
    def modality(self) -> ModalityShare | None: ...


class ImageResults:
    """The image accessors of ``sightline.types.Explanation``, which these attributes are fields of."""

    image_grids: tuple[ImageGrid, ...]
    results: Mapping[str, ScoresPictures]
    target_positions: tuple[int, ...]

    @property
    def image_methods(self) -> list[str]:
        """Names of the results that score picture cells, in result order."""
        return [name for name, result in self.results.items() if result.image_attributions]

    def image_grid(self, image_index: int = 0) -> ImageGrid:
        """The grid of picture ``image_index`` (its index among the request's pictures)."""
        if not 0 <= image_index < len(self.image_grids):
            raise IndexError(f"no picture {image_index}; the explanation has {len(self.image_grids)}")
        return self.image_grids[image_index]

    def image_cells(self, target_index: int, method: str | None = None, image_index: int = 0) -> list[list[float]]:
        """The scores of picture ``image_index``'s cells, ``[rows][cols]``, for explained token ``target_index``,
        by ``method`` (default: the first that scores pictures)."""
        grid = self.image_grid(image_index)
        cells = self._cells(self._image_method(method), image_index)
        return [[float(score) for score in cells.row(target_index, row)] for row in range(grid.rows)]

    def top_cells(
        self, target_index: int, k: int = 5, method: str | None = None, image_index: int | None = None
    ) -> list[Cell]:
        """The ``k`` cells that most influenced explained token ``target_index``, strongest first, by absolute
        score (scores keep their sign); over every picture unless ``image_index`` names one. Ties keep the earlier
        picture, then row, then column first."""
        if k < 1:
            raise ValueError(f"k must be at least 1, got {k}")
        name = self._image_method(method)
        pictures = range(len(self.image_grids)) if image_index is None else [self.image_grid(image_index).image_index]
        cells = [
            Cell(index, row, col, grid.box(row, col), score)
            for index in pictures
            if index in self.results[name].image_attributions
            for grid in [self.image_grids[index]]
            for row, scores in enumerate(self.image_cells(target_index, name, index))
            for col, score in enumerate(scores)
        ]
        return sorted(cells, key=lambda cell: abs(cell.score), reverse=True)[:k]

    def modality(self, method: str | None = None) -> ModalityShare:
        """The picture/text split of ``method``'s attribution per explained token (default: the first method that
        reports one)."""
        if method is None:
            method = next((name for name, result in self.results.items() if result.modality is not None), None)
            if method is None:
                raise ValueError(f"no result reports a modality share; results: {sorted(self.results)}")
        share = self._result(method).modality
        if share is None:
            raise ValueError(f"method {method!r} reports no modality share")
        return share

    def check_image_results(self) -> None:
        """Check that the grids are in picture order and every method's cells and shares fit them and the targets."""
        targets = len(self.target_positions)
        for position, grid in enumerate(self.image_grids):
            if grid.image_index != position:
                raise ValueError(f"image grid {position} is for picture {grid.image_index}")
        for name, result in self.results.items():
            for index, cells in result.image_attributions.items():
                if not 0 <= index < len(self.image_grids):
                    raise ValueError(f"{name!r} scores picture {index}; the explanation has {len(self.image_grids)}")
                grid = self.image_grids[index]
                if cells.shape != (targets, grid.rows, grid.cols):
                    raise ValueError(
                        f"{name!r} cells of picture {index} have shape {cells.shape}, expected"
                        f" {(targets, grid.rows, grid.cols)} for {targets} targets"
                    )
            if result.modality is not None and len(result.modality.image) != targets:
                raise ValueError(
                    f"{name!r} modality share has {len(result.modality.image)} values for {targets} targets"
                )

    def _image_method(self, method: str | None) -> str:
        if method is None:
            methods = self.image_methods
            if not methods:
                raise ValueError(f"no result scores picture cells; results: {sorted(self.results)}")
            return methods[0]
        if not self._result(method).image_attributions:
            raise ValueError(f"method {method!r} scores no picture cells")
        return method

    def _result(self, method: str) -> ScoresPictures:
        try:
            return self.results[method]
        except KeyError:
            raise KeyError(f"no result for method {method!r}; results: {sorted(self.results)}") from None

    def _cells(self, method: str, image_index: int) -> Matrix:
        cells = self._result(method).image_attributions.get(image_index)
        if cells is None:
            raise ValueError(f"method {method!r} scores no cells of picture {image_index}")
        return cells
