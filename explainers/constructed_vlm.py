"""Build the embedded vision-language model: SmolLM2-135M-Instruct behind a small vision tower whose weights are
*constructed*, not trained, so that a picture is legible to the language model and the truth about which parts of a
picture matter is known.

No pretrained VLM ships in a package reachable here, and a random vision tower would make every image mean nothing,
so attributions over it could not be checked against anything. The construction (documented in docs/multimodal.md):

- An Idefics3ForConditionalGeneration (224 px images, 16 px patches, pixel shuffle 2: a 7 x 7 grid of 49 image
  tokens, one per 32 px cell) whose text model is the embedded SmolLM2 unchanged, with Idefics3's image special
  tokens added to its vocabulary.
- The patch embedding measures each 16 px patch's mean colour; the one encoder layer's MLP classifies that colour
  as one of the corners of the RGB cube (a template match that is ~1 for the corner and ~0 elsewhere); the
  connector writes, for each 32 px cell, the mean of its four patches' colour-name embeddings: the token embedding
  of " red", " green", " blue", " yellow", " cyan", " black", or of the blank " " for white (the paper the picture
  is drawn on). The blank is also every cell's starting point, from the tower's constant anchor: a colour writes its
  name's embedding minus the blank's, so magenta, grey and colours far from every corner read as the blank page.
  (An earlier construction wrote nothing for them, a zero vector; on a straight path between two colours the image
  token then crossed zero, where the text model's first RMSNorm turns a vector of 1e-3 into a full-size one and
  flips its direction as it changes sign: the score jumped within 1e-4 of the path and integrated gradients could
  not resolve it.)

So the image tokens of a red square on white read, to SmolLM2, like " red" where the square is and blanks elsewhere,
and "What color is the square? Answer with one word." is answered "red" from the picture: the square's cells are
the cells that matter. Usage: ``python -m explainers.constructed_vlm [--out DIR]``.
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
from pathlib import Path
from typing import Any

from explainers.embedded_model import (
    MANIFEST_FILE,
    EmbeddedModelError,
    ModelManifest,
    _build_lock,
    _check_replaceable,
    _finalise_tree,
    _publish,
    _remove_leftovers,
    _tidy_tokenizer_config,
    default_model_dir,
    prepare_model,
    verify_manifest,
    weights_digest,
)

MODEL_NAME = "constructed-colour-vlm"
# What the manifest names as the source: the text model's digest is appended, so a rebuilt SmolLM2 rebuilds this.
# v2: cells start from the blank page (a colour far from every corner is blank, never a zero vector).
SOURCE_PREFIX = "constructed-v2:smollm2-135m-instruct@"
DTYPE = "float32"

IMAGE_SIZE = 224  # pixels per side the processor resizes to
PATCH_SIZE = 16  # pixels per side of a vision patch
SCALE_FACTOR = 2  # pixel shuffle: 2 x 2 patches per image token
GRID_SIDE = IMAGE_SIZE // PATCH_SIZE // SCALE_FACTOR  # 7 cells per side
IMAGE_SEQ_LEN = GRID_SIDE * GRID_SIDE  # 49 image tokens
CELL_PIXELS = IMAGE_SIZE // GRID_SIDE  # 32 px per cell side

IMAGE_TOKEN = "<image>"
# Idefics3's processor wraps each image's tokens in these; the tokenizer must know them as single tokens.
IMAGE_SPECIAL_TOKENS = ("<fake_token_around_image>", IMAGE_TOKEN, "<end_of_utterance>", "<global-img>")

# The corners of the RGB cube the tower recognises, in the processor's normalised space (pixel / 127.5 - 1), and the
# text each corner's cells carry. White is the blank page.
COLOURS: dict[str, tuple[tuple[int, int, int], str]] = {
    "red": ((1, -1, -1), " red"),
    "green": ((-1, 1, -1), " green"),
    "blue": ((-1, -1, 1), " blue"),
    "yellow": ((1, 1, -1), " yellow"),
    "cyan": ((-1, 1, 1), " cyan"),
    "black": ((-1, -1, -1), " black"),
    "white": ((1, 1, 1), " "),
}
# The 8-bit RGB of each colour, for drawing test pictures.
COLOUR_RGB: dict[str, tuple[int, int, int]] = {
    name: tuple(255 if c > 0 else 0 for c in corner)  # type: ignore[misc]
    for name, (corner, _) in COLOURS.items()
}

# Vision tower layout: residual dims [0:3] mean colour, [3:6] its negation, [6:8] +-ANCHOR, [8:8+K] colour
# activations, [8+K] minus their sum. Every pair cancels in the mean, and ANCHOR dominates the variance, so the
# tower's LayerNorms scale by a constant instead of reshaping the colour signal.
VISION_HIDDEN = 32
VISION_HEADS = 2
ANCHOR = 50.0
TEMPLATE_GAIN = 5.0  # the match neuron is GAIN for the exact corner, <= -GAIN for every other one
_ANCHOR_DIM = 6
_COLOUR_DIM = 8
_BALANCE_DIM = _COLOUR_DIM + len(COLOURS)


def default_vlm_dir() -> Path:
    return default_model_dir().parent / MODEL_NAME


def _vision_config() -> dict[str, Any]:
    return {
        "hidden_size": VISION_HIDDEN,
        "intermediate_size": len(COLOURS),
        "num_hidden_layers": 1,
        "num_attention_heads": VISION_HEADS,
        "num_channels": 3,
        "image_size": IMAGE_SIZE,
        "patch_size": PATCH_SIZE,
        "hidden_act": "gelu_pytorch_tanh",
        "layer_norm_eps": 1e-6,
    }


def _construct_vision(model: Any, colour_embeddings: Any, blank_embedding: Any) -> None:
    """Set the vision tower and connector weights as the module docstring describes."""
    import torch

    vision = model.model.vision_model
    with torch.no_grad():
        for parameter in [*vision.parameters(), *model.model.connector.parameters()]:
            parameter.zero_()
        patch = vision.embeddings.patch_embedding  # Conv2d(3, hidden, 16, stride 16)
        mean = 1.0 / (PATCH_SIZE * PATCH_SIZE)
        for channel in range(3):
            patch.weight[channel, channel] = mean
            patch.weight[3 + channel, channel] = -mean
        patch.bias[_ANCHOR_DIM], patch.bias[_ANCHOR_DIM + 1] = ANCHOR, -ANCHOR
        # The LayerNorms divide by the standard deviation the anchor fixes; their weight multiplies it back.
        sigma = ANCHOR * (2.0 / VISION_HIDDEN) ** 0.5
        layer = vision.encoder.layers[0]
        for norm in (layer.layer_norm1, layer.layer_norm2, vision.post_layernorm):
            norm.weight.fill_(sigma)
        # Attention's out-projection stays zero: each patch is read alone. The MLP matches each corner.
        for index, (corner, _) in enumerate(COLOURS.values()):
            layer.mlp.fc1.weight[index, :3] = TEMPLATE_GAIN * torch.tensor(corner, dtype=torch.float32)
            layer.mlp.fc1.bias[index] = -2 * TEMPLATE_GAIN
            layer.mlp.fc2.weight[_COLOUR_DIM + index, index] = 1 / TEMPLATE_GAIN
            layer.mlp.fc2.weight[_BALANCE_DIM, index] = -1 / TEMPLATE_GAIN
        # Pixel shuffle concatenates the 4 patches' hidden vectors; each contributes a quarter of its colour's text.
        # The anchor dim (ANCHOR after the post-LayerNorm) carries the blank page; a matched colour replaces it.
        projection = model.model.connector.modality_projection.proj.weight  # [text_hidden, 4 * vision_hidden]
        quarters = SCALE_FACTOR * SCALE_FACTOR
        for quarter in range(quarters):
            start = quarter * VISION_HIDDEN + _COLOUR_DIM
            projection[:, start : start + len(COLOURS)] = (colour_embeddings - blank_embedding).T / quarters
            projection[:, quarter * VISION_HIDDEN + _ANCHOR_DIM] = blank_embedding / (ANCHOR * quarters)


def _token_id(tokenizer: Any, token: str) -> int:
    token_id = tokenizer.convert_tokens_to_ids(token)
    if not isinstance(token_id, int):
        raise EmbeddedModelError(f"{token!r} is not one token of the tokenizer")
    return token_id


def _build(text_dir: Path, dest: Path) -> None:
    import torch
    from transformers import (
        AutoModelForCausalLM,
        AutoTokenizer,
        Idefics3Config,
        Idefics3ForConditionalGeneration,
        Idefics3ImageProcessorPil,
        Idefics3Processor,
    )

    tokenizer = AutoTokenizer.from_pretrained(str(text_dir), local_files_only=True)
    text_model = AutoModelForCausalLM.from_pretrained(str(text_dir), local_files_only=True, dtype=torch.float32)
    input_embeddings: Any = text_model.get_input_embeddings()
    embeddings = input_embeddings.weight.detach()
    colour_ids = []
    for name, (_, text) in COLOURS.items():
        ids = tokenizer.encode(text, add_special_tokens=False)
        if len(ids) != 1:
            raise EmbeddedModelError(f"colour {name!r}: {text!r} is {len(ids)} tokens in {text_dir}, need exactly 1")
        colour_ids.append(ids[0])
    blank = colour_ids[list(COLOURS).index("white")]

    tokenizer.add_special_tokens({"additional_special_tokens": list(IMAGE_SPECIAL_TOKENS)})
    special_ids = [_token_id(tokenizer, token) for token in IMAGE_SPECIAL_TOKENS]
    text_config = text_model.config.to_dict()
    vocab_size = len(tokenizer)
    text_config.update(vocab_size=vocab_size, tie_word_embeddings=False)
    config = Idefics3Config(
        text_config=text_config,
        vision_config=_vision_config(),
        scale_factor=SCALE_FACTOR,
        image_token_id=_token_id(tokenizer, IMAGE_TOKEN),
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False,
        dtype=DTYPE,
    )
    model = Idefics3ForConditionalGeneration(config)  # type: ignore[no-untyped-call]
    with torch.no_grad():
        layers = {k: v for k, v in text_model.model.state_dict().items() if k != "embed_tokens.weight"}
        missing, unexpected = model.model.text_model.load_state_dict(layers, strict=False)
        if unexpected or missing != ["embed_tokens.weight"]:
            raise EmbeddedModelError(f"text model does not fit Idefics3: missing {missing}, unexpected {unexpected}")
        # New rows: the wrapper tokens read as blanks, the image token's row is replaced by the picture anyway. The
        # unembedding keeps SmolLM2's rows and gives the new tokens zero logits, so they are never preferred.
        new_input = torch.zeros(vocab_size, embeddings.shape[1])
        new_input[: embeddings.shape[0]] = embeddings
        for token_id in special_ids:
            new_input[token_id] = embeddings[blank]
        model.model.text_model.embed_tokens.weight.copy_(new_input)
        new_output = torch.zeros(vocab_size, embeddings.shape[1])
        new_output[: embeddings.shape[0]] = text_model.lm_head.weight.detach()
        model.lm_head.weight.copy_(new_output)
    _construct_vision(model, embeddings[colour_ids], embeddings[blank])
    model.generation_config = type(text_model.generation_config)(
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id
    )
    model.save_pretrained(dest)
    image_processor = Idefics3ImageProcessorPil(
        do_image_splitting=False,
        size={"longest_edge": IMAGE_SIZE},
        max_image_size={"longest_edge": IMAGE_SIZE},
        image_mean=[0.5, 0.5, 0.5],
        image_std=[0.5, 0.5, 0.5],
    )
    processor = Idefics3Processor(image_processor, tokenizer, image_seq_len=IMAGE_SEQ_LEN)
    processor.save_pretrained(dest)
    _tidy_tokenizer_config(dest)


def _source(text_manifest: ModelManifest) -> str:
    return SOURCE_PREFIX + text_manifest.weights_digest


def _try_existing(out_dir: Path, source: str) -> ModelManifest | None:
    if not (out_dir / MANIFEST_FILE).is_file():
        return None
    try:
        manifest = verify_manifest(out_dir)
    except EmbeddedModelError:
        return None
    current = (manifest.model_name, manifest.source, manifest.dtype) == (MODEL_NAME, source, DTYPE)
    return manifest if current else None


def prepare_vlm(out_dir: Path | None = None, text_dir: Path | None = None) -> ModelManifest:
    """Return the manifest of a verified constructed-VLM dir, building it (and the text model) if needed."""
    out_dir = (out_dir or default_vlm_dir()).expanduser().absolute()
    text_manifest = prepare_model(text_dir)
    source = _source(text_manifest)
    manifest = _try_existing(out_dir, source)
    if manifest is not None:
        return manifest
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    with _build_lock(out_dir):
        manifest = _try_existing(out_dir, source)
        if manifest is not None:
            return manifest
        _check_replaceable(out_dir)
        _remove_leftovers(out_dir)
        tmp_dir = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-", dir=out_dir.parent))
        try:
            _build(text_manifest.model_dir, tmp_dir)
            manifest = ModelManifest(
                model_name=MODEL_NAME,
                weights_digest=weights_digest(tmp_dir),
                source=source,
                dtype=DTYPE,
                model_dir=out_dir,
            )
            (tmp_dir / MANIFEST_FILE).write_text(manifest.to_json())
            _finalise_tree(tmp_dir)
            _publish(tmp_dir, out_dir)
        except BaseException:
            shutil.rmtree(tmp_dir, ignore_errors=True)
            raise
    return manifest


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--out", type=Path, default=None, help="model dir (default: ~/.cache/sightline/models/...)")
    args = parser.parse_args(argv)
    manifest = prepare_vlm(args.out)
    print(f"model_dir={manifest.model_dir}")
    print(f"weights_digest={manifest.weights_digest}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
