"""Explaining a Generate request whose chat holds pictures: the gateway's checks before generating (the shared
explain spec's image rules, against the workers' catalogue), and the job's pictures and messages (common/jobs.py)."""

from __future__ import annotations

from typing import Any

from common.explain_spec import check_image_methods, check_image_options
from common.jobs import ExplainOptions
from server.costs import PlannedMethod
from server.errors import spec_errors_as_invalid_argument
from server.explanations import ExplanationBroker
from server.images import ImagePrompt


async def check_image_plan(methods: list[PlannedMethod], options: ExplainOptions, broker: ExplanationBroker) -> None:
    """INVALID_ARGUMENT, before generating, for methods that do not explain pictures (naming those that do) and for
    options the image methods do not offer."""
    catalogue = await broker.catalog()
    with spec_errors_as_invalid_argument():
        check_image_methods(
            [method.request.name for method in methods], {info.name: info.multimodal for info in catalogue.methods}
        )
        check_image_options(options)


def job_messages(prompt: ImagePrompt) -> list[dict[str, Any]]:
    """The prompt's messages as the job carries them: each picture part a bare {"type": "image"} (its bytes travel
    once, in the job's images, in the same order)."""
    return [
        {
            "role": message["role"],
            "content": [
                {"type": "image"} if part["type"] == "image_url" else {"type": "text", "text": part["text"]}
                for part in message["content"]
            ],
        }
        for message in prompt.messages
    ]
