"""The cost model's arithmetic, shared by the gateway (limits, estimates) and the workers (progress, time left)."""

from __future__ import annotations

from sightline.v1 import explanations_pb2

# Faithfulness perturbs each target's sources at 5 fractions, removing and keeping, for the method
# and for the random reference: 20 forward passes per explained token.
FAITHFULNESS_PASSES_PER_TARGET = 20.0


def method_passes(cost: explanations_pb2.MethodCost, *, num_tokens: int, num_targets: int, scale: float) -> float:
    """Forward passes over the whole sequence one method costs (see MethodCost); ``scale`` is the value of
    ``cost.scaled_by_param`` in the request (ignored when the cost names no parameter)."""
    passes = cost.passes + cost.passes_per_target * num_targets + cost.passes_per_token * num_tokens
    return passes * scale if cost.scaled_by_param else passes
