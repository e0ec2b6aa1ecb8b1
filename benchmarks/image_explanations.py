"""Time to answer and to explain an image question through the whole stack, per image method, with the explainer's
memory and the fidelity of its log-probabilities to vLLM's.

    python benchmarks/image_explanations.py [--target HOST:PORT] [--runs 1]
        [--out benchmarks/results/image_explanations.json]

Without --target it starts the local stack on the constructed VLM (python -m deploy.local_stack --model
constructed-colour-vlm, on free ports) and stops it afterwards; memory is then the explainer process's peak resident
set (VmHWM). The question: "What color is the square? Answer with one word." about a red square on white; the
answer's colour token is explained (one target). Raw gRPC stubs: the SDK has no image-explanation accessor yet.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import statistics
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
from sightline.v1 import inference_pb2, inference_pb2_grpc, types_pb2

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench_util import command_line, environment, write_result

from deploy.local_stack import LocalStack, StackConfig, free_port
from explainers.constructed_vlm import MODEL_NAME, default_vlm_dir
from tests.pictures import QUESTION, question_about, square_picture

# Each method with the parameters the end-to-end test uses (occlusion by the page's white; IG from white, 64 steps).
METHODS: dict[str, dict[str, types_pb2.ParamValue]] = {
    "occlusion": {
        "baseline": types_pb2.ParamValue(string_value="white"),
        "batch_size": types_pb2.ParamValue(int_value=16),
    },
    "integrated_gradients": {
        "baseline": types_pb2.ParamValue(string_value="white"),
        "steps": types_pb2.ParamValue(int_value=64),
    },
    "saliency": {},
    "input_x_gradient": {},
    "attention": {},
    "logit_lens": {},
}


def picture_request(picture: bytes, explain: types_pb2.ExplainSpec | None = None) -> inference_pb2.GenerateRequest:
    return inference_pb2.GenerateRequest(
        model=MODEL_NAME,
        input=inference_pb2.GenerationInput(chat=question_about(picture)),
        sampling=types_pb2.SamplingParams(max_tokens=8, temperature=0.0),
        explain=explain,
    )


@contextlib.contextmanager
def stack_or_target(target: str | None) -> Iterator[tuple[str, int | None]]:
    """The gateway address, and the explainer's pid when this script started the stack."""
    if target:
        yield target, None
        return
    with tempfile.TemporaryDirectory(prefix="sightline-image-bench-") as state:
        config = StackConfig(
            model_dir=default_vlm_dir(),
            state_dir=Path(state),
            gateway_port=free_port(),
            vllm_port=free_port(),
            redis_port=free_port(),
            gateway_metrics_port=free_port(),
            explainer_metrics_port=free_port(),
            viewer_port=free_port(),
            served_model_name=MODEL_NAME,
            embedded_model=MODEL_NAME,
        )
        with LocalStack(config) as stack:
            explainer = next(child for child in stack.children if child.name == "explainer")
            yield config.gateway_address, explainer.process.pid


def peak_rss_mib(pid: int | None) -> float | None:
    if pid is None:
        return None
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--target", default=None, help="a running gateway serving the VLM (default: start a stack)")
    parser.add_argument("--runs", type=int, default=1)
    parser.add_argument("--methods", nargs="*", default=list(METHODS), choices=list(METHODS))
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/image_explanations.json"))
    args = parser.parse_args()

    buffer = io.BytesIO()
    square_picture("red", 1, 2).save(buffer, "PNG")
    picture = buffer.getvalue()
    rows: dict[str, dict[str, object]] = {}
    started = time.perf_counter()
    with stack_or_target(args.target) as (address, explainer_pid), grpc.insecure_channel(address) as channel:
        stack_seconds = time.perf_counter() - started
        stub = inference_pb2_grpc.InferenceServiceStub(channel)
        answer_seconds = []
        for _ in range(args.runs + 1):  # the first is a warm-up
            begun = time.perf_counter()
            answer = stub.Generate(picture_request(picture), timeout=600)
            answer_seconds.append(time.perf_counter() - begun)
        texts = [token.text.strip().lower() for token in answer.output_tokens]
        index = texts.index("red")
        for name in args.methods:
            spec = types_pb2.ExplainSpec(
                methods=[types_pb2.MethodSpec(name=name, params=METHODS[name])],
                mode=types_pb2.EXPLAIN_MODE_SYNC,
                targets=types_pb2.TargetSpec(output_indices=[index]),
            )
            seconds, method_seconds, fidelity = [], [], []
            for _ in range(args.runs):
                begun = time.perf_counter()
                response = stub.Generate(picture_request(picture, spec), timeout=1800)
                seconds.append(time.perf_counter() - begun)
                explanation = response.explanation
                assert explanation.state == types_pb2.EXPLANATION_STATE_SUCCEEDED, explanation.error.message
                method_seconds.append(explanation.results[0].seconds)
                fidelity.append(explanation.fidelity.max_abs_logprob_diff)
            rows[name] = {
                "generate_and_explain_median_s": statistics.median(seconds),
                "method_seconds_median": statistics.median(method_seconds),
                "max_abs_logprob_diff": max(fidelity),
                "runs": seconds,
            }
            print(f"{name}: {statistics.median(seconds):.1f} s through the stack, fidelity {max(fidelity):.2e}")
        memory = peak_rss_mib(explainer_pid)
    result = {
        "command": command_line("image_explanations.py", sys.argv[1:]),
        "environment": environment(),
        "question": QUESTION,
        "stack_start_s": None if args.target else stack_seconds,
        "answer_median_s": statistics.median(answer_seconds[1:]),
        "answer": answer.text,
        "explainer_peak_rss_mib": memory,
        "methods": rows,
    }
    write_result(args.out, result)
    print(f"answer {result['answer_median_s']:.2f} s; explainer peak RSS {memory} MiB; wrote {args.out}")


if __name__ == "__main__":
    main()
