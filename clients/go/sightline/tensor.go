package sightline

import (
	"encoding/binary"
	"fmt"
	"math"

	sightlinev1 "github.com/sightline/sightline-go/sightline/v1"
)

// A tensor's data is its elements packed as little-endian 4-byte values, row-major. Decoding reads
// them one at a time with encoding/binary, so the bytes' alignment in memory does not matter.
const elementSize = 4

// Float32Values decodes a float32 tensor of any rank: its elements in row-major order and its shape.
func Float32Values(tensor *sightlinev1.Tensor) ([]float32, []int, error) {
	shape, err := checkTensor(tensor, sightlinev1.DType_D_TYPE_FLOAT32)
	if err != nil {
		return nil, nil, err
	}
	values := make([]float32, len(tensor.GetData())/elementSize)
	for i := range values {
		values[i] = math.Float32frombits(binary.LittleEndian.Uint32(tensor.GetData()[i*elementSize:]))
	}
	return values, shape, nil
}

// Int32Values decodes an int32 tensor of any rank: its elements in row-major order and its shape.
func Int32Values(tensor *sightlinev1.Tensor) ([]int32, []int, error) {
	shape, err := checkTensor(tensor, sightlinev1.DType_D_TYPE_INT32)
	if err != nil {
		return nil, nil, err
	}
	values := make([]int32, len(tensor.GetData())/elementSize)
	for i := range values {
		values[i] = int32(binary.LittleEndian.Uint32(tensor.GetData()[i*elementSize:]))
	}
	return values, shape, nil
}

// Float32Matrix decodes a two-dimensional float32 tensor into its rows, such as a method's
// attributions [targets][tokens - 1] or its aggregated attributions [targets][source groups].
func Float32Matrix(tensor *sightlinev1.Tensor) ([][]float32, error) {
	values, shape, err := Float32Values(tensor)
	if err != nil {
		return nil, err
	}
	if len(shape) != 2 {
		return nil, fmt.Errorf("sightline: tensor of shape %v is not a matrix", shape)
	}
	rows := make([][]float32, shape[0])
	for i := range rows {
		rows[i] = values[i*shape[1] : (i+1)*shape[1] : (i+1)*shape[1]]
	}
	return rows, nil
}

// checkTensor checks the dtype and that data holds exactly the elements shape promises, and
// returns the shape as ints.
func checkTensor(tensor *sightlinev1.Tensor, dtype sightlinev1.DType) ([]int, error) {
	if tensor == nil {
		return nil, fmt.Errorf("sightline: no tensor")
	}
	if tensor.GetDtype() != dtype {
		return nil, fmt.Errorf("sightline: tensor is %s, not %s", tensor.GetDtype(), dtype)
	}
	shape := make([]int, len(tensor.GetShape()))
	elements := 1
	for axis, size := range tensor.GetShape() {
		// A protobuf message is under 2 GiB, so no real tensor has more elements than MaxInt32.
		if size < 0 || (size > 0 && int64(elements) > math.MaxInt32/int64(size)) {
			return nil, fmt.Errorf("sightline: tensor shape %v is impossible", tensor.GetShape())
		}
		shape[axis] = int(size)
		elements *= shape[axis]
	}
	if len(tensor.GetData()) != elements*elementSize {
		return nil, fmt.Errorf("sightline: %d bytes of data do not fill a tensor of shape %v", len(tensor.GetData()), shape)
	}
	return shape, nil
}
