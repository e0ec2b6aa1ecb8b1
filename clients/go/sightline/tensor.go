package sightline

import (
	"fmt"
	"math"

	sightlinev1 "github.com/sightline/sightline-go/sightline/v1"
)

// Float32Values returns a float32 tensor's elements, row-major, with its shape, after checking that
// they fill the shape.
func Float32Values(tensor *sightlinev1.Tensor) ([]float32, []int, error) {
	shape, err := checkTensor(tensor, sightlinev1.Dtype_DTYPE_FLOAT32, len(tensor.GetFloatValues()))
	if err != nil {
		return nil, nil, err
	}
	return tensor.GetFloatValues(), shape, nil
}

// Int32Values returns an int32 tensor's elements, row-major, with its shape, after checking that
// they fill the shape.
func Int32Values(tensor *sightlinev1.Tensor) ([]int32, []int, error) {
	shape, err := checkTensor(tensor, sightlinev1.Dtype_DTYPE_INT32, len(tensor.GetIntValues()))
	if err != nil {
		return nil, nil, err
	}
	return tensor.GetIntValues(), shape, nil
}

// Float32Matrix splits a two-dimensional float32 tensor into its rows, such as a method's
// attributions [targets][tokens - 1] or its aggregated attributions [targets][source groups].
// The rows share the tensor's storage.
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
		// Capped at the row's end, so that appending to a row cannot overwrite the next one.
		rows[i] = values[i*shape[1] : (i+1)*shape[1] : (i+1)*shape[1]]
	}
	return rows, nil
}

// checkTensor checks the dtype and that the count of elements is the one shape promises, and
// returns the shape as ints.
func checkTensor(tensor *sightlinev1.Tensor, dtype sightlinev1.Dtype, elements int) ([]int, error) {
	if tensor == nil {
		return nil, fmt.Errorf("sightline: no tensor")
	}
	if tensor.GetDtype() != dtype {
		return nil, fmt.Errorf("sightline: tensor is %s, not %s", tensor.GetDtype(), dtype)
	}
	shape := make([]int, len(tensor.GetShape()))
	product := int64(1)
	for axis, size := range tensor.GetShape() {
		// A protobuf message is under 2 GiB, so no real tensor has more elements than MaxInt32.
		if size < 0 || (size > 0 && product > math.MaxInt32/int64(size)) {
			return nil, fmt.Errorf("sightline: tensor shape %v is impossible", tensor.GetShape())
		}
		shape[axis] = int(size)
		product *= int64(size)
	}
	if int64(elements) != product {
		return nil, fmt.Errorf("sightline: %d elements do not fill a tensor of shape %v", elements, shape)
	}
	return shape, nil
}
