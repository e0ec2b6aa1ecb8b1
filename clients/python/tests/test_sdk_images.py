"""Image explanations in the SDK and CLI: grids, cells per picture and explained token, the ranking of cells, the
picture/text split, a coarser grid asked for in the spec, and the overlay drawn over the picture as it was sent."""

from __future__ import annotations

import io
import sys
from pathlib import Path

import pytest
from fake_pictures import IMAGE_SHARE, TEXT_SHARE, attach_picture_results, cell_score
from fake_sightline import FakeSightline, make_explanation
from PIL import Image
from sightline import Box, Cell, Client, ExplainOptions, Explanation, TokenRole, cli
from sightline._messages import explain_spec
from sightline.overlay import overlay_png
from sightline.v1 import inference_pb2, types_pb2

# The fake's grid is over 224 x 224 seen pixels, 32 per cell on the default 7 x 7 grid.
SEEN = 224


def png(width: int, height: int, colour: tuple[int, int, int] = (255, 255, 255)) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (width, height), colour).save(buffer, "PNG")
    return buffer.getvalue()


def explanation_of(*pictures: bytes, grid: tuple[int, int] | None = None) -> Explanation:
    """The fake's explanation of a chat holding ``pictures``, decoded by the SDK."""
    request = inference_pb2.GenerateRequest(
        input=inference_pb2.GenerationInput(
            chat=types_pb2.ChatMessages(
                messages=[
                    types_pb2.ChatMessage(
                        role="user",
                        parts=[types_pb2.ContentPart(image=types_pb2.ImageData(data=data)) for data in pictures],
                    )
                ]
            )
        )
    )
    if grid is not None:
        request.explain.images.grid_rows, request.explain.images.grid_cols = grid
    message = make_explanation("exp-1")
    attach_picture_results(message, request)
    return Explanation.from_proto(message)


def test_grids_cells_and_modality_read_back_per_picture_and_token() -> None:
    picture = png(448, 448)
    explanation = explanation_of(picture)

    (grid,) = explanation.image_grids
    assert (grid.rows, grid.cols, grid.height, grid.width) == (7, 7, SEEN, SEEN)
    assert (grid.original_width, grid.original_height) == (448, 448)
    assert grid.row_edges == tuple(range(0, 225, 32))
    assert explanation.image_methods == ["occlusion"]
    assert explanation.token_attribution_methods == ["saliency"]  # occlusion scores cells only
    for target in (0, 1):
        cells = explanation.image_cells(target)
        assert cells == [[cell_score(target, 0, row, col, 7, 7) for col in range(7)] for row in range(7)]
    assert explanation.image_cells(0)[3][6] == 0.875
    assert explanation.image_cells(1, "occlusion", 0)[0][0] == -0.75
    # A seen cell of 32 pixels is 64 in the 448-pixel picture as sent.
    assert grid.seen_box(3, 6) == Box(192, 96, 224, 128)
    assert grid.box(3, 6) == Box(384, 192, 448, 256)
    share = explanation.modality()
    assert share.image == tuple(IMAGE_SHARE) and share.text == tuple(TEXT_SHARE)
    assert explanation.modality("occlusion") == share
    with pytest.raises(ValueError, match="'saliency' reports no modality share"):
        explanation.modality("saliency")
    with pytest.raises(ValueError, match="'saliency' scores no picture cells"):
        explanation.image_cells(0, "saliency")
    with pytest.raises(IndexError, match="no picture 1"):
        explanation.image_cells(0, image_index=1)


def test_an_explanation_without_pictures_says_so() -> None:
    explanation = Explanation.from_proto(make_explanation("exp-1"))

    assert explanation.image_grids == () and explanation.image_methods == []
    with pytest.raises(ValueError, match="no result scores picture cells"):
        explanation.top_cells(0)
    with pytest.raises(ValueError, match="no result reports a modality share"):
        explanation.modality()


