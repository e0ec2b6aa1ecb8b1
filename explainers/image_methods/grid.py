"""The grid of cells an image attribution is reported on, and the image inputs the methods perturb.

A grid divides the processed picture (the pixels the vision tower sees, e.g. 224 x 224) into rows x cols cells whose
edges are at round(i * height / rows); the model's own patch grid is the grid of its image tokens (7 x 7 for the
constructed VLM: one token per 32 px cell). Clients draw a grid from its geometry alone.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


class ImageExplainError(ValueError):
    """A request the image methods cannot serve: a grid or baseline that does not fit the picture."""


@dataclass(frozen=True)
class CellGrid:
    rows: int
    cols: int
    height: int  # pixels of the processed picture the grid covers
    width: int

    def __post_init__(self) -> None:
        if not (1 <= self.rows <= self.height and 1 <= self.cols <= self.width):
            raise ImageExplainError(
                f"grid {self.rows}x{self.cols} does not fit a {self.height}x{self.width} picture: "
                "rows and cols must be between 1 and the picture's side"
            )

    @property
    def num_cells(self) -> int:
        return self.rows * self.cols

    def row_edges(self) -> list[int]:
        return [round(i * self.height / self.rows) for i in range(self.rows + 1)]

    def col_edges(self) -> list[int]:
        return [round(j * self.width / self.cols) for j in range(self.cols + 1)]

    def cell_masks(self) -> torch.Tensor:
        """Boolean masks [num_cells, height, width], row-major."""
        masks = torch.zeros(self.num_cells, self.height, self.width, dtype=torch.bool)
        rows, cols = self.row_edges(), self.col_edges()
        for r in range(self.rows):
            for c in range(self.cols):
                masks[r * self.cols + c, rows[r] : rows[r + 1], cols[c] : cols[c + 1]] = True
        return masks

    def pool(self, per_pixel: torch.Tensor) -> torch.Tensor:
        """Sum per-pixel scores [..., height, width] into cells [..., rows, cols]."""
        masks = self.cell_masks().to(per_pixel.dtype)
        pooled = torch.einsum("...hw,khw->...k", per_pixel, masks)
        return pooled.reshape(*per_pixel.shape[:-2], self.rows, self.cols)

    def pool_tokens(self, per_token: torch.Tensor, token_grid: CellGrid) -> torch.Tensor:
        """Scores per image token [..., token_grid.num_cells] summed into this grid's cells by each token cell's
        centre, for methods (attention, logit lens) that score tokens rather than pixels."""
        pooled = per_token.new_zeros(*per_token.shape[:-1], self.num_cells)
        row_edges, col_edges = self.row_edges(), self.col_edges()
        token_rows, token_cols = token_grid.row_edges(), token_grid.col_edges()
        for index in range(token_grid.num_cells):
            r, c = divmod(index, token_grid.cols)
            centre_y = (token_rows[r] + token_rows[r + 1]) / 2
            centre_x = (token_cols[c] + token_cols[c + 1]) / 2
            row = max(i for i in range(self.rows) if row_edges[i] <= centre_y)
            col = max(j for j in range(self.cols) if col_edges[j] <= centre_x)
            pooled[..., row * self.cols + col] += per_token[..., index]
        return pooled.reshape(*per_token.shape[:-1], self.rows, self.cols)


def blurred(pixel_values: torch.Tensor, radius: int = 8) -> torch.Tensor:
    """A box-blurred copy of pixel values [..., channels, height, width] (a blurred baseline keeps the picture's
    colours but removes its detail), same shape; edges are padded by replication."""
    if radius < 1:
        raise ImageExplainError(f"blur radius must be at least 1 pixel, got {radius}")
    shape = pixel_values.shape
    flat = pixel_values.reshape(-1, 1, shape[-2], shape[-1])
    size = 2 * radius + 1
    padded = torch.nn.functional.pad(flat, (radius, radius, radius, radius), mode="replicate")
    kernel = torch.full((1, 1, size, size), 1.0 / (size * size), dtype=flat.dtype)
    return torch.nn.functional.conv2d(padded, kernel).reshape(shape)
