"""The cost model's arithmetic, shared by the gateway (limits, estimates) and the workers (progress, time left)."""

from __future__ import annotations

from sightline.v1 import explanations_pb2

# Faithfulness perturbs each target's sources at 5 fractions, removing and keeping: 10 forward passes per explained
# token for each method, and 10 more for the random reference, which all methods of an explanation share
# (explainers.faithfulness). Each of those passes is over at most the target's prefix (it resumes where its perturbed
# prefix stops agreeing with the unperturbed or the all-replaced sequence), so they bound the cost from above; three
# whole passes come on top: the unperturbed sequence's scores and the two sequences the others resume from.
FAITHFULNESS_PASSES_PER_TARGET = 10.0
FAITHFULNESS_REFERENCE_PASSES_PER_TARGET = 10.0
FAITHFULNESS_WHOLE_PASSES = 3.0


def faithfulness_passes(*, num_targets: int, num_methods: int) -> float:
    """Forward passes the faithfulness checks of num_methods token-attributing methods take together."""
    if num_methods == 0:
        return 0.0
    per_target = FAITHFULNESS_PASSES_PER_TARGET * num_methods + FAITHFULNESS_REFERENCE_PASSES_PER_TARGET
    return per_target * num_targets + FAITHFULNESS_WHOLE_PASSES


def method_passes(cost: explanations_pb2.MethodCost, *, num_tokens: int, num_targets: int, scale: float) -> float:
    """Forward passes over the whole sequence one method costs (see MethodCost); ``scale`` is the value of
    ``cost.scaled_by_param`` in the request (ignored when the cost names no parameter)."""
    passes = cost.passes + cost.passes_per_target * num_targets + cost.passes_per_token * num_tokens
    return passes * scale if cost.scaled_by_param else passes
