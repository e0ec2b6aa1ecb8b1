"""Input x gradient: how much each preceding token's input embedding pushes each generated token's score."""

from __future__ import annotations

import torch

from explainers.methods.gradients import EmbeddingGradientMethod, gradient_times_state


class InputXGradient(EmbeddingGradientMethod):
    """attribution[i, j] = sum_h embedding[j, h] * d score_i / d embedding[j, h], signed."""

    name = "input_x_gradient"
    description = (
        "Signed input x gradient: for each generated token, the gradient of its score (log-probability by "
        "default) with respect to every preceding token's input embedding, times that embedding, summed over the "
        "hidden dimension."
    )

    def reduce(self, gradients: torch.Tensor, embeddings: torch.Tensor) -> torch.Tensor:
        return gradient_times_state(gradients, embeddings)
