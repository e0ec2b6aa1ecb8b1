"""The image methods a worker holding an image-text model offers, by name: each with its parameters (ParamSpec, the
explain spec's, so the gateway parses a request's values exactly as the worker does) and a runner over the library
in methods.py. Every method here explains pictures (MethodInfo.multimodal); a text-only worker offers none of them.

Per-request baselines: occlusion replaces a cell by a flat colour or by a blurred copy of the picture; integrated
gradients starts from a black, white or blurred picture. Colours are given in 0-255 RGB and normalised with the model's
own processor statistics (``Normaliser``), so the same name means the same colour for any model.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass

from sightline.v1 import explanations_pb2, types_pb2
from torch import nn

from common.explain_spec import ParamSpec, ParamValue, method_named, parse_params
from explainers.image_methods.grid import CellGrid
from explainers.image_methods.methods import (
    Baseline,
    ImageAttribution,
    attention,
    input_x_gradient,
    integrated_gradients,
    logit_lens,
    occlusion,
    saliency,
)
from explainers.image_methods.passes import ImageQuestion

RGB = tuple[int, int, int]
# 0-255 RGB -> the processor's normalised pixel values per channel.
Normaliser = Callable[[RGB], tuple[float, float, float]]

# The flat colours a cell can be occluded with. White is the page the constructed model's pictures are drawn on
# (it reads as blank there); grey is the usual neutral choice for photographs.
OCCLUSION_COLOURS: dict[str, RGB] = {"grey": (128, 128, 128), "white": (255, 255, 255), "black": (0, 0, 0)}
BLUR = "blur"
BLACK = "black"
WHITE = "white"

_BATCH_SIZE = ParamSpec(
    "batch_size", int, 8, "Perturbed pictures per forward pass: more is faster and takes more memory.", 1, 64
)


@dataclass(frozen=True)
class ImageMethod:
    """One image method: its name, parameters and how to run it on a question over a grid."""

    name: str
    description: str
    params: tuple[ParamSpec, ...]
    needs_gradients: bool
    # Whether it scores the text tokens too (then the result has a modality share).
    attributes_tokens: bool
    # Forward passes over the sequence (a backward counts as two): fixed, and per grid cell, times `scaled_by`.
    cost: explanations_pb2.MethodCost
    run: Callable[[nn.Module, ImageQuestion, CellGrid, Mapping[str, ParamValue], Normaliser], ImageAttribution]

    def parse_params(self, values: Mapping[str, object], where: str = "params") -> dict[str, ParamValue]:
        """Every parameter, typed and checked (InvalidParamsError naming the field), defaults filling the rest."""
        given = parse_params(self.name, self.params, values, where)
        return {spec.name: given.get(spec.name, spec.default) for spec in self.params}

    def info(self) -> explanations_pb2.MethodInfo:
        return explanations_pb2.MethodInfo(
            name=self.name,
            description=self.description,
            params=[spec.info() for spec in self.params],
            needs_gradients=self.needs_gradients,
            uses_cache=False,
            supports_contrastive_targets=False,
            multimodal=True,
            attributes_tokens=self.attributes_tokens,
            cost=self.cost,
        )


def _baseline(name: str, normalise: Normaliser) -> tuple[Baseline, tuple[float, float, float] | None]:
    if name == BLUR:
        return Baseline.BLUR, None
    return Baseline.COLOUR, normalise(OCCLUSION_COLOURS[name])


def _occlusion(
    model: nn.Module, question: ImageQuestion, grid: CellGrid, params: Mapping[str, ParamValue], normalise: Normaliser
) -> ImageAttribution:
    baseline, colour = _baseline(str(params["baseline"]), normalise)
    return occlusion(model, question, grid, baseline, colour, batch_size=int(params["batch_size"]))


def _integrated_gradients(
    model: nn.Module, question: ImageQuestion, grid: CellGrid, params: Mapping[str, ParamValue], normalise: Normaliser
) -> ImageAttribution:
    baseline, colour = _baseline(str(params["baseline"]), normalise)
    return integrated_gradients(
        model,
        question,
        grid,
        baseline,
        colour,
        steps=int(params["steps"]),
        batch_size=int(params["batch_size"]),
        with_text=bool(params["with_text"]),
    )


def _logit_lens(
    model: nn.Module, question: ImageQuestion, grid: CellGrid, params: Mapping[str, ParamValue], normalise: Normaliser
) -> ImageAttribution:
    return logit_lens(model, question, grid)[0]


def _plain(
    method: Callable[[nn.Module, ImageQuestion, CellGrid], ImageAttribution],
) -> Callable[[nn.Module, ImageQuestion, CellGrid, Mapping[str, ParamValue], Normaliser], ImageAttribution]:
    def run(
        model: nn.Module,
        question: ImageQuestion,
        grid: CellGrid,
        params: Mapping[str, ParamValue],
        normalise: Normaliser,
    ) -> ImageAttribution:
        return method(model, question, grid)

    return run


def _cost(passes: float = 0.0, per_target: float = 0.0, scaled_by: str = "") -> explanations_pb2.MethodCost:
    return explanations_pb2.MethodCost(passes=passes, passes_per_target=per_target, scaled_by_param=scaled_by)


# Occlusion's passes per picture: one per cell of the model's grid (49 for the constructed VLM), plus the original.
_OCCLUSION_PASSES = 50.0

IMAGE_METHODS: dict[str, ImageMethod] = {
    method.name: method
    for method in (
        ImageMethod(
            "occlusion",
            "Each cell of the picture replaced by a baseline (a flat colour or a blurred copy); the score is the drop "
            "in the explained token's log-probability.",
            (
                ParamSpec(
                    "baseline",
                    str,
                    "grey",
                    "What replaces a cell: a flat colour or a blurred copy of the picture.",
                    choices=(*OCCLUSION_COLOURS, BLUR),
                ),
                _BATCH_SIZE,
            ),
            needs_gradients=False,
            attributes_tokens=False,
            cost=_cost(passes=_OCCLUSION_PASSES),
            run=_occlusion,
        ),
        ImageMethod(
            "saliency",
            "|d log p / d pixel| summed over each cell (and |d log p / d embedding| per text token).",
            (),
            needs_gradients=True,
            attributes_tokens=True,
            cost=_cost(passes=1, per_target=2),
            run=_plain(saliency),
        ),
        ImageMethod(
            "input_x_gradient",
            "pixel x d log p / d pixel summed over each cell (embedding . gradient per text token).",
            (),
            needs_gradients=True,
            attributes_tokens=True,
            cost=_cost(passes=1, per_target=2),
            run=_plain(input_x_gradient),
        ),
        ImageMethod(
            "integrated_gradients",
            "Pixels times the mean gradient along the straight path from a flat (black or white) or blurred picture, "
            "summed per cell; with with_text the text embeddings travel from zero on the same path, so cells and "
            "text tokens add up to the score's change (extras: convergence_delta).",
            (
                ParamSpec(
                    "baseline",
                    str,
                    BLACK,
                    "Where the path starts: a black, white or blurred picture (white is the blank page of the "
                    "constructed model's pictures).",
                    choices=(BLACK, WHITE, BLUR),
                ),
                ParamSpec("steps", int, 32, "Points on the path (Gauss-Legendre).", 1, 256),
                _BATCH_SIZE,
                ParamSpec(
                    "with_text",
                    bool,
                    False,
                    "Integrate the text embeddings too (from zero), for a picture/text share; the whole prompt is "
                    "rebuilt along that path, which needs many more steps to converge (see convergence_delta).",
                ),
            ),
            needs_gradients=True,
            attributes_tokens=True,
            cost=_cost(passes=1, per_target=3, scaled_by="steps"),
            run=_integrated_gradients,
        ),
        ImageMethod(
            "attention",
            "Attention from each explained token's predicting position to the picture's tokens, mean over layers and "
            "heads, summed per cell (and to each text token).",
            (),
            needs_gradients=False,
            attributes_tokens=True,
            cost=_cost(passes=1),
            run=_plain(attention),
        ),
        ImageMethod(
            "logit_lens",
            "The explained token's probability read out (final norm and unembedding) at each image position, mean "
            "over layers, per cell.",
            (),
            needs_gradients=False,
            attributes_tokens=False,
            cost=_cost(passes=1),
            run=_logit_lens,
        ),
    )
}


def get_image_method(name: str) -> ImageMethod:
    """The image method called ``name``; UnknownMethodError naming those offered if there is none."""
    return method_named(name, IMAGE_METHODS)


def image_catalog(model_name: str, architecture: str) -> explanations_pb2.ListMethodsResponse:
    """What ListMethods answers for workers holding an image-text model: the image methods only."""
    return explanations_pb2.ListMethodsResponse(
        methods=[IMAGE_METHODS[name].info() for name in sorted(IMAGE_METHODS)],
        model=model_name,
        architecture=architecture,
        # Autograd over the Hugging Face module itself: the general path.
        explain_path=types_pb2.EXPLAIN_PATH_GENERAL,
    )
