"""The command line's part for pictures: the grid flag, the top cells of each explained token with the picture/text
split, and the overlay written with ``--overlay``."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from sightline.image_results import ImageGrid, ModalityShare
from sightline.types import Explanation


def add_image_flags(generation: argparse.ArgumentParser, options: argparse._ArgumentGroup) -> None:
    """``--image-grid`` among the explanation options; ``--overlay`` and ``--overlay-token`` on generation."""
    options.add_argument(
        "--image-grid",
        type=grid_size,
        metavar="ROWSxCOLS",
        help="score each picture on a ROWS x COLS grid of cells (default: the model's own, a cell per image token)",
    )
    generation.add_argument(
        "--overlay",
        type=Path,
        metavar="PNG",
        help="with --image and --explain: write a heatmap of the first picture's cell scores over it to PNG",
    )
    generation.add_argument(
        "--overlay-token",
        type=int,
        default=0,
        metavar="I",
        help="which explained token the overlay is for (0 is the first explained; default %(default)s)",
    )


def grid_size(text: str) -> tuple[int, int]:
    rows, _, cols = text.lower().partition("x")
    try:
        size = int(rows), int(cols)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected ROWSxCOLS such as 4x4, got {text!r}") from None
    if min(size) < 1:
        raise argparse.ArgumentTypeError(f"a grid needs at least 1 row and 1 column, got {text!r}")
    return size


def overlay_problem(args: argparse.Namespace) -> str | None:
    """Why the --overlay flags cannot work as given, before any call; None when they can."""
    if args.overlay is None:
        return None
    if not args.images or not args.explain:
        return "--overlay draws an explanation over a picture: it needs --image PATH and --explain METHOD"
    if args.async_explain and not args.wait:
        return "--overlay needs the explanation itself: leave out --async, or add --wait"
    if args.json:
        return "--overlay and --json do not go together"
    return None


def print_image_cells(explanation: Explanation, top: int) -> None:
    """Each explained token's ``top`` strongest cells (over every picture) by the first method that scores
    pictures, with each cell's pixels in the picture as sent, and the method's picture/text split."""
    methods = explanation.image_methods
    if not methods:
        return
    method = methods[0]
    several = len(explanation.image_grids) > 1
    grids = "; ".join(_grid_text(grid, several) for grid in explanation.image_grids)
    print(f"{method}: top {top} picture cells of each explained token, by |score| ({grids})")
    share = explanation.results[method].modality
    width = len(str(len(explanation.tokens)))
    for target_index, position in enumerate(explanation.target_positions):
        print(f"  [{position:>{width}}] {explanation.tokens[position].text!r}{_share_text(share, target_index)}")
        for cell in explanation.top_cells(target_index, top, method):
            picture = f"picture {cell.image_index} " if several else ""
            left, top_edge, right, bottom = cell.box
            print(
                f"      {picture}row {cell.row} col {cell.col}  x {left}:{right} y {top_edge}:{bottom}"
                f"  {cell.score:+.4f}"
            )


def write_overlay(explanation: Explanation | None, args: argparse.Namespace) -> int:
    """Write the overlay ``--overlay`` asks for; 1 (with the reason on stderr) when it cannot be drawn."""
    from sightline.overlay import overlay_png

    if explanation is None:
        print("error: --overlay: no explanation came back to draw (`stream --async` does not wait)", file=sys.stderr)
        return 1
    if not explanation.image_methods:
        print("error: --overlay: the explanation has no picture cells to draw", file=sys.stderr)
        return 1
    try:
        png = overlay_png(explanation, args.images[0], args.overlay_token)
    except (ImportError, ValueError, IndexError) as error:
        print(f"error: --overlay: {error}", file=sys.stderr)
        return 1
    args.overlay.write_bytes(png)
    print(
        f"overlay of {explanation.image_methods[0]} for explained token {args.overlay_token} written to {args.overlay}"
    )
    return 0


def _grid_text(grid: ImageGrid, several: bool) -> str:
    picture = f"picture {grid.image_index}: " if several else ""
    return f"{picture}{grid.rows}x{grid.cols} cells over {grid.original_width}x{grid.original_height} px"


def _share_text(share: ModalityShare | None, target_index: int) -> str:
    if share is None:
        return ""
    return f"  picture {share.image[target_index]:.0%} / text {share.text[target_index]:.0%}"
