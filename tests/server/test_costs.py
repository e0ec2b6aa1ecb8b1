"""The gateway's up-front cost check."""

from __future__ import annotations

import grpc
import pytest
from sightline.v1 import explanations_pb2, types_pb2

from common.jobs import MethodRequest
from server.costs import PlannedMethod, check_cost
from server.errors import GatewayError
from server.limits import Tenant, TenantLimits

IG = explanations_pb2.MethodInfo(
    name="integrated_gradients",
    attributes_tokens=True,
    params=[
        explanations_pb2.MethodParam(
            name="steps", type=explanations_pb2.PARAM_TYPE_INT, default_value=types_pb2.ParamValue(int_value=16)
        )
    ],
    cost=explanations_pb2.MethodCost(passes=1, passes_per_target=2, scaled_by_param="steps"),
)


def test_cost_scales_with_the_named_parameter_and_its_default() -> None:
    default = PlannedMethod(MethodRequest("integrated_gradients", {}), IG)
    doubled = PlannedMethod(MethodRequest("integrated_gradients", {"steps": 32}), IG)
    assert default.passes(num_tokens=100, num_targets=10) == 16 * (1 + 2 * 10)
    assert doubled.passes(num_tokens=100, num_targets=10) == 2 * default.passes(num_tokens=100, num_targets=10)


def test_over_the_limit_is_resource_exhausted_naming_the_limit() -> None:
    method = PlannedMethod(MethodRequest("integrated_gradients", {}), IG)
    cost = 16 * (1 + 2 * 10) * 100
    tenant = Tenant("acme", TenantLimits(max_explanation_cost=cost))
    check_cost([method], num_tokens=100, num_targets=10, faithfulness=False, tenant=tenant)
    with pytest.raises(GatewayError) as caught:
        check_cost([method], num_tokens=100, num_targets=10, faithfulness=True, tenant=tenant)
    assert caught.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert f"max_explanation_cost limit of {cost:,} for tenant 'acme'" in caught.value.message
    assert "SIGHTLINE_MAX_EXPLANATION_COST" in caught.value.message


def test_a_zero_limit_means_no_limit() -> None:
    method = PlannedMethod(MethodRequest("integrated_gradients", {"steps": 1000}), IG)
    unlimited = Tenant("acme", TenantLimits(max_explanation_cost=0))
    check_cost([method], num_tokens=2000, num_targets=1000, faithfulness=True, tenant=unlimited)
