"""Image attributions on the constructed VLM, whose truth is known: a coloured square's cells are what makes it
answer the colour. Proves occlusion against recomputation (cells and text tokens), integrated gradients'
completeness (pictures alone and with the text), batching, grid geometry, and that the square's cells rank first
(and move with the square)."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
import torch
from PIL import Image

from explainers.constructed_vlm import COLOUR_RGB, GRID_SIDE, IMAGE_SIZE, prepare_vlm
from explainers.image_methods.grid import CellGrid, ImageExplainError
from explainers.image_methods.methods import (
    MEAN_COLOUR,
    Baseline,
    attention,
    baseline_pixels,
    input_x_gradient,
    integrated_gradients,
    logit_lens,
    occlusion,
    saliency,
)
from explainers.image_methods.passes import ImageQuestion, embedding_leaf, target_scores, text_embeddings
from tests.pictures import QUESTION, SQUARE_CELLS, square_picture

WHITE = (1.0, 1.0, 1.0)  # the blank page, normalised
# Completeness' tolerance: |sum of attributions - (f(x) - f(x0))| <= 2% of |f(x) - f(x0)|.
COMPLETENESS = 0.02


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


def blank_id(vlm: tuple[Any, Any]) -> int:
    """The blank " " token: the page, and the neutral text replacement on this model."""
    token_id: int = vlm[1].tokenizer.encode(" ", add_special_tokens=False)[0]
    return token_id


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
    result = occlusion(model, question, grid, Baseline.COLOUR, batch_size=8, text_baseline_id=blank_id(vlm))
    masks = grid.cell_masks()
    with torch.no_grad():
        base = target_scores(model, question, question.pixel_values[None])[0][0]
        for row, col in [(1, 0), (0, 0), (2, 2)]:
            occluded = question.pixel_values.clone()
            occluded[0][:, masks[row * grid.cols + col]] = torch.tensor(MEAN_COLOUR)[:, None]
            changed = target_scores(model, question, occluded[None])[0][0]
            torch.testing.assert_close(result.cells[0, 0, row, col], (base - changed)[0], atol=2e-4, rtol=1e-4)
        # A text token: the question's "square" replaced by the blank, recomputed from scratch.
        square_id = vlm[1].tokenizer.encode(" square", add_special_tokens=False)[0]
        position = int((question.token_ids == square_id).nonzero()[0])
        replaced = ImageQuestion(question.token_ids.clone(), question.pixel_values, question.target_positions)
        replaced.token_ids[position] = blank_id(vlm)
        changed = target_scores(model, replaced, question.pixel_values[None])[0][0]
    assert result.text is not None
    torch.testing.assert_close(result.text[0, position], (base - changed)[0], atol=2e-4, rtol=1e-4)
    assert abs(float(result.text[0, position])) > 0.01, "the question's noun must matter for the check to mean much"
    image_ids = question.token_ids == model.config.image_token_id
    assert torch.all(result.text[:, image_ids] == 0)
    assert torch.all(result.text[:, question.target_positions[0] :] == 0)
    torch.testing.assert_close(result.scores, base, atol=1e-5, rtol=1e-5)


def test_occlusion_batched_equals_unbatched(vlm: tuple[Any, Any]) -> None:
    model, _ = vlm
    question, _ = answer(vlm, square_picture("blue", 1, 4))
    grid = CellGrid(2, 2, IMAGE_SIZE, IMAGE_SIZE)
    one = occlusion(model, question, grid, Baseline.BLUR, batch_size=1)
    many = occlusion(model, question, grid, Baseline.BLUR, batch_size=5)
    torch.testing.assert_close(one.cells, many.cells, atol=2e-4, rtol=1e-4)
    assert float(one.cells.abs().max()) > 0.01, "the blurred quarter must change the score for the check to mean much"


def test_integrated_gradients_batched_equals_unbatched(vlm: tuple[Any, Any]) -> None:
    model, _ = vlm
    question, _ = answer(vlm, square_picture("yellow", 3, 3))
    one = integrated_gradients(model, question, MODEL_GRID, colour=WHITE, steps=4, batch_size=1, with_text=True)
    many = integrated_gradients(model, question, MODEL_GRID, colour=WHITE, steps=4, batch_size=4, with_text=True)
    torch.testing.assert_close(one.cells, many.cells, atol=1e-4, rtol=1e-3)
    torch.testing.assert_close(one.text, many.text, atol=1e-4, rtol=1e-3)
    assert float(one.cells.abs().max()) > 0.01


def test_ground_truth_square_cells_rank_first_and_move_with_the_square(vlm: tuple[Any, Any]) -> None:
    """Against the blank page, only the square can matter: occlusion (mid-grey, which this model reads as blank)
    changes the score at the square's cells alone, and integrated gradients from the white page gives them the
    largest shares; both follow the square when it moves."""
    model, _ = vlm
    for row, col in [(0, 0), (4, 3)]:
        question, _ = answer(vlm, square_picture("red", row, col))
        truth = square_cells(row, col)
        occluded = occlusion(model, question, MODEL_GRID, batch_size=10)
        assert top_cells(occluded.cells[0, 0].abs(), len(truth)) == truth
        outside = torch.ones(GRID_SIDE, GRID_SIDE, dtype=torch.bool)
        outside[row : row + SQUARE_CELLS, col : col + SQUARE_CELLS] = False
        assert float(occluded.cells[0, 0][outside].abs().max()) < 1e-3
        ig = integrated_gradients(model, question, MODEL_GRID, colour=WHITE, steps=16)
        assert top_cells(ig.cells[0, 0], len(truth)) == truth
        assert all(float(ig.cells[0, 0, r, c]) > 0 for r, c in truth)
        lens, per_layer = logit_lens(model, question, MODEL_GRID)
        # The image features themselves decode to the colour name where the square is.
        assert top_cells(per_layer[0, 0, 0], len(truth)) == truth
        assert per_layer.shape == (1, model.config.text_config.num_hidden_layers + 1, 1, GRID_SIDE, GRID_SIDE)
        assert lens.cells.shape == (1, 1, GRID_SIDE, GRID_SIDE)


# Measured here (green square, 7 x 7 grid, Gauss-Legendre): from the white page 2.8% off at 32 steps, 0.9% at 64;
# from black 28% at 32 and 2.9% at 64: all 40 white cells sweep from " black" to the blank at once, and the text
# model's score wiggles on that stretch at a scale of 0.02 of the path, finer than 64 points resolve.
BLACK_UNRESOLVED = pytest.mark.xfail(
    strict=True, reason="from black, 64 steps leave 2.9% (measured); completeness there needs more steps"
)


@pytest.mark.parametrize(
    ("baseline", "options"),
    [
        (Baseline.COLOUR, {"colour": WHITE, "steps": 64}),
        (Baseline.BLUR, {"blur_radius": IMAGE_SIZE // 2, "steps": 64}),
        pytest.param(Baseline.COLOUR, {"steps": 64}, marks=BLACK_UNRESOLVED),
    ],
    ids=["white", "blur", "black"],
)
def test_integrated_gradients_completeness(vlm: tuple[Any, Any], baseline: Baseline, options: dict[str, Any]) -> None:
    model, _ = vlm
    question, _ = answer(vlm, square_picture("green", 2, 3))
    result = integrated_gradients(model, question, MODEL_GRID, baseline, batch_size=16, **options)
    with torch.no_grad():
        start = baseline_pixels(question.pixel_values, baseline, options.get("colour"), options.get("blur_radius"))
        at_baseline = target_scores(model, question, start[None])[0][0]
    expected = result.scores - at_baseline
    total = result.cells.flatten(1).sum(1)
    assert abs(expected.item()) > 0.5, "the baseline must change the answer for the check to mean anything"
    torch.testing.assert_close(total, expected, atol=COMPLETENESS * abs(expected.item()), rtol=0)
    assert result.convergence_delta is not None and result.baseline_scores is not None
    torch.testing.assert_close(result.baseline_scores, at_baseline, atol=1e-5, rtol=0)
    torch.testing.assert_close(result.convergence_delta, total - expected, atol=1e-4, rtol=0)


def test_grid_geometry_is_additive(vlm: tuple[Any, Any]) -> None:
    """The same per-pixel attribution pooled on two grids: where the coarse grid's edges are fine edges, each coarse
    cell is the sum of the fine cells it covers; otherwise the totals agree."""
    model, _ = vlm
    question, _ = answer(vlm, square_picture("yellow", 0, 4))
    fine = input_x_gradient(model, question, CellGrid(14, 14, IMAGE_SIZE, IMAGE_SIZE)).cells[0, 0]
    model_cells = input_x_gradient(model, question, MODEL_GRID).cells[0, 0]
    torch.testing.assert_close(model_cells, fine.reshape(7, 2, 7, 2).sum(dim=(1, 3)), atol=1e-5, rtol=1e-4)
    strips = input_x_gradient(model, question, CellGrid(GRID_SIDE, 1, IMAGE_SIZE, IMAGE_SIZE)).cells[0, 0]
    torch.testing.assert_close(strips[:, 0], model_cells.sum(1), atol=1e-5, rtol=1e-4)
    coarse = input_x_gradient(model, question, CellGrid(2, 2, IMAGE_SIZE, IMAGE_SIZE))
    torch.testing.assert_close(model_cells.sum(), coarse.cells.sum(), atol=1e-4, rtol=1e-4)
    assert coarse.grid.row_edges() == [0, 112, 224]
    assert coarse.cells.shape == (1, 1, 2, 2)
    assert float(model_cells.abs().max()) > 1e-3


def test_modality_summary_and_text_scores(vlm: tuple[Any, Any]) -> None:
    model, _ = vlm
    question, _ = answer(vlm, square_picture("red", 2, 2))
    blank = blank_id(vlm)
    joint = integrated_gradients(
        model, question, MODEL_GRID, colour=WHITE, steps=8, batch_size=8, with_text=True, text_baseline_id=blank
    )
    assert joint.text is not None
    image_ids = question.token_ids == model.config.image_token_id
    assert torch.all(joint.text[:, image_ids] == 0)
    share = joint.image_share()
    assert share is not None and 0.0 < float(share[0]) < 1.0
    occluded = occlusion(model, question, MODEL_GRID, batch_size=10, text_baseline_id=blank)
    occluded_share = occluded.image_share()
    assert occluded_share is not None and 0.0 < float(occluded_share[0]) < 1.0
    for method in (saliency, input_x_gradient, attention):
        result = method(model, question, MODEL_GRID)
        assert result.cells.shape == (1, 1, GRID_SIDE, GRID_SIDE)
        assert result.text is not None and result.text.shape == (1, len(question.token_ids))
        assert result.image_share() is not None
    attended = attention(model, question, MODEL_GRID)
    # Attention weights are probabilities: image and text parts together are at most 1 per explained token.
    assert 0 < float(attended.cells.sum() + attended.text.sum()) <= 1.0 + 1e-5  # type: ignore[union-attr]
    lens, _ = logit_lens(model, question, MODEL_GRID)
    assert lens.image_share() is None  # the logit lens decodes image positions only


@pytest.mark.xfail(
    strict=True,
    reason="with the text from all-blank tokens the whole prompt, chat template included, is rebuilt along the path: "
    "32 steps leave a delta of 12.8 for a difference of 11.3 (measured); not yet resolved",
)
def test_integrated_gradients_completeness_with_text(vlm: tuple[Any, Any]) -> None:
    model, _ = vlm
    question, _ = answer(vlm, square_picture("green", 2, 3))
    blank = blank_id(vlm)
    joint = integrated_gradients(
        model, question, MODEL_GRID, colour=WHITE, steps=32, batch_size=16, with_text=True, text_baseline_id=blank
    )
    assert joint.text is not None
    # Completeness over both modalities: the baseline is the blank page and every text token the blank.
    with torch.no_grad(), embedding_leaf(model, torch.zeros(1), text_embeddings(model, question, blank)):
        page = baseline_pixels(question.pixel_values, Baseline.COLOUR, WHITE)
        at_baseline = target_scores(model, question, page[None])[0][0]
    expected = float((joint.scores - at_baseline)[0])
    total = float(joint.cells.sum() + joint.text.sum())
    assert abs(expected) > 0.5
    assert abs(total - expected) <= COMPLETENESS * abs(expected)
    assert joint.convergence_delta is not None
    assert abs(float(joint.convergence_delta[0]) - (total - expected)) < 1e-3


def test_bad_requests_are_refused(vlm: tuple[Any, Any]) -> None:
    with pytest.raises(ImageExplainError, match="does not fit"):
        CellGrid(0, 3, IMAGE_SIZE, IMAGE_SIZE)
    with pytest.raises(ImageExplainError, match="explained positions"):
        ImageQuestion(torch.arange(5), torch.zeros(1, 3, 4, 4), (5,))
    model, _ = vlm
    question, _ = answer(vlm, square_picture("red", 2, 2), max_new_tokens=5)
    whole = CellGrid(1, 1, IMAGE_SIZE, IMAGE_SIZE)
    with pytest.raises(ImageExplainError, match="read as padding"):
        occlusion(model, question, whole)  # the whole picture mid-grey: Idefics3's padding picture
    with pytest.raises(ImageExplainError, match="quadrature must be one of"):
        integrated_gradients(model, question, whole, quadrature="simpson")
    with pytest.raises(ImageExplainError, match="text replacement token id"):
        occlusion(model, question, whole, colour=WHITE, text_baseline_id=10**9)