def test_image_tokens_have_their_role() -> None:
    message = make_explanation("exp-1")
    message.tokens[1].role = types_pb2.TOKEN_ROLE_IMAGE
    message.tokens[1].message_index = 0

    token = Explanation.from_proto(message).tokens[1]
    assert token.role is TokenRole.IMAGE and token.is_content


def test_top_cells_rank_by_absolute_score_over_every_picture_keeping_the_sign() -> None:
    explanation = explanation_of(png(448, 448), png(112, 224))

    top = explanation.top_cells(1, k=3)
    assert top == [
        Cell(0, 0, 0, Box(0, 0, 64, 64), -0.75),
        Cell(0, 6, 6, Box(384, 384, 448, 448), 48 / 1024),
        Cell(0, 6, 5, Box(320, 384, 384, 448), 47 / 1024),
    ]
    # The second picture (112 x 224 as sent) scores half as much; its boxes scale by 0.5 across and 1 down.
    second = explanation.top_cells(0, k=2, image_index=1)
    assert second == [
        Cell(1, 6, 6, Box(96, 192, 112, 224), 48 / 2048),
        Cell(1, 6, 5, Box(80, 192, 96, 224), 47 / 2048),
    ]
    assert explanation.top_cells(0, k=1)[0] == Cell(0, 3, 6, Box(384, 192, 448, 256), 0.875)
    assert len(explanation.top_cells(0, k=1000)) == 2 * 49
    with pytest.raises(ValueError, match="k must be at least 1"):
        explanation.top_cells(0, k=0)


def test_a_coarser_grid_is_asked_for_in_the_explain_spec(fake: FakeSightline) -> None:
    spec = explain_spec("occlusion", "sync", ExplainOptions(image_grid=(2, 3)))
    assert spec is not None and (spec.images.grid_rows, spec.images.grid_cols) == (2, 3)
    unset = explain_spec("occlusion", "sync", ExplainOptions(faithfulness=True))
    assert unset is not None and not unset.HasField("images")
    for bad in [(0, 3), (2, -1)]:
        with pytest.raises(ValueError, match="image_grid is"):
            ExplainOptions(image_grid=bad)

    with Client(fake.target) as client:
        generation = client.generate(
            [{"role": "user", "content": [png(448, 448), "What colour?"]}],
            explain="occlusion",
            options=ExplainOptions(image_grid=(2, 2)),
        )
    assert generation.explanation is not None
    (grid,) = generation.explanation.image_grids
    assert (grid.rows, grid.cols, grid.row_edges, grid.col_edges) == (2, 2, (0, 112, 224), (0, 112, 224))
    assert generation.explanation.top_cells(0, k=1) == [Cell(0, 1, 1, Box(224, 224, 448, 448), 0.875)]


def test_cells_that_do_not_fit_their_grid_are_refused_on_decode() -> None:
    request_picture = png(448, 448)
    message = explanation_of(request_picture).raw
    wrong_shape = types_pb2.Explanation()
    wrong_shape.CopyFrom(message)
    wrong_shape.results[2].image_attributions[0].cells.shape[:] = [2, 49, 1]
    with pytest.raises(ValueError, match=r"cells of picture 0 have shape \(2, 49, 1\), expected \(2, 7, 7\)"):
        Explanation.from_proto(wrong_shape)
    wrong_edges = types_pb2.Explanation()
    wrong_edges.CopyFrom(message)
    wrong_edges.image_grids[0].row_edges[3] = 500
    with pytest.raises(ValueError, match=r"row edges .* do not split 0..224 into 7"):
        Explanation.from_proto(wrong_edges)
    wrong_share = types_pb2.Explanation()
    wrong_share.CopyFrom(message)
    wrong_share.results[2].modality.image.append(0.5)
    with pytest.raises(ValueError, match="modality share has 3 image and 2 text values"):
        Explanation.from_proto(wrong_share)


