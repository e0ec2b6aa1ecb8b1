"""AttnLRP relevances of the float32 tiny Llama by lxt, the reference implementation, written as .npy to the path
given: [num_targets, num_tokens] for the fixed sequence of tests/explainers/conftest.py.

    python -m tests.explainers.lxt_reference OUT.npy

A separate process, because lxt patches transformers' Llama classes for the whole process. lxt 2.1's package
__init__ imports its ViT and BERT patches, which need torchvision and a transformers older than ours, so its rule
modules are loaded on their own, and its attention wrapper is put where transformers 5 looks up eager attention.
"""

from __future__ import annotations

import importlib.util
import sys
import types
from pathlib import Path

import numpy as np
import torch


def _lxt_module(name: str) -> types.ModuleType:
    """lxt.efficient.<name> loaded from its file, its parent packages stood in by empty ones."""
    spec = importlib.util.find_spec("lxt")
    assert spec is not None and spec.submodule_search_locations is not None
    root = Path(next(iter(spec.submodule_search_locations)))
    for package, path in (("lxt", root), ("lxt.efficient", root / "efficient")):
        if package not in sys.modules:
            stand_in = types.ModuleType(package)
            stand_in.__path__ = [str(path)]
            sys.modules[package] = stand_in
    module_spec = importlib.util.spec_from_file_location(f"lxt.efficient.{name}", root / "efficient" / f"{name}.py")
    assert module_spec is not None and module_spec.loader is not None
    module = importlib.util.module_from_spec(module_spec)
    sys.modules[module_spec.name] = module
    module_spec.loader.exec_module(module)
    return module


def main() -> None:
    from transformers.models.llama import modeling_llama

    from tests.explainers.conftest import OUTPUT_IDS, PROMPT_IDS, build_tiny_llama

    patches = _lxt_module("patches")
    patches.patch_method(patches.rms_norm_forward, modeling_llama.LlamaRMSNorm)
    patches.patch_method(patches.gated_mlp_forward, modeling_llama.LlamaMLP)
    modeling_llama.eager_attention_forward = patches.wrap_attention_forward(modeling_llama.eager_attention_forward)

    model = build_tiny_llama(torch.float32)
    model.set_attn_implementation("eager")
    token_ids = torch.tensor([PROMPT_IDS + OUTPUT_IDS])
    relevances = []
    for position in range(len(PROMPT_IDS), token_ids.shape[1]):
        embeddings = model.get_input_embeddings()(token_ids).detach().requires_grad_(True)
        logit = model(inputs_embeds=embeddings).logits[0, position - 1, token_ids[0, position]]
        (gradient,) = torch.autograd.grad(logit, embeddings)
        relevances.append((embeddings * gradient).sum(dim=-1)[0])
    np.save(sys.argv[1], torch.stack(relevances).detach().numpy(), allow_pickle=False)


if __name__ == "__main__":
    main()
