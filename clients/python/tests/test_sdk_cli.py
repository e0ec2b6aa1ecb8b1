from __future__ import annotations

import io
import json
from pathlib import Path

import pytest
from fake_sightline import GENERATED_TEXT, FakeSightline, make_explanation
from google.protobuf import json_format
from sightline import cli
from sightline.v1 import explanations_pb2, inference_pb2, types_pb2


@pytest.fixture(autouse=True)
def no_environment_settings(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("SIGHTLINE_TARGET", raising=False)
    monkeypatch.delenv("SIGHTLINE_API_KEY", raising=False)
    for variable in ("SIGHTLINE_TLS_CA", "SIGHTLINE_CLIENT_CERT", "SIGHTLINE_CLIENT_KEY"):
        monkeypatch.delenv(variable, raising=False)


def run(fake: FakeSightline, *args: str) -> int:
    return cli.main(["--target", fake.target, *args])


def test_generate_prints_the_answer_only(fake: FakeSightline, capsys: pytest.CaptureFixture[str]) -> None:
    assert run(fake, "generate", "--max-tokens", "2", "--temperature", "0", "The capital of France") == 0

    assert capsys.readouterr().out == GENERATED_TEXT + "\n"
    request = fake.requests[-1]
    assert isinstance(request, inference_pb2.GenerateRequest)
    assert (request.sampling.max_tokens, request.sampling.temperature) == (2, 0.0)
    assert request.sampling.HasField("temperature")
    assert not request.HasField("explain")


def test_generate_prints_top_sources_of_each_token(fake: FakeSightline, capsys: pytest.CaptureFixture[str]) -> None:
    status = run(fake, "generate", "--explain", "logit_lens", "--explain", "saliency", "--top", "2", "Capital?")

    assert status == 0
    request = fake.requests[-1]
    assert isinstance(request, inference_pb2.GenerateRequest)
    assert [method.name for method in request.explain.methods] == ["logit_lens", "saliency"]
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == GENERATED_TEXT
    assert lines[2] == (
        "explanation exp-1: succeeded "
        "(model tiny-lm, architecture llama, fast path, cache hit, max |logprob diff| 0.001)"
    )
    assert lines[3] == "saliency: top 2 sources of each explained token, by |score|"
    # Token texts are quoted so that their leading spaces show; each explained token has its step scores.
    assert lines[4] == "  [4] ' is'  p=0.75 rank 1 H=0.50"
    assert lines[7] == "  [5] ' Paris'  p=0.62 rank 2 H=1.25"
    assert [line.split() for line in lines[4:]] == [
        ["[4]", "'", "is'", "p=0.75", "rank", "1", "H=0.50"],
        ["[1]", "'", "capital'", "-0.5000"],
        ["[3]", "'", "France'", "+0.3750"],
        ["[5]", "'", "Paris'", "p=0.62", "rank", "2", "H=1.25"],
        ["[3]", "'", "France'", "-0.8750"],
        ["[1]", "'", "capital'", "+0.5000"],
    ]


def test_generate_json_is_the_proto_json_of_the_response(
    fake: FakeSightline, capsys: pytest.CaptureFixture[str]
) -> None:
    assert run(fake, "generate", "--json", "--explain", "saliency", "The capital of France") == 0

    response = json_format.Parse(capsys.readouterr().out, inference_pb2.GenerateResponse())
    assert response.text == GENERATED_TEXT
    assert response.finish_reason == types_pb2.FINISH_REASON_STOP
    assert response.explanation == make_explanation("exp-1")


def test_generate_says_when_the_context_window_cut_the_output_short(
    fake: FakeSightline, capsys: pytest.CaptureFixture[str]
) -> None:
    assert run(fake, "generate", "--completion", "too long") == 0
    printed = capsys.readouterr()
    assert printed.out == GENERATED_TEXT + "\n"
    assert printed.err == (
        "note: the output stopped where the model's context window filled, before --max-tokens; "
        "send a shorter prompt for a longer output\n"
    )
    assert run(fake, "generate", "--completion", "short enough") == 0
    assert capsys.readouterr().err == ""


def test_generate_async_prints_how_to_fetch_the_explanation(
    fake: FakeSightline, capsys: pytest.CaptureFixture[str]
) -> None:
    assert run(fake, "generate", "--async", "--explain", "saliency", "Capital?") == 0

    request = fake.requests[-1]
    assert isinstance(request, inference_pb2.GenerateRequest)
    assert request.explain.mode == types_pb2.EXPLAIN_MODE_ASYNC
    assert request.input.WhichOneof("kind") == "chat"
    assert [(m.role, m.content) for m in request.input.chat.messages] == [("user", "Capital?")]
    assert "sightline explain exp-1 --wait 30" in capsys.readouterr().out


def test_generate_reads_a_dash_prompt_from_stdin(fake: FakeSightline, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("sys.stdin", io.StringIO("from stdin\n"))

    assert run(fake, "generate", "--completion", "-") == 0

    request = fake.requests[-1]
    assert isinstance(request, inference_pb2.GenerateRequest)
    assert request.input.prompt == "from stdin\n"


def test_explain_prints_state_and_sources(fake: FakeSightline, capsys: pytest.CaptureFixture[str]) -> None:
    assert run(fake, "explain", "exp-1", "--wait", "5", "--top", "1") == 0

    # --wait watches the explanation (WatchExplanation, drawing its progress on stderr) for up to 5 s.
    request = fake.requests[-1]
    assert isinstance(request, explanations_pb2.WatchExplanationRequest)
    assert request.explanation_id == "exp-1"
    captured = capsys.readouterr()
    assert captured.err == "exp-1: succeeded 100.0%\n"  # not a terminal: plain lines
    out = captured.out
    assert out.startswith(
        "explanation exp-1: succeeded (model tiny-lm, architecture llama, fast path, cache hit, max |logprob diff| "
    )
    assert "[1] ' capital'" in out
    assert "[3] ' France'" in out
    assert "' of'" not in out


def test_explain_json_parses_back(fake: FakeSightline, capsys: pytest.CaptureFixture[str]) -> None:
    assert run(fake, "explain", "exp-1", "--json") == 0

    assert json_format.Parse(capsys.readouterr().out, types_pb2.Explanation()) == make_explanation("exp-1")


def test_explain_of_an_unfinished_explanation(fake: FakeSightline, capsys: pytest.CaptureFixture[str]) -> None:
    assert run(fake, "explain", "exp-pending") == 0

    out = capsys.readouterr().out
    assert out.startswith("explanation exp-pending: running")
    assert "--wait" in out


def test_explain_of_a_failed_explanation_exits_1(fake: FakeSightline, capsys: pytest.CaptureFixture[str]) -> None:
    assert run(fake, "explain", "exp-failed") == 1

    assert "explainer ran out of memory" in capsys.readouterr().out


def test_methods(fake: FakeSightline, capsys: pytest.CaptureFixture[str]) -> None:
    assert run(fake, "methods") == 0

    assert capsys.readouterr().out.splitlines() == [
        "model tiny-lm, architecture llama, fast path",
        "saliency  [attributes tokens, needs gradients]",
        "    Gradient x input.",
        "    normalize (bool, default true): scale each row to unit L1 norm",
        "    steps (int, default 32, 1..256): interpolation steps",
        "    scale (float, >= 0.5): multiplier",
        "    baseline (string, default pad, one of pad|zero|mask): what replaces a token",
        "logit_lens  [uses cache]",
        "    Decode every layer's residual stream.",
    ]


def test_methods_json_parses_back(fake: FakeSightline, capsys: pytest.CaptureFixture[str]) -> None:
    assert run(fake, "methods", "--json") == 0

    response = json_format.Parse(capsys.readouterr().out, explanations_pb2.ListMethodsResponse())
    assert [method.name for method in response.methods] == ["saliency", "logit_lens"]
    assert (response.model, response.architecture) == ("tiny-lm", "llama")
    assert response.explain_path == types_pb2.EXPLAIN_PATH_FAST


def test_stream_prints_text_as_it_arrives(fake: FakeSightline, capsys: pytest.CaptureFixture[str]) -> None:
    assert run(fake, "stream", "The capital of France") == 0

    assert capsys.readouterr().out == GENERATED_TEXT + "\n"


def test_stream_with_explanation_and_json_lines(fake: FakeSightline, capsys: pytest.CaptureFixture[str]) -> None:
    assert run(fake, "stream", "--explain", "saliency", "--top", "1", "x") == 0
    assert "explanation exp-1: succeeded" in capsys.readouterr().out

    assert run(fake, "stream", "--json", "x") == 0
    lines = capsys.readouterr().out.splitlines()
    chunks = [json_format.Parse(line, inference_pb2.GenerateStreamResponse()) for line in lines]
    assert [chunk.WhichOneof("event") for chunk in chunks] == ["start", "delta", "delta", "end"]
    assert [chunk.delta.text_delta for chunk in chunks] == ["", " is", " Paris", ""]
    assert all(json.loads(line) for line in lines)


def test_api_key_and_target_come_from_the_environment(fake: FakeSightline, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SIGHTLINE_TARGET", fake.target)
    monkeypatch.setenv("SIGHTLINE_API_KEY", "env-key")

    assert cli.main(["methods"]) == 0

    assert fake.metadata[-1]["authorization"] == "Bearer env-key"


def test_list_prints_one_line_per_explanation_and_the_next_page(
    fake: FakeSightline, capsys: pytest.CaptureFixture[str]
) -> None:
    assert run(fake, "list", "--page-size", "1") == 0
    assert capsys.readouterr().out == (
        "exp-1  succeeded  2023-11-14T22:13:20+00:00  tiny-lm  saliency,logit_lens  trace trace-1\n"
        "more: sightline list --page-size 1 --page-token page-2\n"
    )
    request = fake.requests[-1]
    assert isinstance(request, explanations_pb2.ListExplanationsRequest) and request.page_size == 1

    assert run(fake, "list", "--page-token", "page-2", "--json") == 0
    listed = json.loads(capsys.readouterr().out)
    assert [item["explanationId"] for item in listed["explanations"]] == ["exp-failed"]
    assert "nextPageToken" not in listed


def test_unreadable_or_half_given_tls_files_exit_2_before_any_call(
    fake: FakeSightline, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    for flags in (["--tls-ca", str(tmp_path / "missing.pem")], ["--client-cert", str(tmp_path / "ca.pem")]):
        (tmp_path / "ca.pem").write_text("pem")
        with pytest.raises(SystemExit) as exited:
            run(fake, *flags, "methods")
        assert exited.value.code == 2
        assert "TLS: " in capsys.readouterr().err
    assert fake.requests == []


def test_a_rejected_request_exits_2_without_a_traceback(
    fake: FakeSightline, capsys: pytest.CaptureFixture[str]
) -> None:
    assert run(fake, "generate", "--completion", "") == 2

    captured = capsys.readouterr()
    assert captured.err == "error: INVALID_ARGUMENT: prompt is empty\n"
    assert captured.out == ""


def test_an_unknown_explanation_exits_2(fake: FakeSightline, capsys: pytest.CaptureFixture[str]) -> None:
    assert run(fake, "explain", "exp-missing") == 2

    assert capsys.readouterr().err == "error: NOT_FOUND: no explanation 'exp-missing'\n"


def test_an_unreachable_server_exits_1(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["--target", "127.0.0.1:1", "--timeout", "5", "methods"]) == 1

    assert capsys.readouterr().err.startswith("error: UNAVAILABLE: ")


def test_bad_arguments_exit_2(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exited:
        cli.main(["generate", "--top", "0", "x"])

    assert exited.value.code == 2
    assert "--top" in capsys.readouterr().err


def test_explanation_flags_map_to_the_explain_spec(fake: FakeSightline) -> None:
    status = run(
        fake,
        "generate",
        "--explain",
        "saliency",
        "--targets",
        "0,1",
        "--foil",
        "7",
        "--foil",
        "8",
        "--score",
        "probability",
        "--span",
        "0:2:subject",
        "--span",
        "2:4",
        "--absolute",
        "--normalize",
        "l1",
        "--faithfulness",
        "x",
    )

    assert status == 0
    request = fake.requests[-1]
    assert isinstance(request, inference_pb2.GenerateRequest)
    assert request.explain == types_pb2.ExplainSpec(
        methods=[types_pb2.MethodSpec(name="saliency")],
        mode=types_pb2.EXPLAIN_MODE_SYNC,
        targets=types_pb2.TargetSpec(
            output_indices=[0, 1], foil_token_ids=[7, 8], score=types_pb2.TARGET_SCORE_PROBABILITY
        ),
        # --span without --granularity means span granularity.
        aggregation=types_pb2.AggregationSpec(
            granularity=types_pb2.GRANULARITY_SPAN,
            spans=[types_pb2.Span(start=0, end=2, label="subject"), types_pb2.Span(start=2, end=4)],
            absolute=True,
            normalization=types_pb2.NORMALIZATION_L1,
        ),
        faithfulness=True,
    )
    assert not request.explain.HasField("step_scores_top_k")


def test_stream_takes_the_explanation_flags_too(fake: FakeSightline) -> None:
    assert run(fake, "stream", "--explain", "saliency", "--granularity", "word", "--score", "logit", "x") == 0

    request = fake.requests[-1]
    assert isinstance(request, inference_pb2.GenerateRequest)
    assert request.explain.aggregation.granularity == types_pb2.GRANULARITY_WORD
    assert request.explain.targets.score == types_pb2.TARGET_SCORE_LOGIT


def test_without_explanation_flags_the_spec_leaves_targets_and_aggregation_unset(fake: FakeSightline) -> None:
    assert run(fake, "generate", "--explain", "saliency", "x") == 0

    request = fake.requests[-1]
    assert isinstance(request, inference_pb2.GenerateRequest)
    assert not request.explain.HasField("targets")
    assert not request.explain.HasField("aggregation")
    assert not request.explain.faithfulness


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--faithfulness"], "need --explain METHOD"),
        (["--explain", "saliency", "--granularity", "word", "--span", "0:2"], "spans are only used with"),
        (["--explain", "saliency", "--granularity", "span"], "needs spans"),
        (["--explain", "saliency", "--targets", "0,x"], "expected indices >= 0 separated by commas"),
        (["--explain", "saliency", "--targets", "-1"], "expected indices >= 0"),
        (["--explain", "saliency", "--foil", "-3"], "must be at least 0"),
        (["--explain", "saliency", "--span", "3:1"], "0 <= START < END"),
        (["--explain", "saliency", "--span", "3"], "START:END or START:END:LABEL"),
        (["--explain", "saliency", "--score", "rank"], "invalid choice"),
        (["--explain", "saliency", "--param", "occlusion.window=3"], "'occlusion' is not an --explain method"),
        (["--param", "occlusion.window=3"], "asked for: none"),
        (["--explain", "occlusion", "--param", "window=3"], "expected METHOD.NAME=VALUE"),
        (["--explain", "occlusion", "--param", "occlusion.window"], "expected METHOD.NAME=VALUE"),
    ],
)
def test_bad_explanation_flags_exit_2_before_any_call(
    fake: FakeSightline, capsys: pytest.CaptureFixture[str], args: list[str], message: str
) -> None:
    with pytest.raises(SystemExit) as exited:
        run(fake, "generate", *args, "x")

    assert exited.value.code == 2
    assert message in capsys.readouterr().err
    assert fake.requests == []


def test_summary_shows_foils_word_groups_and_faithfulness(
    fake: FakeSightline, capsys: pytest.CaptureFixture[str]
) -> None:
    args = ["--explain", "saliency", "--granularity", "word", "--foil", "7", "--faithfulness", "--top", "2"]
    assert run(fake, "generate", *args, "x") == 0

    lines = capsys.readouterr().out.splitlines()
    assert lines[3:] == [
        "saliency: top 2 source groups of each explained token, by |score|",
        "  [4] ' is'  vs foil 7  p=0.75 rank 1 H=0.50",
        "      [2:4] 'where'                  +0.6250",
        "      [0:2] 'The capital'            -0.3750",
        "  [5] ' Paris'  vs foil 7  p=0.62 rank 2 H=1.25",
        "      [2:4] 'where'                  -0.9375",
        "      [0:2] 'The capital'            +0.5625",
        "saliency faithfulness: comprehensiveness AOPC 0.81 vs random 0.12;"
        " sufficiency AOPC 0.06 vs random 0.62 (beats random)",
    ]


def test_summary_ranks_tokens_when_only_token_aggregation_was_asked(
    fake: FakeSightline, capsys: pytest.CaptureFixture[str]
) -> None:
    assert run(fake, "generate", "--explain", "saliency", "--normalize", "max_abs", "--top", "1", "x") == 0

    out = capsys.readouterr().out
    assert "saliency: top 1 sources of each explained token" in out
    assert "faithfulness" not in out


def test_explain_by_id_shows_groups_when_some_group_spans_several_tokens(
    fake: FakeSightline, capsys: pytest.CaptureFixture[str]
) -> None:
    assert run(fake, "explain", "exp-grouped", "--top", "3") == 0

    lines = capsys.readouterr().out.splitlines()
    assert lines[1] == "saliency: top 3 source groups of each explained token, by |score|"
    # Target 1 is position 5: the group starting at 4 ranks, the one starting at 5 does not.
    assert [line.split()[0] for line in lines[6:9]] == ["[2:4]", "[0:2]", "[4:5]"]
    assert lines[-1].endswith("(beats random)")


def test_param_sets_a_typed_parameter_of_an_explain_method(fake: FakeSightline) -> None:
    status = run(
        fake,
        "generate",
        "--explain",
        "saliency",
        "--explain",
        "occlusion",
        "--param",
        "occlusion.window=3",
        "--param",
        "occlusion.replacement=unk",
        "--param",
        "saliency.abs=true",
        "--param",
        "occlusion.scale=0.5",
        "x",
    )

    assert status == 0
    request = fake.requests[-1]
    assert isinstance(request, inference_pb2.GenerateRequest)
    methods = {method.name: dict(method.params) for method in request.explain.methods}
    assert list(methods) == ["saliency", "occlusion"]
    assert methods["saliency"] == {"abs": types_pb2.ParamValue(bool_value=True)}
    assert methods["occlusion"] == {
        "window": types_pb2.ParamValue(int_value=3),
        "replacement": types_pb2.ParamValue(string_value="unk"),
        "scale": types_pb2.ParamValue(float_value=0.5),
    }