class Pixels:
    """A PNG's pixels as RGB, by (x, y)."""

    def __init__(self, png_bytes: bytes) -> None:
        image = Image.open(io.BytesIO(png_bytes))
        assert image.format == "PNG"
        self.size = image.size
        self._rgb = image.convert("RGB").tobytes()

    def __getitem__(self, at: tuple[int, int]) -> tuple[int, int, int]:
        x, y = at
        offset = 3 * (y * self.size[0] + x)
        return self._rgb[offset], self._rgb[offset + 1], self._rgb[offset + 2]


def tint(pixel: tuple[int, int, int]) -> int:
    """How far a pixel of a white picture moved towards red or blue: the heat drawn on it."""
    red, green, blue = pixel
    return 255 - min(red, green, blue)


def test_the_overlay_heats_the_strongest_cell_over_the_picture_as_sent() -> None:
    picture = png(448, 448)
    explanation = explanation_of(picture)

    pixels = Pixels(overlay_png(explanation, picture, 0, opacity=0.6))
    assert pixels.size == (448, 448)
    heat = [[tint(pixels[x, y]) for x in range(448)] for y in range(448)]
    hottest = max(max(row) for row in heat)
    # Cell (3, 6) covers x 384..447, y 192..255 of the picture as sent (twice the seen 32-pixel cell), all of it
    # at the full opacity, in red: nothing else is as hot.
    assert hottest == round(255 * 0.6)
    hot = {(x, y) for y in range(448) for x in range(448) if heat[y][x] == hottest}
    assert hot == {(x, y) for y in range(192, 256) for x in range(384, 448)}
    assert pixels[400, 200] == (255, 255 - hottest, 255 - hottest)
    # Weaker cells are tinted in proportion; the score-0 cell (0, 0) not at all.
    assert pixels[10, 10] == (255, 255, 255)
    assert 0 < heat[447][447] < hottest
    # Target 1's strongest cell lowers its score: drawn blue.
    blue = Pixels(overlay_png(explanation, picture, 1, method="occlusion"))
    assert blue[10, 10] == (255 - 153, 255 - 153, 255)


def test_the_overlay_scales_a_non_square_picture_and_refuses_another_picture() -> None:
    picture = png(112, 448)  # a quarter as wide and twice as tall as the 224 x 224 the model saw
    explanation = explanation_of(picture)

    pixels = Pixels(overlay_png(explanation, picture, 0))
    inside = [(x, y) for x in (96, 111) for y in (192, 255)]  # cell (3, 6): x 96..111, y 192..255
    outside = [(95, 200), (100, 191), (100, 256)]
    assert all(tint(pixels[x, y]) == round(255 * 0.6) for x, y in inside)
    assert all(tint(pixels[x, y]) < round(255 * 0.6) for x, y in outside)
    with pytest.raises(ValueError, match="sha256 differs"):
        overlay_png(explanation, png(112, 448, (0, 0, 0)), 0)
    with pytest.raises(ValueError, match="the picture is 100x100; picture 0 of the explanation was 112x448"):
        overlay_png(explanation, Image.new("RGB", (100, 100)), 0)


def test_the_overlay_names_the_extra_when_pillow_is_missing(monkeypatch: pytest.MonkeyPatch) -> None:
    picture = png(448, 448)
    explanation = explanation_of(picture)
    monkeypatch.setitem(sys.modules, "PIL", None)

    with pytest.raises(ImportError, match=r"pip install 'sightline-client\[images\]'"):
        overlay_png(explanation, picture, 0)


def run(fake: FakeSightline, *args: str) -> int:
    return cli.main(["--target", fake.target, *args])


