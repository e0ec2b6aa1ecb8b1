"""Image attributions: one score per cell of a grid over each picture, per explained token, plus the text tokens'
scores where the method has them, and how the attribution splits between the picture and the text.

- occlusion: each cell replaced by a baseline (a flat colour or a blurred copy of the picture); the score is the
  explained log-probability's drop, f(x) - f(x with the cell replaced), recomputed per cell.
- saliency: |d f / d pixel| summed over the cell's pixels and channels (and |d f / d embedding| per text token).
- input_x_gradient: pixel * d f / d pixel summed per cell (embedding . gradient per text token).
- integrated_gradients: (x - x0) times the mean gradient along the straight path from a black or blurred baseline,
  summed per cell; with `with_text`, the text embeddings travel from zero along the same path, so the cells and
  the text tokens together add up to f(x) - f(x0, no text) (completeness).
- attention: the attention from each explained token's predicting position to the image tokens, averaged over
  layers and heads, summed into cells.
- logit_lens: the probability of the explained token when each image position's residual stream is decoded with the
  final norm and unembedding, per layer.

Pixels are the processor's normalised pixels (the model's input); the grid is in that picture's pixel space.
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
    gradients,
    image_positions,
    scores_in_batches,
    target_scores,
    text_embeddings,
    text_mask,
    token_grid,
)

# The processor's normalised value of a black pixel (mean 0.5, std 0.5): the black baseline. Idefics3 drops a
# picture that is exactly 0 everywhere as padding, so mid-grey is never used as a baseline.
BLACK = -1.0


class Baseline(enum.Enum):
    COLOUR = "colour"  # a flat colour (black unless given)
    BLUR = "blur"  # a blurred copy of the picture


@dataclass(frozen=True)
class ImageAttribution:
    """Scores for each explained token: cells [num_targets, num_images, rows, cols] over `grid`, text tokens
    [num_targets, num_tokens] (zero at image positions; None when the method scores no text), and the explained
    log-probabilities [num_targets]."""

    method: str
    grid: CellGrid
    cells: torch.Tensor
    text: torch.Tensor | None
    scores: torch.Tensor

    def image_share(self) -> torch.Tensor | None:
        """Per explained token, the picture's share of the attribution's absolute mass, in [0, 1]; None without
        text scores."""
        if self.text is None:
            return None
        image = self.cells.abs().flatten(1).sum(1)
        text = self.text.abs().sum(1)
        return image / (image + text).clamp_min(torch.finfo(image.dtype).tiny)


def baseline_pixels(
    pixel_values: torch.Tensor, baseline: Baseline, colour: tuple[float, float, float] | None = None
) -> torch.Tensor:
    """The baseline picture(s), same shape as pixel_values; `colour` in normalised pixel values per channel."""
    if baseline is Baseline.BLUR:
        return blurred(pixel_values)
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
) -> ImageAttribution:
    pixels = question.pixel_values
    replacement = baseline_pixels(pixels, baseline, colour)
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
    return ImageAttribution("occlusion", grid, cells, None, scores[0])


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
) -> ImageAttribution:
    """Midpoint-rule integrated gradients; the explained score of the baseline is f(x0) = scores - sum of all
    attributions up to the rule's error, which the tests bound."""
    if steps < 1:
        raise ImageExplainError(f"integrated gradients needs at least 1 step, got {steps}")
    pixels = question.pixel_values
    start = baseline_pixels(pixels, baseline, colour)
    alphas = (torch.arange(steps, dtype=pixels.dtype) + 0.5) / steps
    pixel_total = torch.zeros(len(question.target_positions), *pixels.shape)
    embedded = text_embeddings(model, question)
    text_total = torch.zeros(len(question.target_positions), *embedded.shape)
    for first in range(0, steps, batch_size):
        chunk = alphas[first : first + batch_size]
        path = start[None] + chunk[:, None, None, None, None] * (pixels - start)[None]
        _, pixel_grads, text_grads = gradients(model, question, path, chunk if with_text else None)
        pixel_total += pixel_grads.sum(1)
        text_total += text_grads.sum(1)
    cells = grid.pool(((pixels - start)[None] * pixel_total / steps).sum(-3))
    text = None
    if with_text:
        text = _text_scores(model, question, (embedded[None] * text_total / steps).sum(-1))
    with torch.no_grad():
        scores = target_scores(model, question, pixels[None])[0][0]
    return ImageAttribution("integrated_gradients", grid, cells, text, scores)


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
