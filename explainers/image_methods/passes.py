"""Forward and backward passes of an image-text model (transformers' Idefics3 layout: `model.model.text_model`, the
vision tower and connector, `model.lm_head`) that the image methods share.

The explained quantity is the log-probability of each explained token given everything before it: the same score the
text methods explain. Text-side gradients are taken at the token embeddings, through a forward hook on the embedding
layer that hands the model a leaf tensor (scaled along an integrated-gradients path when asked); the image tokens'
rows of it are overwritten by the picture's features, so the image reaches the model only through the pixels.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from explainers.image_methods.grid import CellGrid, ImageExplainError


@dataclass(frozen=True)
class ImageQuestion:
    """One sequence to explain: prompt and generated ids, the pictures in it, and which tokens to explain."""

    token_ids: torch.Tensor  # [num_tokens]: prompt then generated tokens, image placeholders expanded
    pixel_values: torch.Tensor  # [num_images, channels, height, width], as the model's processor makes them
    target_positions: tuple[int, ...]  # indices into token_ids of the explained tokens (each > 0)

    def __post_init__(self) -> None:
        if not self.target_positions:
            raise ImageExplainError("no token to explain")
        if min(self.target_positions) < 1 or max(self.target_positions) >= len(self.token_ids):
            raise ImageExplainError(
                f"explained positions must be within 1..{len(self.token_ids) - 1}, got {self.target_positions}"
            )

    @property
    def target_ids(self) -> torch.Tensor:
        return self.token_ids[list(self.target_positions)]

    @property
    def image_grid(self) -> CellGrid:
        """The whole picture as a 1 x 1 grid: its pixel size."""
        return CellGrid(1, 1, int(self.pixel_values.shape[-2]), int(self.pixel_values.shape[-1]))


def image_token_id(model: nn.Module) -> int:
    return int(model.config.image_token_id)  # type: ignore[union-attr, arg-type]


def token_grid(model: nn.Module, question: ImageQuestion) -> CellGrid:
    """The model's own grid of image tokens over one picture, from how many tokens each picture has."""
    num_image_tokens = int((question.token_ids == image_token_id(model)).sum())
    num_images = int(question.pixel_values.shape[0])
    per_image = num_image_tokens // max(num_images, 1)
    side = round(per_image**0.5)
    if num_images == 0 or side * side * num_images != num_image_tokens:
        raise ImageExplainError(
            f"{num_image_tokens} image tokens for {num_images} pictures: expected a square grid of tokens per picture"
        )
    height, width = int(question.pixel_values.shape[-2]), int(question.pixel_values.shape[-1])
    return CellGrid(side, side, height, width)


def image_positions(model: nn.Module, question: ImageQuestion) -> torch.Tensor:
    """Indices [num_images, tokens_per_image] of the image tokens, picture by picture, row-major within one."""
    positions = (question.token_ids == image_token_id(model)).nonzero().flatten()
    return positions.reshape(int(question.pixel_values.shape[0]), -1)


def text_mask(model: nn.Module, question: ImageQuestion) -> torch.Tensor:
    """[num_tokens] True where a token is text (not an image placeholder)."""
    return question.token_ids != image_token_id(model)


@contextmanager
def embedding_leaf(
    model: nn.Module, scale: torch.Tensor | None = None, start: torch.Tensor | None = None
) -> Iterator[list[torch.Tensor]]:
    """While active, the text embedding layer's output is replaced by a leaf tensor that requires grad; with `scale`
    [batch] it is the point start + scale * (embeddings - start) of an integrated-gradients path, from `start`
    [num_tokens, hidden] (zero when not given). The leaves of each pass are appended to the yielded list."""
    leaves: list[torch.Tensor] = []
    embedding: nn.Module = model.model.text_model.get_input_embeddings()  # type: ignore[union-attr, operator]

    def replace(_: nn.Module, __: Any, output: torch.Tensor) -> torch.Tensor:
        leaf = output.detach().clone()
        if scale is not None:
            origin = torch.zeros_like(leaf) if start is None else start.to(leaf.dtype).expand_as(leaf)
            leaf = origin + scale.to(leaf.dtype)[:, None, None] * (leaf - origin)
        leaf.requires_grad_(True)
        leaves.append(leaf)
        return leaf

    handle = embedding.register_forward_hook(replace)
    try:
        yield leaves
    finally:
        handle.remove()


def target_scores(
    model: nn.Module, question: ImageQuestion, pixel_batch: torch.Tensor, **forward: Any
) -> tuple[torch.Tensor, Any]:
    """Log-probabilities [batch, num_targets] of the explained tokens for each picture set in pixel_batch [batch,
    num_images, channels, height, width], and the model's output (for hidden states / attentions when asked)."""
    batch = int(pixel_batch.shape[0])
    return _scores(model, question, question.token_ids[None].expand(batch, -1), pixel_batch, **forward)


