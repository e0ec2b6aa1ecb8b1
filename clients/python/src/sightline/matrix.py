"""``Matrix``: a ``sightline.v1.Tensor`` decoded into a flat array of its elements with their shape."""

from __future__ import annotations

import math
from array import array
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal, TypeAlias

from sightline.v1 import types_pb2

if TYPE_CHECKING:
    from numpy.typing import NDArray

TensorDType: TypeAlias = Literal["float32", "int32"]

# (dtype name, array typecode, the Tensor field holding the elements): 'f' is a C float and 'i' a C int, both
# 4 bytes on every platform CPython supports, matching the wire's float32 and int32.
_TENSOR_ELEMENTS: dict[int, tuple[TensorDType, str, str]] = {
    types_pb2.DTYPE_FLOAT32: ("float32", "f", "float_values"),
    types_pb2.DTYPE_INT32: ("int32", "i", "int_values"),
}


@dataclass(frozen=True)
class Matrix:
    """A dense row-major tensor decoded from a packed ``sightline.v1.Tensor``.

    Usually two-dimensional (an attribution matrix is ``[targets, tokens - 1]``),
    but method extras may have other ranks, e.g. logit lens ``[layers + 1, targets, k]``.
    ``values`` holds every element flat, in row-major order and native byte order.
    """

    dtype: TensorDType
    shape: tuple[int, ...]
    values: array[float] | array[int]

    def __post_init__(self) -> None:
        if any(size < 0 for size in self.shape) or len(self.values) != math.prod(self.shape):
            raise ValueError(f"{len(self.values)} values do not fill a {self.dtype} tensor of shape {self.shape}")

    @classmethod
    def from_proto(cls, tensor: types_pb2.Tensor) -> Matrix:
        if tensor.dtype not in _TENSOR_ELEMENTS:
            raise ValueError(f"unsupported tensor dtype {tensor.dtype} (expected float32 or int32)")
        dtype, typecode, elements = _TENSOR_ELEMENTS[tensor.dtype]
        return cls(dtype, tuple(tensor.shape), array(typecode, getattr(tensor, elements)))

    @property
    def ndim(self) -> int:
        return len(self.shape)

    def row(self, *index: int) -> list[float] | list[int]:
        """The values under a leading index, flattened.

        For a 2-D matrix ``row(i)`` is row ``i``; for a ``[layers, targets, k]``
        tensor ``row(layer, target)`` is that cell's ``k`` values. Negative indices
        count from the end, as in Python sequences.
        """
        if not 0 < len(index) < self.ndim:
            raise IndexError(f"row() takes 1 to {self.ndim - 1} indices for shape {self.shape}, got {len(index)}")
        offset = 0
        for axis, (position, size) in enumerate(zip(index, self.shape, strict=False)):
            resolved = position + size if position < 0 else position
            if not 0 <= resolved < size:
                raise IndexError(f"index {position} is out of range for axis {axis} of size {size}")
            offset = offset * size + resolved
        block = math.prod(self.shape[len(index) :])
        return self.values[offset * block : (offset + 1) * block].tolist()

    def tolist(self) -> list[Any]:
        """Nested lists following ``shape``, like ``numpy.ndarray.tolist``."""
        return _nest(self.values.tolist(), self.shape)

    def to_numpy(self) -> NDArray[Any]:
        """A new numpy array of this shape and dtype. Needs numpy, which the SDK does not."""
        try:
            import numpy
        except ImportError as error:
            raise ImportError("Matrix.to_numpy() needs numpy: pip install numpy") from error
        # Copied so that writes to the result cannot change this (frozen) matrix.
        return numpy.frombuffer(self.values, dtype=self.dtype).reshape(self.shape).copy()


def _nest(flat: list[Any], shape: tuple[int, ...]) -> list[Any]:
    if len(shape) <= 1:
        return flat
    stride = math.prod(shape[1:])
    return [_nest(flat[i * stride : (i + 1) * stride], shape[1:]) for i in range(shape[0])]


def optional_matrix(tensor: types_pb2.Tensor) -> Matrix | None:
    # Methods that do not attribute to tokens leave the tensor empty (or unset, which reads the same).
    if not tensor.shape and not tensor.float_values and not tensor.int_values:
        return None
    return Matrix.from_proto(tensor)
