"""Saliency: how strongly each preceding token's input embedding can move each generated token's score."""

from __future__ import annotations

import torch

from explainers.methods.gradients import EmbeddingGradientMethod


class Saliency(EmbeddingGradientMethod):
    """attribution[i, j] = || d score_i / d embedding[j] ||_2 over the hidden dimension, unsigned."""

    name = "saliency"
    description = (
        "Unsigned gradient saliency: for each generated token, the L2 norm over the hidden dimension of the gradient "
        "of its score with respect to every preceding token's input embedding."
    )

    def reduce(self, gradients: torch.Tensor, embeddings: torch.Tensor) -> torch.Tensor:
        norms: torch.Tensor = torch.linalg.vector_norm(gradients, dim=-1)
        return norms