def test_the_cli_prints_the_top_cells_and_the_modality_share(
    fake: FakeSightline, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "square.png"
    path.write_bytes(png(448, 448))

    status = run(fake, "generate", "--image", str(path), "--explain", "occlusion", "--top", "2", "What colour?")

    assert status == 0
    request = fake.requests[-1]
    assert isinstance(request, inference_pb2.GenerateRequest) and not request.explain.HasField("images")
    lines = capsys.readouterr().out.splitlines()
    start = lines.index(
        "occlusion: top 2 picture cells of each explained token, by |score| (7x7 cells over 448x448 px)"
    )
    assert lines[start + 1 :] == [
        "  [4] ' is'  picture 75% / text 25%",
        "      row 3 col 6  x 384:448 y 192:256  +0.8750",
        "      row 6 col 6  x 384:448 y 384:448  +0.0469",
        "  [5] ' Paris'  picture 25% / text 75%",
        "      row 0 col 0  x 0:64 y 0:64  -0.7500",
        "      row 6 col 6  x 384:448 y 384:448  +0.0469",
    ]
    # The text's sources are printed as before, above the cells.
    assert lines[start - 1].startswith("      [") and "saliency: top 2 sources" in "\n".join(lines[:start])


def test_the_cli_asks_for_a_grid_and_writes_the_overlay_when_streaming_too(
    fake: FakeSightline, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path, first, second = tmp_path / "a.png", tmp_path / "b.png", tmp_path / "overlay.png"
    path.write_bytes(png(448, 448))
    first.write_bytes(png(224, 224))

    status = run(
        fake, "stream", "--image", str(path), "--image", str(first), "--explain", "occlusion", "--image-grid",
        "2x4", "--top", "1", "--overlay", str(second), "--overlay-token", "1", "What colour?",
    )  # fmt: skip

    assert status == 0
    request = fake.requests[-1]
    assert isinstance(request, inference_pb2.GenerateRequest)
    assert (request.explain.images.grid_rows, request.explain.images.grid_cols) == (2, 4)
    out = capsys.readouterr().out
    assert "(picture 0: 2x4 cells over 448x448 px; picture 1: 2x4 cells over 224x224 px)" in out
    assert "      picture 0 row 1 col 3  x 336:448 y 224:448  +0.8750" in out
    assert f"overlay of occlusion for explained token 1 written to {second}" in out
    # Explained token 1's strongest cell is (0, 0), which lowers its score: blue over the first picture's corner.
    pixels = Pixels(second.read_bytes())
    assert pixels[5, 5] == (102, 102, 255) and pixels[200, 5][2] == 255


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--image-grid", "0x3", "--explain", "occlusion"], "at least 1 row and 1 column"),
        (["--image-grid", "four", "--explain", "occlusion"], "expected ROWSxCOLS"),
        (["--image-grid", "2x2"], "need --explain METHOD"),
        (["--overlay", "out.png", "--explain", "occlusion"], "needs --image PATH and --explain METHOD"),
        (["--overlay", "out.png", "--image", "PICTURE"], "needs --image PATH and --explain METHOD"),
        (["--overlay", "o.png", "--image", "PICTURE", "--explain", "occlusion", "--async"], "leave out --async"),
        (["--overlay", "o.png", "--image", "PICTURE", "--explain", "occlusion", "--json"], "do not go together"),
    ],
)
def test_bad_picture_flags_exit_2_before_any_call(
    flags: list[str], message: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    picture = tmp_path / "p.png"
    picture.write_bytes(png(8, 8))
    with pytest.raises(SystemExit) as exited:
        cli.main(["--target", "127.0.0.1:1", "generate", *[str(picture) if f == "PICTURE" else f for f in flags], "x"])

    assert exited.value.code == 2
    assert message in capsys.readouterr().err


def test_an_overlay_that_cannot_be_drawn_exits_1(
    fake: FakeSightline, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path, overlay = tmp_path / "p.png", tmp_path / "o.png"
    path.write_bytes(png(448, 448))

    status = run(
        fake, "generate", "--image", str(path), "--explain", "occlusion", "--overlay", str(overlay),
        "--overlay-token", "7", "x",
    )  # fmt: skip

    assert status == 1
    assert "error: --overlay:" in capsys.readouterr().err and not overlay.exists()
