// Picture cells of an explanation of a request with pictures: each cell's box in the picture as it was sent, and
// the strongest cells for an explained token, as the Python SDK's ImageGrid.box and top_cells compute them.
import type { Explanation } from "./explanation.js";
import type { ImageGrid } from "./gen/sightline/v1/types_pb.js";
import { Matrix } from "./matrix.js";

/** A rectangle of pixels, half-open: columns `left` to `right - 1`, rows `top` to `bottom - 1`. */
export interface Box {
  readonly left: number;
  readonly top: number;
  readonly right: number;
  readonly bottom: number;
}

/** One cell of a picture's grid with one method's score for one explained token. */
export interface Cell {
  readonly imageIndex: number;
  readonly row: number;
  readonly col: number;
  /** The cell's pixels in the picture as it was sent. */
  readonly box: Box;
  readonly score: number;
}

/** Round half to even, as Python's round() does, so that every SDK draws the same boxes. */
function roundHalfEven(value: number): number {
  const floor = Math.floor(value);
  const fraction = value - floor;
  if (fraction !== 0.5) return Math.round(value);
  return floor % 2 === 0 ? floor : floor + 1;
}

/** Cell (`row`, `col`) of `grid` in the pixels of the picture as sent: its edges scaled by original/seen. */
export function cellBox(grid: ImageGrid, row: number, col: number): Box {
  if (!(row >= 0 && row < grid.rows && col >= 0 && col < grid.cols)) {
    throw new RangeError(`cell (${row}, ${col}) is outside the ${grid.rows} x ${grid.cols} grid`);
  }
  if (grid.rowEdges.length !== grid.rows + 1 || grid.colEdges.length !== grid.cols + 1 || grid.width < 1 || grid.height < 1) {
    throw new RangeError(`picture ${grid.imageIndex}'s grid edges do not fit its ${grid.rows} x ${grid.cols} cells`);
  }
  const x = grid.originalWidth / grid.width;
  const y = grid.originalHeight / grid.height;
  return {
    left: roundHalfEven(grid.colEdges[col]! * x),
    top: roundHalfEven(grid.rowEdges[row]! * y),
    right: roundHalfEven(grid.colEdges[col + 1]! * x),
    bottom: roundHalfEven(grid.rowEdges[row + 1]! * y),
  };
}

/**
 * The `k` picture cells that most influenced explained token `targetIndex`, over every picture, strongest first by
 * absolute score (scores keep their sign; ties keep the earlier picture, row, then column first), by `method`'s
 * cells (default: the first result that scores pictures).
 */
export function topCells(explanation: Explanation, targetIndex: number, k = 5, method?: string): Cell[] {
  if (!(k >= 1)) throw new RangeError(`k must be at least 1, got ${k}`);
  const raw = explanation.raw;
  const result = raw.results.find((r) => (method === undefined ? r.imageAttributions.length > 0 : r.method === method));
  if (result === undefined || result.imageAttributions.length === 0) {
    const names = raw.results.map((r) => r.method).join(", ");
    throw new RangeError(
      method === undefined ? `no result scores picture cells; results: ${names}` : `method '${method}' scores no picture cells`,
    );
  }
  const cells: Cell[] = [];
  for (const attribution of result.imageAttributions) {
    const grid = raw.imageGrids[attribution.imageIndex];
    if (grid === undefined || attribution.cells === undefined) {
      throw new RangeError(`'${result.method}' scores picture ${attribution.imageIndex}; the explanation has ${raw.imageGrids.length}`);
    }
    const scores = Matrix.fromProto(attribution.cells);
    const [targets, rows, cols] = scores.shape;
    if (scores.shape.length !== 3 || rows !== grid.rows || cols !== grid.cols || !(targetIndex >= 0 && targetIndex < targets!)) {
      throw new RangeError(
        `cells of shape [${scores.shape.join(", ")}] do not hold target ${targetIndex} on picture ${grid.imageIndex}'s ${grid.rows} x ${grid.cols} grid`,
      );
    }
    for (let row = 0; row < grid.rows; row++) {
      for (let col = 0; col < grid.cols; col++) {
        const score = scores.values[(targetIndex * grid.rows + row) * grid.cols + col]!;
        cells.push({ imageIndex: attribution.imageIndex, row, col, box: cellBox(grid, row, col), score });
      }
    }
  }
  // Array.prototype.sort is stable, so ties keep their order.
  return cells.sort((a, b) => Math.abs(b.score) - Math.abs(a.score)).slice(0, k);
}
