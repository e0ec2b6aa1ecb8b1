"""What ``list_methods`` returns: the methods a deployment offers, and which model, architecture and path explain."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import overload

from sightline.types import EXPLAIN_PATHS, ExplainPath, MethodInfo
from sightline.v1 import explanations_pb2


@dataclass(frozen=True)
class MethodCatalog(Sequence[MethodInfo]):
    """The attribution methods, in the server's order (iterate, index or ``len`` it like a list of ``MethodInfo``),
    and what the explainer workers explain with."""

    methods: tuple[MethodInfo, ...]
    model: str
    """The served model name the workers hold the weights of."""
    architecture: str
    """The model's architecture: its Hugging Face config ``model_type`` (``llama``, ``qwen3``, ``gpt2``, ...)."""
    explain_path: ExplainPath
    """The path the workers explain this architecture with."""
    raw: explanations_pb2.ListMethodsResponse = field(repr=False, compare=False)

    @classmethod
    def from_proto(cls, response: explanations_pb2.ListMethodsResponse) -> MethodCatalog:
        return cls(
            methods=tuple(MethodInfo.from_proto(info) for info in response.methods),
            model=response.model,
            architecture=response.architecture,
            explain_path=EXPLAIN_PATHS.get(response.explain_path, ExplainPath.UNSPECIFIED),
            raw=response,
        )

    @overload
    def __getitem__(self, index: int) -> MethodInfo: ...

    @overload
    def __getitem__(self, index: slice) -> Sequence[MethodInfo]: ...

    def __getitem__(self, index: int | slice) -> MethodInfo | Sequence[MethodInfo]:
        return self.methods[index]

    def __len__(self) -> int:
        return len(self.methods)

    def __iter__(self) -> Iterator[MethodInfo]:
        return iter(self.methods)
