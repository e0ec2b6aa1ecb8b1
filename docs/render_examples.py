"""Render the per-method examples in docs/methods.md from a running stack.

    python docs/render_examples.py [--target 127.0.0.1:50051]

Asks the embedded model the France question once per method and prints, for the generated token
" Paris", its top sources (or, for the logit lens, how likely a few layers already found it).
"""

from __future__ import annotations

import argparse
import math

from sightline import Client, Explanation

QUESTION = [{"role": "user", "content": "What is the capital of France?"}]
# Cheaper than the defaults where the defaults take minutes on two cores.
PARAMS: dict[str, dict[str, int | float | str | bool]] = {
    "shapley_sampling": {"samples": 5},
    "layer_integrated_gradients": {"layer": 15},
    "gradient_x_activation": {"layer": 15},
}


def render(explanation: Explanation, method: str) -> str:
    paris = next(i for i, p in enumerate(explanation.target_positions) if explanation.tokens[p].text == " Paris")
    if method == "logit_lens":
        layers = explanation.logit_lens(paris)
        picked = [layers[i] for i in (0, len(layers) // 2, (3 * len(layers)) // 4, len(layers) - 1)]
        lines = [f"layer {layer.layer:2}: p(' Paris') = {math.exp(layer.target_logprob):.4f}" for layer in picked]
        return "\n".join(lines)
    return "\n".join(
        f"{source.position:3} {source.token.text!r:16} {source.score:+.4f}"
        for source in explanation.top_sources(paris, k=3, method=method)
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--target", default="127.0.0.1:50051")
    args = parser.parse_args()
    with Client(args.target, timeout=900) as client:
        for info in client.list_methods():
            generation = client.generate(QUESTION, max_tokens=16, explain={info.name: PARAMS.get(info.name, {})})
            assert generation.explanation is not None
            print(f"### {info.name}\n\n```\n{render(generation.explanation, info.name)}\n```\n")


if __name__ == "__main__":
    main()
