"""Image attributions on the constructed VLM, whose truth is known: a coloured square's cells are what makes it
answer the colour. Proves occlusion against recomputation, integrated gradients' completeness, batching, and that
the square's cells rank first (and move with the square)."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
import torch
from PIL import Image, ImageDraw

from explainers.constructed_vlm import CELL_PIXELS, COLOUR_RGB, GRID_SIDE, IMAGE_SIZE, prepare_vlm
from explainers.image_methods.grid import CellGrid, ImageExplainError
from explainers.image_methods.methods import (
    Baseline,
    attention,
    baseline_pixels,
    input_x_gradient,
    integrated_gradients,
    logit_lens,
    occlusion,
    saliency,
)
from explainers.image_methods.passes import ImageQuestion, embedding_leaf, target_scores

QUESTION = "What color is the square? Answer with one word."
SQUARE_CELLS = 3  # the square covers 3 x 3 cells


def square_picture(colour: str, row: int, col: int) -> Image.Image:
    """A white picture with a square of `colour` covering cells row..row+2, col..col+2 of the 7 x 7 grid."""
    picture = Image.new("RGB", (IMAGE_SIZE, IMAGE_SIZE), COLOUR_RGB["white"])
    x0, y0 = col * CELL_PIXELS, row * CELL_PIXELS
    size = SQUARE_CELLS * CELL_PIXELS
    ImageDraw.Draw(picture).rectangle([x0, y0, x0 + size - 1, y0 + size - 1], fill=COLOUR_RGB[colour])
    return picture


def square_cells(row: int, col: int) -> set[tuple[int, int]]:
    return {(row + r, col + c) for r in range(SQUARE_CELLS) for c in range(SQUARE_CELLS)}


@pytest.fixture(scope="module")
def vlm() -> Iterator[tuple[Any, Any]]:
    from transformers import AutoProcessor, Idefics3ForConditionalGeneration

    manifest = prepare_vlm()
    processor = AutoProcessor.from_pretrained(str(manifest.model_dir), local_files_only=True)  # type: ignore[no-untyped-call]
    model = Idefics3ForConditionalGeneration.from_pretrained(str(manifest.model_dir), local_files_only=True).eval()  # type: ignore[no-untyped-call]
    yield model, processor


def answer(vlm: tuple[Any, Any], picture: Image.Image, max_new_tokens: int = 6) -> tuple[ImageQuestion, str]:
    """Greedy answer to QUESTION about the picture, as an ImageQuestion explaining the colour-name token."""
    model, processor = vlm
    prompt = processor.tokenizer.apply_chat_template(
        [{"role": "user", "content": "<image>\n" + QUESTION}], tokenize=False, add_generation_prompt=True
    )
    inputs = processor(text=prompt, images=[picture], return_tensors="pt")
    with torch.no_grad():
        generated = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)[0]
    prompt_length = inputs.input_ids.shape[1]
    text = processor.tokenizer.decode(generated[prompt_length:], skip_special_tokens=True)
    colour_ids = {processor.tokenizer.encode(f" {name}")[0] for name in COLOUR_RGB}
    positions = [i for i in range(prompt_length, len(generated)) if int(generated[i]) in colour_ids]
    assert positions, f"no colour name in the answer {text!r}"
    return ImageQuestion(generated, inputs.pixel_values[0], (positions[0],)), text


def top_cells(cells: torch.Tensor, count: int) -> set[tuple[int, int]]:
    flat = cells.flatten()
    return {divmod(int(i), cells.shape[-1]) for i in flat.topk(count).indices}


MODEL_GRID = CellGrid(GRID_SIDE, GRID_SIDE, IMAGE_SIZE, IMAGE_SIZE)


@pytest.mark.parametrize("colour", ["red", "blue", "green", "yellow", "black"])
def test_the_answer_comes_from_the_picture(vlm: tuple[Any, Any], colour: str) -> None:
    _, text = answer(vlm, square_picture(colour, 2, 2))
    assert colour in text.lower()
    others = [name for name in ("red", "blue", "green", "yellow", "black") if name != colour]
    assert not any(name in text.lower() for name in others)


def test_occlusion_equals_the_recomputed_change(vlm: tuple[Any, Any]) -> None:
    model, _ = vlm
    question, _ = answer(vlm, square_picture("red", 3, 1))
    grid = CellGrid(3, 3, IMAGE_SIZE, IMAGE_SIZE)  # coarse: 10 passes instead of 50
    result = occlusion(model, question, grid, Baseline.COLOUR, batch_size=8)
    masks = grid.cell_masks()
    with torch.no_grad():
        base = target_scores(model, question, question.pixel_values[None])[0][0]
        for row, col in [(1, 0), (0, 0), (2, 2)]:
            occluded = question.pixel_values.clone()
            occluded[0][:, masks[row * grid.cols + col]] = -1.0
            changed = target_scores(model, question, occluded[None])[0][0]
            torch.testing.assert_close(result.cells[0, 0, row, col], (base - changed)[0], atol=2e-4, rtol=1e-4)
    torch.testing.assert_close(result.scores, base, atol=1e-5, rtol=1e-5)


def test_occlusion_batched_equals_unbatched(vlm: tuple[Any, Any]) -> None:
    model, _ = vlm
    question, _ = answer(vlm, square_picture("blue", 1, 4))
    grid = CellGrid(2, 2, IMAGE_SIZE, IMAGE_SIZE)
    one = occlusion(model, question, grid, Baseline.BLUR, batch_size=1)
    many = occlusion(model, question, grid, Baseline.BLUR, batch_size=5)
    torch.testing.assert_close(one.cells, many.cells, atol=2e-4, rtol=1e-4)


def test_ground_truth_square_cells_rank_first_and_move_with_the_square(vlm: tuple[Any, Any]) -> None:
    model, _ = vlm
    for row, col in [(0, 0), (4, 3)]:
        question, _ = answer(vlm, square_picture("red", row, col))
        truth = square_cells(row, col)
        occluded = occlusion(model, question, MODEL_GRID, batch_size=10)
        assert top_cells(occluded.cells[0, 0], len(truth)) == truth
        ig = integrated_gradients(model, question, MODEL_GRID, steps=16)
        assert top_cells(ig.cells[0, 0], len(truth)) == truth
        lens, per_layer = logit_lens(model, question, MODEL_GRID)
        # The image features themselves decode to the colour name where the square is.
        assert top_cells(per_layer[0, 0, 0], len(truth)) == truth
        assert per_layer.shape == (1, model.config.text_config.num_hidden_layers + 1, 1, GRID_SIDE, GRID_SIDE)
        assert lens.cells.shape == (1, 1, GRID_SIDE, GRID_SIDE)


def test_integrated_gradients_completeness(vlm: tuple[Any, Any]) -> None:
    model, _ = vlm
    question, _ = answer(vlm, square_picture("green", 2, 3))
    for baseline in (Baseline.COLOUR, Baseline.BLUR):
        result = integrated_gradients(model, question, MODEL_GRID, baseline, steps=32)
        with torch.no_grad():
            start = baseline_pixels(question.pixel_values, baseline)
            at_baseline = target_scores(model, question, start[None])[0][0]
        expected = result.scores - at_baseline
        total = result.cells.flatten(1).sum(1)
        assert abs(expected.item()) > 0.5, "the baseline must change the answer for the check to mean anything"
        torch.testing.assert_close(total, expected, atol=0.02 * abs(expected.item()), rtol=0)


def test_grid_geometry_is_additive(vlm: tuple[Any, Any]) -> None:
    """The same per-pixel attribution pooled on two grids has the same total; a coarse grid's cell holds the sum."""
    model, _ = vlm
    question, _ = answer(vlm, square_picture("yellow", 0, 4))
    fine = input_x_gradient(model, question, MODEL_GRID)
    coarse = input_x_gradient(model, question, CellGrid(2, 2, IMAGE_SIZE, IMAGE_SIZE))
    torch.testing.assert_close(fine.cells.sum(), coarse.cells.sum(), atol=1e-4, rtol=1e-4)
    assert coarse.grid.row_edges() == [0, 112, 224]
    assert coarse.cells.shape == (1, 1, 2, 2)


