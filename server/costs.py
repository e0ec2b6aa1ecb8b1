"""Explanation cost, estimated before any work from the cost model each method publishes (MethodCost)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from sightline.v1 import explanations_pb2

from common.costs import faithfulness_passes, method_passes
from common.jobs import MethodRequest
from server.limits import Tenant


@dataclass(frozen=True)
class PlannedMethod:
    request: MethodRequest
    info: explanations_pb2.MethodInfo

    def passes(self, num_tokens: int, num_targets: int) -> float:
        cost = self.info.cost
        scale = self._number_param(cost.scaled_by_param) if cost.scaled_by_param else 1.0
        return method_passes(cost, num_tokens=num_tokens, num_targets=num_targets, scale=scale)

    def _number_param(self, name: str) -> float:
        value = self.request.params.get(name)
        if isinstance(value, int | float):
            return float(value)
        default = next(p.default_value for p in self.info.params if p.name == name)
        return float(default.int_value if default.WhichOneof("kind") == "int_value" else default.float_value)


def total_passes(methods: Sequence[PlannedMethod], *, num_tokens: int, num_targets: int, faithfulness: bool) -> float:
    """Forward passes over the whole sequence of the methods together, faithfulness checks included."""
    passes = sum(m.passes(num_tokens, num_targets) for m in methods)
    if faithfulness:
        attributing = sum(m.info.attributes_tokens for m in methods)
        passes += faithfulness_passes(num_targets=num_targets, num_methods=attributing)
    return passes


def check_cost(
    methods: Sequence[PlannedMethod], *, num_tokens: int, num_targets: int, faithfulness: bool, tenant: Tenant
) -> None:
    """Refuse, with RESOURCE_EXHAUSTED naming the limit, an explanation costing more than the tenant's limit."""
    limit = tenant.limits.max_explanation_cost
    passes = total_passes(methods, num_tokens=num_tokens, num_targets=num_targets, faithfulness=faithfulness)
    cost = passes * num_tokens
    if limit and cost > limit:
        raise tenant.limit_exceeded(
            "max_explanation_cost",
            f"this explanation would cost about {cost:,.0f} token-forward passes ({num_targets} explained tokens "
            f"in a {num_tokens}-token sequence)",
            "explain fewer tokens (max_tokens, targets.output_indices) or choose cheaper parameters",
        )
