package sightline

import (
	"fmt"
	"math"
	"sort"

	sightlinev1 "github.com/sightline/sightline-go/sightline/v1"
)

// Box is a rectangle of pixels, half-open: columns Left to Right-1, rows Top to Bottom-1.
type Box struct {
	Left, Top, Right, Bottom int
}

// Cell is one cell of a picture's grid with one method's score for one explained token.
type Cell struct {
	ImageIndex, Row, Col int
	// Box is the cell's pixels in the picture as it was sent.
	Box   Box
	Score float32
}

// CellBox returns cell (row, col) of grid in the pixels of the picture as it was sent: the grid's
// edges, given in the pixels the model saw, scaled by original/seen as the Python SDK's
// ImageGrid.box does.
func CellBox(grid *sightlinev1.ImageGrid, row, col int) (Box, error) {
	rows, cols := int(grid.GetRows()), int(grid.GetCols())
	if row < 0 || row >= rows || col < 0 || col >= cols {
		return Box{}, fmt.Errorf("sightline: cell (%d, %d) is outside the %d x %d grid", row, col, rows, cols)
	}
	rowEdges, colEdges := grid.GetRowEdges(), grid.GetColEdges()
	if len(rowEdges) != rows+1 || len(colEdges) != cols+1 || grid.GetHeight() < 1 || grid.GetWidth() < 1 {
		return Box{}, fmt.Errorf("sightline: picture %d's grid edges do not fit its %d x %d cells", grid.GetImageIndex(), rows, cols)
	}
	xScale := float64(grid.GetOriginalWidth()) / float64(grid.GetWidth())
	yScale := float64(grid.GetOriginalHeight()) / float64(grid.GetHeight())
	scale := func(edge int32, by float64) int { return int(math.RoundToEven(float64(edge) * by)) }
	return Box{
		Left: scale(colEdges[col], xScale), Top: scale(rowEdges[row], yScale),
		Right: scale(colEdges[col+1], xScale), Bottom: scale(rowEdges[row+1], yScale),
	}, nil
}

// TopCells returns the k picture cells that most influenced explained token target (an index into
// TargetPositions), over every picture, strongest first by absolute score (scores keep their sign;
// ties keep the earlier picture, row, then column first), by method's cells (empty: the first
// result that scores pictures). It ranks as the Python SDK's top_cells does.
func TopCells(explanation *sightlinev1.Explanation, method string, target, k int) ([]Cell, error) {
	if k < 1 {
		return nil, fmt.Errorf("sightline: k must be at least 1, got %d", k)
	}
	result, err := imageResult(explanation, method)
	if err != nil {
		return nil, err
	}
	grids := explanation.GetImageGrids()
	var cells []Cell
	for _, attribution := range result.GetImageAttributions() {
		index := int(attribution.GetImageIndex())
		if index < 0 || index >= len(grids) {
			return nil, fmt.Errorf("sightline: %q scores picture %d; the explanation has %d", result.GetMethod(), index, len(grids))
		}
		grid := grids[index]
		values, shape, err := Float32Values(attribution.GetCells())
		if err != nil {
			return nil, err
		}
		rows, cols := int(grid.GetRows()), int(grid.GetCols())
		if len(shape) != 3 || shape[1] != rows || shape[2] != cols || target < 0 || target >= shape[0] {
			return nil, fmt.Errorf("sightline: cells of shape %v do not hold target %d on picture %d's %d x %d grid", shape, target, index, rows, cols)
		}
		for row := 0; row < rows; row++ {
			for col := 0; col < cols; col++ {
				box, err := CellBox(grid, row, col)
				if err != nil {
					return nil, err
				}
				cells = append(cells, Cell{ImageIndex: index, Row: row, Col: col, Box: box, Score: values[(target*rows+row)*cols+col]})
			}
		}
	}
	sort.SliceStable(cells, func(a, b int) bool {
		return math.Abs(float64(cells[a].Score)) > math.Abs(float64(cells[b].Score))
	})
	if len(cells) > k {
		cells = cells[:k]
	}
	return cells, nil
}

func imageResult(explanation *sightlinev1.Explanation, method string) (*sightlinev1.MethodResult, error) {
	var names []string
	for _, result := range explanation.GetResults() {
		scores := len(result.GetImageAttributions()) > 0
		if (method == "" && scores) || result.GetMethod() == method {
			if !scores {
				return nil, fmt.Errorf("sightline: method %q scores no picture cells", method)
			}
			return result, nil
		}
		names = append(names, result.GetMethod())
	}
	if method == "" {
		return nil, fmt.Errorf("sightline: no result scores picture cells; results: %v", names)
	}
	return nil, fmt.Errorf("sightline: no result of method %q; results: %v", method, names)
}
