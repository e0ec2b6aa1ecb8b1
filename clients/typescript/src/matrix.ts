// Decoding of the packed `sightline.v1.Tensor`: raw little-endian float32 or int32 bytes, row-major.
import { DType, type Tensor } from "./gen/sightline/v1/types_pb.js";

export type TensorDType = "float32" | "int32";

const ELEMENT_BYTES = 4;

/**
 * A dense row-major tensor decoded from a packed `sightline.v1.Tensor`.
 *
 * Usually two-dimensional (an attribution matrix is `[targets, tokens - 1]`), but method extras may have
 * other ranks, e.g. logit lens `[layers + 1, targets, k]`. `values` holds every element flat, in row-major
 * order, in a typed array of its own (never a view into the response's buffer).
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

  /**
   * Decode a wire tensor. The bytes are read through a DataView: protobuf hands out `data` as a view into
   * the response at whatever offset the field had, which a Float32Array over the same memory would refuse
   * unless it is a multiple of 4, and DataView also reads little-endian on big-endian hosts.
   */
  static fromProto(tensor: Tensor): Matrix {
    const dtype = tensorDType(tensor.dtype);
    const shape = tensor.shape.map((dimension) => {
      if (dimension < 0n || dimension > BigInt(Number.MAX_SAFE_INTEGER)) {
        throw new RangeError(`tensor dimension ${dimension} is out of range`);
      }
      return Number(dimension);
    });
    const { data } = tensor;
    if (data.byteLength % ELEMENT_BYTES !== 0) {
      throw new RangeError(`${data.byteLength} bytes are not a whole number of ${dtype} elements`);
    }
    const count = data.byteLength / ELEMENT_BYTES;
    const view = new DataView(data.buffer, data.byteOffset, data.byteLength);
    let values: Float32Array | Int32Array;
    if (dtype === "float32") {
      values = new Float32Array(count);
      for (let index = 0; index < count; index++) {
        values[index] = view.getFloat32(index * ELEMENT_BYTES, true);
      }
    } else {
      values = new Int32Array(count);
      for (let index = 0; index < count; index++) {
        values[index] = view.getInt32(index * ELEMENT_BYTES, true);
      }
    }
    return new Matrix(dtype, shape, values);
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

function tensorDType(dtype: DType): TensorDType {
  switch (dtype) {
    case DType.FLOAT32:
      return "float32";
    case DType.INT32:
      return "int32";
    default:
      throw new RangeError(`unsupported tensor dtype ${dtype} (expected float32 or int32)`);
  }
}

/** Methods that do not attribute to tokens leave the tensor empty or unset; both read as undefined. */
export function optionalMatrix(tensor: Tensor | undefined): Matrix | undefined {
  if (tensor === undefined || (tensor.shape.length === 0 && tensor.data.byteLength === 0)) {
    return undefined;
  }
  return Matrix.fromProto(tensor);
}
