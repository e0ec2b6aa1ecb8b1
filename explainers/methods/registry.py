"""The attribution methods this worker offers, by name; the gateway's ListMethods publishes method_infos()."""

from __future__ import annotations

from typing import Any

from sightline.v1 import explanations_pb2

# Raised by get_method; its callers catch it from here.
from common.explain_spec import UnknownMethodError as UnknownMethodError
from common.explain_spec import method_named
from explainers.methods.activation_patching import ActivationPatching
from explainers.methods.attention import Attention
from explainers.methods.attention_rollout import AttentionRollout
from explainers.methods.attn_lrp import AttnLrp
from explainers.methods.base import AttributionMethod, ModelShape
from explainers.methods.gradient_shap import GradientShap
from explainers.methods.gradient_x_activation import GradientXActivation
from explainers.methods.input_x_gradient import InputXGradient
from explainers.methods.integrated_gradients import IntegratedGradients
from explainers.methods.layer_integrated_gradients import LayerIntegratedGradients
from explainers.methods.logit_lens import LogitLens
from explainers.methods.occlusion import Occlusion
from explainers.methods.saliency import Saliency
from explainers.methods.shapley_sampling import ShapleySampling
from explainers.methods.value_zeroing import ValueZeroing
from explainers.model import LoadedModel

_METHODS: dict[str, AttributionMethod[Any]] = {}


def register(method: AttributionMethod[Any]) -> None:
    if method.name in _METHODS:
        raise ValueError(f"method {method.name!r} is already registered")
    _METHODS[method.name] = method


def get_method(name: str) -> AttributionMethod[Any]:
    """The method called ``name``; UnknownMethodError naming those registered if there is none."""
    return method_named(name, _METHODS)


def all_methods() -> list[AttributionMethod[Any]]:
    return [_METHODS[name] for name in sorted(_METHODS)]


def catalog(loaded: LoadedModel) -> explanations_pb2.ListMethodsResponse:
    """What ListMethods answers for workers holding `loaded`: the catalogue with that model's parameter bounds, and
    which model, architecture and explainer path produce the explanations."""
    return explanations_pb2.ListMethodsResponse(
        methods=method_infos(ModelShape.of(loaded)),
        model=loaded.model_name,
        architecture=loaded.architecture.model_type,
        explain_path=loaded.path.proto,
    )


def method_infos(shape: ModelShape | None = None) -> list[explanations_pb2.MethodInfo]:
    """The catalogue; with ``shape``, the parameter bounds of that model (token ids, layers, heads)."""
    return [method.info(shape) for method in all_methods()]


for method in (
    ActivationPatching(),
    Saliency(),
    InputXGradient(),
    IntegratedGradients(),
    GradientShap(),
    LayerIntegratedGradients(),
    GradientXActivation(),
    Occlusion(),
    ShapleySampling(),
    Attention(),
    AttentionRollout(),
    AttnLrp(),
    LogitLens(),
    ValueZeroing(),
):
    register(method)