def image_text_forward(model: nn.Module, ids: torch.Tensor, pixel_batch: torch.Tensor, **forward: Any) -> Any:
    """The text model's outputs (transformers' Idefics3 ``model.model``) for token ids [batch, num_tokens] and
    pictures [batch, num_images, channels, height, width], every pixel valid (no tiles, no padding)."""
    batch = int(pixel_batch.shape[0])
    return model.model(  # type: ignore[operator]
        input_ids=ids,
        pixel_values=pixel_batch,
        pixel_attention_mask=torch.ones(batch, *pixel_batch.shape[1:2], *pixel_batch.shape[-2:], dtype=torch.bool),
        use_cache=False,
        **forward,
    )


def _scores(
    model: nn.Module, question: ImageQuestion, ids: torch.Tensor, pixel_batch: torch.Tensor, **forward: Any
) -> tuple[torch.Tensor, Any]:
    """target_scores for token ids [batch, num_tokens] (the question's, or a text-occluded copy) and pictures."""
    batch = int(pixel_batch.shape[0])
    blank = (pixel_batch == 0).flatten(2).all(-1)
    if bool(blank.any()):
        # Idefics3 drops a picture that is exactly 0 everywhere as padding (its tokens would get no features).
        raise ImageExplainError(
            "a picture made entirely of the processor's mean colour (0 in every normalised pixel) is read as padding "
            "by the model; choose another baseline colour or a finer grid"
        )
    outputs = image_text_forward(model, ids, pixel_batch, **forward)
    predicting = torch.tensor(question.target_positions) - 1
    logits = model.lm_head(outputs.last_hidden_state[:, predicting])  # type: ignore[operator]
    log_probs = torch.log_softmax(logits.float(), dim=-1)
    scores = log_probs.gather(-1, question.target_ids[None, :, None].expand(batch, -1, 1))[..., 0]
    return scores, outputs


def scores_in_batches(
    model: nn.Module, question: ImageQuestion, pixel_sets: torch.Tensor, batch_size: int
) -> torch.Tensor:
    """target_scores [len(pixel_sets), num_targets] without gradients, batch_size picture sets per pass."""
    if batch_size < 1:
        raise ImageExplainError(f"batch size must be at least 1, got {batch_size}")
    chunks = []
    with torch.no_grad():
        for start in range(0, int(pixel_sets.shape[0]), batch_size):
            chunks.append(target_scores(model, question, pixel_sets[start : start + batch_size])[0])
    return torch.cat(chunks)


def text_occluded_scores(
    model: nn.Module, question: ImageQuestion, positions: torch.Tensor, replacement_id: int, batch_size: int
) -> torch.Tensor:
    """target_scores [len(positions), num_targets] with the token at each of `positions` replaced by
    `replacement_id` in turn (the pictures unchanged), without gradients, batch_size sequences per pass."""
    if batch_size < 1:
        raise ImageExplainError(f"batch size must be at least 1, got {batch_size}")
    vocab_size = int(model.get_input_embeddings().num_embeddings)  # type: ignore[operator]
    if not 0 <= replacement_id < vocab_size:
        raise ImageExplainError(f"the text replacement token id must be in [0, {vocab_size}), got {replacement_id}")
    chunks = []
    with torch.no_grad():
        for first in range(0, len(positions), batch_size):
            chunk = positions[first : first + batch_size]
            ids = question.token_ids[None].repeat(len(chunk), 1)
            ids[torch.arange(len(chunk)), chunk] = replacement_id
            pixels = question.pixel_values[None].expand(len(chunk), *question.pixel_values.shape)
            chunks.append(_scores(model, question, ids, pixels)[0])
    return torch.cat(chunks) if chunks else torch.zeros(0, len(question.target_positions))


def gradients(
    model: nn.Module,
    question: ImageQuestion,
    pixel_batch: torch.Tensor,
    text_scale: torch.Tensor | None = None,
    text_start: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Scores [batch, num_targets] and their gradients to the pixels [num_targets, batch, num_images, channels,
    height, width] and to the text embeddings [num_targets, batch, num_tokens, hidden], one backward per target;
    text_scale and text_start place the text on an integrated-gradients path (embedding_leaf)."""
    pixels = pixel_batch.detach().clone().requires_grad_(True)
    with torch.enable_grad(), embedding_leaf(model, text_scale, text_start) as leaves:
        scores, _ = target_scores(model, question, pixels)
        pixel_grads, text_grads = [], []
        num_targets = int(scores.shape[1])
        for target in range(num_targets):
            pixel_grad, text_grad = torch.autograd.grad(
                scores[:, target].sum(), [pixels, leaves[0]], retain_graph=target < num_targets - 1
            )
            pixel_grads.append(pixel_grad)
            text_grads.append(text_grad)
    return scores.detach(), torch.stack(pixel_grads), torch.stack(text_grads)


def text_embeddings(model: nn.Module, question: ImageQuestion, token_id: int | None = None) -> torch.Tensor:
    """The token embeddings [num_tokens, hidden] the model reads (image rows are placeholders' embeddings), or with
    `token_id` that token's embedding at every position."""
    embedding: nn.Module = model.model.text_model.get_input_embeddings()  # type: ignore[union-attr, operator]
    ids = question.token_ids if token_id is None else torch.full_like(question.token_ids, token_id)
    with torch.no_grad():
        embedded: torch.Tensor = embedding(ids)
    return embedded