def test_modality_summary_and_text_scores(vlm: tuple[Any, Any]) -> None:
    model, _ = vlm
    question, _ = answer(vlm, square_picture("red", 2, 2))
    joint = integrated_gradients(model, question, MODEL_GRID, steps=32, with_text=True)
    assert joint.text is not None
    image_ids = question.token_ids == model.config.image_token_id
    assert torch.all(joint.text[:, image_ids] == 0)
    share = joint.image_share()
    assert share is not None and 0.0 < float(share[0]) < 1.0
    # Completeness over both modalities: the baseline is a black picture and no text at all (zero embeddings).
    with torch.no_grad(), embedding_leaf(model, torch.zeros(1)):
        black = baseline_pixels(question.pixel_values, Baseline.COLOUR)
        at_baseline = target_scores(model, question, black[None])[0][0]
    expected = float((joint.scores - at_baseline)[0])
    total = float(joint.cells.sum() + joint.text.sum())
    assert abs(total - expected) <= 0.03 * abs(expected)
    for method in (saliency, attention):
        result = method(model, question, MODEL_GRID)
        assert result.cells.shape == (1, 1, GRID_SIDE, GRID_SIDE)
        assert result.text is not None and result.text.shape == (1, len(question.token_ids))
    attended = attention(model, question, MODEL_GRID)
    # Attention weights are probabilities: image and text parts together are at most 1 per explained token.
    assert 0 < float(attended.cells.sum() + attended.text.sum()) <= 1.0 + 1e-5  # type: ignore[union-attr]


def test_bad_grids_and_questions_are_refused() -> None:
    with pytest.raises(ImageExplainError, match="does not fit"):
        CellGrid(0, 3, IMAGE_SIZE, IMAGE_SIZE)
    with pytest.raises(ImageExplainError, match="explained positions"):
        ImageQuestion(torch.arange(5), torch.zeros(1, 3, 4, 4), (5,))
