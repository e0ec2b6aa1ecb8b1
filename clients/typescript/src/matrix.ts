// Decoding of `sightline.v1.Tensor`: a shape and its elements, row-major, in float_values or int_values.
import { Dtype, type Tensor } from "./gen/sightline/v1/types_pb.js";

export type TensorDType = "float32" | "int32";

/**
 * A dense row-major tensor decoded from a `sightline.v1.Tensor`.
 *
 * Usually two-dimensional (an attribution matrix is `[targets, tokens - 1]`), but method extras may have
 * other ranks, e.g. logit lens `[layers + 1, targets, k]`. `values` holds every element flat, in row-major
 * order, in a typed array of the tensor's element type.
 */
export class Matrix {
  readonly dtype: TensorDType;
  readonly shape: readonly number[];
  readonly values: Float32Array | Int32Array;

  constructor(dtype: TensorDType, shape: readonly number[], values: Float32Array | Int32Array) {
    const size = shape.reduce((product, dimension) => product * dimension, 1);
    if (shape.some((dimension) => !Number.isSafeInteger(dimension) || dimension < 0) || values.length !== size) {
      throw new RangeError(`${values.length} values do not fill a ${dtype} tensor of shape [${shape.join(", ")}]`);
    }
    this.dtype = dtype;
    this.shape = Object.freeze([...shape]);
    this.values = values;
  }

  /** Decode a wire tensor; its elements must be in the value field its dtype names, the other one empty. */
  static fromProto(tensor: Tensor): Matrix {
    const { floatValues, intValues } = tensor;
    switch (tensor.dtype) {
      case Dtype.FLOAT32:
        if (intValues.length > 0) {
          throw new RangeError(`a float32 tensor carries ${intValues.length} int_values`);
        }
        // Exact: each element was a float32 on the wire.
        return new Matrix("float32", tensor.shape, Float32Array.from(floatValues));
      case Dtype.INT32:
        if (floatValues.length > 0) {
          throw new RangeError(`an int32 tensor carries ${floatValues.length} float_values`);
        }
        return new Matrix("int32", tensor.shape, Int32Array.from(intValues));
      default:
        throw new RangeError(`unsupported tensor dtype ${tensor.dtype} (expected float32 or int32)`);
    }
  }

  get ndim(): number {
    return this.shape.length;
  }

  /**
   * The values under a leading index, flattened: for a 2-D matrix `row(i)` is row `i`; for a
   * `[layers, targets, k]` tensor `row(layer, target)` is that cell's `k` values. Negative indices count from
   * the end, as in the Python SDK.
   */
  row(...index: number[]): number[] {
    if (index.length < 1 || index.length >= this.ndim) {
      throw new RangeError(
        `row() takes 1 to ${this.ndim - 1} indices for shape [${this.shape.join(", ")}], got ${index.length}`,
      );
    }
    let offset = 0;
    index.forEach((position, axis) => {
      const size = this.shape[axis];
      const resolved = position < 0 ? position + size : position;
      if (!Number.isInteger(resolved) || resolved < 0 || resolved >= size) {
        throw new RangeError(`index ${position} is out of range for axis ${axis} of size ${size}`);
      }
      offset = offset * size + resolved;
    });
    const block = this.shape.slice(index.length).reduce((product, dimension) => product * dimension, 1);
    return Array.from(this.values.subarray(offset * block, (offset + 1) * block));
  }

  /** Nested arrays following `shape`, like numpy's `tolist()` and the Python SDK's `Matrix.tolist()`. */
  toArray(): NestedNumbers {
    return nest(Array.from(this.values), this.shape);
  }
}

/** Numbers nested as deep as a tensor's rank. */
export type NestedNumbers = number[] | NestedNumbers[];

function nest(flat: number[], shape: readonly number[]): NestedNumbers {
  if (shape.length <= 1) {
    return flat;
  }
  const stride = shape.slice(1).reduce((product, dimension) => product * dimension, 1);
  return Array.from({ length: shape[0] }, (_, index) =>
    nest(flat.slice(index * stride, (index + 1) * stride), shape.slice(1)),
  );
}

/** Methods that do not attribute to tokens leave the tensor empty or unset; both read as undefined. */
export function optionalMatrix(tensor: Tensor | undefined): Matrix | undefined {
  if (tensor === undefined || (tensor.shape.length === 0 && tensor.floatValues.length + tensor.intValues.length === 0)) {
    return undefined;
  }
  return Matrix.fromProto(tensor);
}
