"""Method parameters the gateway refuses with INVALID_ARGUMENT before anything is generated or queued:
non-finite numbers anywhere in ``params``, and numbers past the bounds the model gives them."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import grpc
import pytest
from sightline.v1 import explanations_pb2, explanations_pb2_grpc, inference_pb2, inference_pb2_grpc, types_pb2

pytestmark = pytest.mark.e2e

# The embedded model: SmolLM2-135M has a 49,152-token vocabulary, 30 layers and 9 attention heads.
LAST_TOKEN_ID = 49151
NUM_LAYERS = 30
LAST_HEAD = 8

Send = Callable[[types_pb2.MethodSpec], None]


def _spec(name: str, params: dict[str, Any]) -> types_pb2.MethodSpec:
    spec = types_pb2.MethodSpec(name=name)
    spec.params.update(params)
    return spec


def _senders(
    inference: inference_pb2_grpc.InferenceServiceStub, explanations: explanations_pb2_grpc.ExplanationsServiceStub
) -> dict[str, Send]:
    def explain_spec(method: types_pb2.MethodSpec) -> types_pb2.ExplainSpec:
        return types_pb2.ExplainSpec(methods=[method], mode=types_pb2.EXPLAIN_MODE_ASYNC)

    def generate(method: types_pb2.MethodSpec) -> None:
        inference.Generate(
            inference_pb2.GenerateRequest(
                input=inference_pb2.GenerationInput(prompt="Hello"),
                sampling=types_pb2.SamplingParams(max_tokens=2),
                explain=explain_spec(method),
            ),
            timeout=60,
        )

    def generate_stream(method: types_pb2.MethodSpec) -> None:
        list(
            inference.GenerateStream(
                inference_pb2.GenerateRequest(
                    input=inference_pb2.GenerationInput(prompt="Hello"),
                    sampling=types_pb2.SamplingParams(max_tokens=2),
                    explain=explain_spec(method),
                ),
                timeout=60,
            )
        )

    def explain(method: types_pb2.MethodSpec) -> None:
        explanations.Explain(
            explanations_pb2.ExplainRequest(
                prompt_token_ids=[1, 2, 3], output_token_ids=[4], explain=explain_spec(method)
            ),
            timeout=60,
        )

    return {"Generate": generate, "GenerateStream": generate_stream, "Explain": explain}


def _refused(send: Send, method: types_pb2.MethodSpec) -> str:
    with pytest.raises(grpc.RpcError) as caught:
        send(method)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT, caught.value.details()
    details: str = caught.value.details()
    return details


@pytest.mark.parametrize("rpc", ["Generate", "GenerateStream", "Explain"])
@pytest.mark.parametrize(
    ("params", "path", "value"),
    [
        ({"steps": math.nan}, "steps", "nan"),
        ({"steps": math.inf}, "steps", "inf"),
        ({"no_such_param": -math.inf}, "no_such_param", "-inf"),
        ({"outer": {"inner": [1, math.nan]}}, "outer.inner[1]", "nan"),
    ],
    ids=["nan", "infinity", "unknown", "nested"],
)
def test_non_finite_parameters_are_invalid_argument_naming_the_parameter(
    inference: inference_pb2_grpc.InferenceServiceStub,
    explanations: explanations_pb2_grpc.ExplanationsServiceStub,
    rpc: str,
    params: dict[str, Any],
    path: str,
    value: str,
) -> None:
    """Regression (issue 13): json_format.MessageToDict raised on the non-finite number, answering INTERNAL."""
    details = _refused(_senders(inference, explanations)[rpc], _spec("integrated_gradients", params))
    assert details == (
        f"'explain.methods[0].params.{path}' of method 'integrated_gradients' is {value}; "
        "parameters must be finite numbers"
    )


def test_the_catalogue_bounds_token_ids_layers_and_heads_by_the_model(
    explanations: explanations_pb2_grpc.ExplanationsServiceStub,
) -> None:
    catalogue = explanations.ListMethods(explanations_pb2.ListMethodsRequest(), timeout=10)
    maxima = {
        (method.name, param.name): param.maximum
        for method in catalogue.methods
        for param in method.params
        if param.HasField("maximum")
    }
    assert maxima[("integrated_gradients", "baseline_token_id")] == LAST_TOKEN_ID
    assert maxima[("layer_integrated_gradients", "baseline_token_id")] == LAST_TOKEN_ID
    assert maxima[("occlusion", "replacement_token_id")] == LAST_TOKEN_ID
    assert maxima[("shapley_sampling", "replacement_token_id")] == LAST_TOKEN_ID
    assert maxima[("attention", "layer")] == NUM_LAYERS
    assert maxima[("attention", "head")] == LAST_HEAD
    assert maxima[("gradient_x_activation", "layer")] == NUM_LAYERS
    assert maxima[("layer_integrated_gradients", "layer")] == NUM_LAYERS
    numeric = (explanations_pb2.PARAM_TYPE_INT, explanations_pb2.PARAM_TYPE_FLOAT)
    unbounded = [
        f"{method.name}.{param.name}"
        for method in catalogue.methods
        for param in method.params
        if param.type in numeric and not param.HasField("maximum")
    ]
    assert unbounded == []


@pytest.mark.parametrize("rpc", ["Generate", "GenerateStream", "Explain"])
@pytest.mark.parametrize(
    ("method", "param", "bounds"),
    [
        ("integrated_gradients", "baseline_token_id", f"0..{LAST_TOKEN_ID}"),
        ("occlusion", "replacement_token_id", f"0..{LAST_TOKEN_ID}"),
        ("attention", "layer", f"-1..{NUM_LAYERS}"),
        ("attention", "head", f"-1..{LAST_HEAD}"),
    ],
)
def test_parameters_past_the_models_bounds_are_refused_at_the_gateway_quoting_them_in_part(
    inference: inference_pb2_grpc.InferenceServiceStub,
    explanations: explanations_pb2_grpc.ExplanationsServiceStub,
    rpc: str,
    method: str,
    param: str,
    bounds: str,
) -> None:
    """Regression (issue 13): these were accepted, and the job FAILED in the worker quoting a 300-digit number."""
    details = _refused(_senders(inference, explanations)[rpc], _spec(method, {param: 1e300}))
    assert details == f"parameter {param!r} of method {method!r} must be in {bounds}; got 1e+300"
