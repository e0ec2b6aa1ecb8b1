"""Image attributions: one score per cell of a grid over each picture, per explained token, plus the text tokens'
scores where the method has them, and how the attribution splits between the picture and the text.

- occlusion: each cell replaced by a baseline (a flat colour or a blurred copy of the picture); the score is the
  explained log-probability's drop, f(x) - f(x with the cell replaced), recomputed per cell. With
  `text_baseline_id`, each text token before the explained one is replaced by that token in turn too.
- saliency: |d f / d pixel| summed over the cell's pixels and channels (and |d f / d embedding| per text token).
- input_x_gradient: pixel * d f / d pixel summed per cell (embedding . gradient per text token).
- integrated_gradients: (x - x0) times the weighted gradients along the straight path from a black (or another
  colour's) or blurred baseline, summed per cell; with `with_text`, the text embeddings travel along the same path
  from a baseline token's (or zero), so the cells and the text tokens together add up to f(x) - f(x0, baseline
  text) (completeness); the error of the quadrature is reported as convergence_delta, as the text method does.
- attention: the attention from each explained token's predicting position to the image tokens, averaged over
  layers and heads, summed into cells.
- logit_lens: the probability of the explained token when each image position's residual stream is decoded with the
  final norm and unembedding, per layer.

Pixels are the processor's normalised pixels (the model's input); the grid is in that picture's pixel space.

Baselines, and why the defaults are what they are:
- occlusion replaces a cell by the processor's mean colour (0 in every normalised channel, mid-grey): it is the
  colour that carries the least on average over pictures, and on the constructed VLM it matches no colour the
  tower knows, so the cell reads as the blank page. Black is a poor default there: it writes " black" into the
  picture. Idefics3 reads a picture that is 0 everywhere as padding, so occluding the whole picture (a 1 x 1 grid)
  with it is refused; choose another colour for that.
- integrated gradients starts from black (Sundararajan et al.'s baseline, and never the padding picture), or a
  blurred copy, which keeps the picture's colours and removes its detail; on the constructed VLM, which reads
  colour only, a blur must be wide (a quarter of the picture by default) for the baseline to differ at all.
- text baselines are a token id (the text methods' replacement token): zero embeddings are a poor start on RMSNorm
  models, whose score changes abruptly within ~1e-3 of zero.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

import torch
from torch import nn

from explainers.general_path import _eager_attention
from explainers.image_methods.grid import CellGrid, ImageExplainError, blurred
from explainers.image_methods.passes import (
    ImageQuestion,
    embedding_leaf,
    gradients,
    image_positions,
    scores_in_batches,
    target_scores,
    text_embeddings,
    text_mask,
    text_occluded_scores,
    token_grid,
)
from explainers.methods.integrated_gradients import QUADRATURES, quadrature_rule

# Processor-normalised colours (mean 0.5, std 0.5: a pixel p becomes p / 127.5 - 1).
BLACK = -1.0
MEAN_COLOUR = (0.0, 0.0, 0.0)  # mid-grey: occlusion's default replacement


class Baseline(enum.Enum):
    COLOUR = "colour"  # a flat colour (black for integrated gradients, mid-grey for occlusion, unless given)
    BLUR = "blur"  # a blurred copy of the picture


@dataclass(frozen=True)
class ImageAttribution:
    """Scores for each explained token: cells [num_targets, num_images, rows, cols] over `grid`, text tokens
    [num_targets, num_tokens] (zero at image positions; None when the method scores no text), and the explained
    log-probabilities [num_targets]. Integrated gradients adds the score at its baseline and convergence_delta
    [num_targets]: the sum of all its attributions minus (scores - baseline_scores), near 0 when the steps suffice."""

    method: str
    grid: CellGrid
    cells: torch.Tensor
    text: torch.Tensor | None
    scores: torch.Tensor
    baseline_scores: torch.Tensor | None = None
    convergence_delta: torch.Tensor | None = None

    def image_share(self) -> torch.Tensor | None:
        """Per explained token, the picture's share of the attribution's absolute mass, in [0, 1]; None without
        text scores."""
        if self.text is None:
            return None
        image = self.cells.abs().flatten(1).sum(1)
        text = self.text.abs().sum(1)
        return image / (image + text).clamp_min(torch.finfo(image.dtype).tiny)


def default_blur_radius(pixel_values: torch.Tensor) -> int:
    """A quarter of the picture's shorter side: wide enough to blur away an object, not the whole picture."""
    return max(1, min(int(pixel_values.shape[-2]), int(pixel_values.shape[-1])) // 4)


def baseline_pixels(
    pixel_values: torch.Tensor,
    baseline: Baseline,
    colour: tuple[float, float, float] | None = None,
    blur_radius: int | None = None,
) -> torch.Tensor:
    """The baseline picture(s), same shape as pixel_values; `colour` in normalised pixel values per channel (black
    when not given), `blur_radius` in pixels (default_blur_radius when not given)."""
    if baseline is Baseline.BLUR:
        return blurred(pixel_values, default_blur_radius(pixel_values) if blur_radius is None else blur_radius)
    fill = torch.tensor(colour if colour is not None else (BLACK, BLACK, BLACK), dtype=pixel_values.dtype)
    if fill.shape[0] != pixel_values.shape[-3]:
        raise ImageExplainError(f"baseline colour needs {pixel_values.shape[-3]} channels, got {fill.shape[0]}")
    return fill[:, None, None].expand_as(pixel_values).clone()


def occlusion(
    model: nn.Module,
    question: ImageQuestion,
    grid: CellGrid,
    baseline: Baseline = Baseline.COLOUR,
    colour: tuple[float, float, float] | None = None,
    batch_size: int = 8,
    blur_radius: int | None = None,
    text_baseline_id: int | None = None,
) -> ImageAttribution:
    """Cells and, with text_baseline_id, text tokens scored by the drop when each is replaced; the colour is the
    processor's mean (mid-grey) when not given."""
    pixels = question.pixel_values
    replacement = baseline_pixels(pixels, baseline, colour if colour is not None else MEAN_COLOUR, blur_radius)
    masks = grid.cell_masks()
    num_images = int(pixels.shape[0])
    variants = [pixels[None]]
    for image in range(num_images):
        for mask in masks:
            occluded = pixels.clone()
            occluded[image][:, mask] = replacement[image][:, mask]
            variants.append(occluded[None])
    scores = scores_in_batches(model, question, torch.cat(variants), batch_size)  # [1 + images * cells, targets]
    drops = scores[0] - scores[1:]
    cells = drops.T.reshape(-1, num_images, grid.rows, grid.cols)
    text = None
    if text_baseline_id is not None:
        before_last = torch.arange(len(question.token_ids)) < max(question.target_positions)
        positions = (text_mask(model, question) & before_last).nonzero().flatten()
        replaced = text_occluded_scores(model, question, positions, text_baseline_id, batch_size)
        text = torch.zeros(len(question.target_positions), len(question.token_ids))
        text[:, positions] = (scores[0] - replaced).T
    return ImageAttribution("occlusion", grid, cells, text, scores[0])


def _text_scores(model: nn.Module, question: ImageQuestion, per_token: torch.Tensor) -> torch.Tensor:
    return per_token * text_mask(model, question).to(per_token.dtype)


def saliency(model: nn.Module, question: ImageQuestion, grid: CellGrid) -> ImageAttribution:
    scores, pixel_grads, text_grads = gradients(model, question, question.pixel_values[None])
    cells = grid.pool(pixel_grads[:, 0].abs().sum(-3))
    text = _text_scores(model, question, text_grads[:, 0].abs().sum(-1))
    return ImageAttribution("saliency", grid, cells, text, scores[0])


def input_x_gradient(model: nn.Module, question: ImageQuestion, grid: CellGrid) -> ImageAttribution:
    scores, pixel_grads, text_grads = gradients(model, question, question.pixel_values[None])
    cells = grid.pool((pixel_grads[:, 0] * question.pixel_values).sum(-3))
    text = _text_scores(model, question, (text_grads[:, 0] * text_embeddings(model, question)).sum(-1))
    return ImageAttribution("input_x_gradient", grid, cells, text, scores[0])


def integrated_gradients(
    model: nn.Module,
    question: ImageQuestion,
    grid: CellGrid,
    baseline: Baseline = Baseline.COLOUR,
    colour: tuple[float, float, float] | None = None,
    steps: int = 32,
    batch_size: int = 8,
    with_text: bool = False,
    quadrature: str = "gausslegendre",
    blur_radius: int | None = None,
    text_baseline_id: int | None = None,
) -> ImageAttribution:
    """Integrated gradients with `steps` points of `quadrature` (the text method's rules, as Captum's `method`):

        cell = sum over its pixels and channels of (x - x0) * sum_s weight_s * df/dx(x0 + a_s (x - x0))

    With `with_text`, the text embeddings go the same way from text_baseline_id's embedding (zero when None), and
    the text tokens' attributions are (e - e0) . the weighted gradients. convergence_delta is the sum of every
    attribution minus f(x) - f(x0) (with the text at its baseline when with_text): completeness' error, which
    shrinks as steps grow where the path's score is smooth at their spacing."""
    if steps < 1:
        raise ImageExplainError(f"integrated gradients needs at least 1 step, got {steps}")
    if quadrature not in QUADRATURES:
        raise ImageExplainError(f"quadrature must be one of {', '.join(QUADRATURES)}, got {quadrature!r}")
    pixels = question.pixel_values
    start = baseline_pixels(pixels, baseline, colour, blur_radius)
    alphas, weights = (values.to(pixels.dtype) for values in quadrature_rule(quadrature, steps))
    num_targets = len(question.target_positions)
    pixel_total = torch.zeros(num_targets, *pixels.shape)
    embedded = text_embeddings(model, question)
    text_start = None if text_baseline_id is None else text_embeddings(model, question, text_baseline_id)
    text_total = torch.zeros(num_targets, *embedded.shape)
    for first in range(0, steps, batch_size):
        chunk, chunk_weights = alphas[first : first + batch_size], weights[first : first + batch_size]
        path = start[None] + chunk[:, None, None, None, None] * (pixels - start)[None]
        _, pixel_grads, text_grads = gradients(
            model, question, path, chunk if with_text else None, text_start if with_text else None
        )
        pixel_total += torch.einsum("tb...,b->t...", pixel_grads, chunk_weights)
        text_total += torch.einsum("tb...,b->t...", text_grads, chunk_weights)
    cells = grid.pool(((pixels - start)[None] * pixel_total).sum(-3))
    text = None
    total = cells.flatten(1).sum(1)
    if with_text:
        text_difference = embedded - (0 if text_start is None else text_start)
        text = _text_scores(model, question, (text_difference[None] * text_total).sum(-1))
        total = total + text.sum(1)
    with torch.no_grad():
        scores = target_scores(model, question, pixels[None])[0][0]
        scale = torch.zeros(1) if with_text else None
        with embedding_leaf(model, scale, text_start):
            baseline_scores = target_scores(model, question, start[None])[0][0]
    convergence_delta = total - (scores - baseline_scores)
    return ImageAttribution("integrated_gradients", grid, cells, text, scores, baseline_scores, convergence_delta)


def attention(model: nn.Module, question: ImageQuestion, grid: CellGrid) -> ImageAttribution:
    """Attention [targets, images, cells] from each explained token's predicting position, mean over layers and
    heads; text scores are the same attention to the text tokens."""
    with torch.no_grad(), _eager_attention(model):  # type: ignore[arg-type]
        scores, outputs = target_scores(model, question, question.pixel_values[None], output_attentions=True)
    stacked = torch.stack([layer[0] for layer in outputs.attentions])  # [layers, heads, tokens, tokens]
    predicting = torch.tensor(question.target_positions) - 1
    mean = stacked.mean(dim=(0, 1))[predicting]  # [targets, tokens]
    per_token = mean[:, image_positions(model, question)]  # [targets, images, tokens per image]
    cells = grid.pool_tokens(per_token, token_grid(model, question))
    return ImageAttribution("attention", grid, cells, _text_scores(model, question, mean), scores[0])


def logit_lens(model: nn.Module, question: ImageQuestion, grid: CellGrid) -> tuple[ImageAttribution, torch.Tensor]:
    """The explained token's probability decoded at each image position: cells are the mean over layers; the
    second value is per layer [targets, layers + 1, images, rows, cols] (layer 0: the image features themselves)."""
    with torch.no_grad():
        scores, outputs = target_scores(model, question, question.pixel_values[None], output_hidden_states=True)
        positions = image_positions(model, question)
        norm: nn.Module = model.model.text_model.norm  # type: ignore[union-attr, assignment]
        states = torch.stack(outputs.hidden_states)[:, 0][:, positions]  # [layers + 1, images, tokens, hidden]
        # transformers' last hidden state is already normed; every other layer is normed here.
        normed = torch.cat([norm(states[:-1]), states[-1:]])
        probs = torch.softmax(model.lm_head(normed).float(), dim=-1)  # type: ignore[operator]
    per_layer = probs[..., question.target_ids].permute(3, 0, 1, 2)  # [targets, layers + 1, images, tokens]
    pooled = grid.pool_tokens(per_layer, token_grid(model, question))
    attribution = ImageAttribution("logit_lens", grid, pooled.mean(1), None, scores[0])
    return attribution, pooled
