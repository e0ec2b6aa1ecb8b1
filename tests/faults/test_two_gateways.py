"""Two gateway processes sharing one Redis (what deploy/k8s runs behind one Service): any gateway serves
GetExplanation and ListExplanations for an explanation another gateway queued, and a SYNC caller of one gateway
is woken by a worker's completion whichever gateway queued it."""

from __future__ import annotations

from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from sightline.v1 import explanations_pb2, explanations_pb2_grpc, inference_pb2, inference_pb2_grpc, types_pb2

from deploy.local_stack import free_port
from tests.faults.cluster import SERVING, FaultCluster, explain_request, wait_until

SUCCEEDED = types_pb2.EXPLANATION_STATE_SUCCEEDED


def test_any_gateway_serves_any_gateways_explanations(tmp_path: Path, vllm_port: int) -> None:
    cluster = FaultCluster(tmp_path, vllm_port=vllm_port)
    try:
        cluster.start_serving(workers=1)
        command = cluster.launcher.gateway_command()
        argv = list(command.argv)
        second_address = f"127.0.0.1:{free_port()}"
        argv[argv.index("--listen") + 1] = second_address
        second = cluster._spawn("gateway-second", argv, command.env)
        with (
            grpc.insecure_channel(cluster.config.gateway_address) as first_channel,
            grpc.insecure_channel(second_address) as second_channel,
        ):
            wait_until(lambda: second.alive() and _serving(second_channel), 60, "the second gateway to serve")
            first = explanations_pb2_grpc.ExplanationsServiceStub(first_channel)
            other = explanations_pb2_grpc.ExplanationsServiceStub(second_channel)

            # Queued on the first, fetched (and waited for) on the second.
            queued_id = first.Explain(
                explain_request(types_pb2.EXPLAIN_MODE_ASYNC, "attention"), timeout=30
            ).explanation_id
            fetched = other.GetExplanation(
                explanations_pb2.GetExplanationRequest(explanation_id=queued_id, wait_seconds=120),
                timeout=130,
            ).explanation
            assert (fetched.explanation_id, fetched.state) == (queued_id, SUCCEEDED)
            assert [result.method for result in fetched.results] == ["attention"]

            # Generated and queued on the second, fetched on the first.
            generation = inference_pb2_grpc.InferenceServiceStub(second_channel).Generate(
                inference_pb2.GenerateRequest(
                    input=inference_pb2.GenerationInput(prompt="The capital of France is"),
                    sampling=types_pb2.SamplingParams(max_tokens=4, temperature=0.0),
                    explain=types_pb2.ExplainSpec(
                        methods=[types_pb2.MethodSpec(name="logit_lens")], mode=types_pb2.EXPLAIN_MODE_ASYNC
                    ),
                ),
                timeout=120,
            )
            back = first.GetExplanation(
                explanations_pb2.GetExplanationRequest(explanation_id=generation.explanation_id, wait_seconds=120),
                timeout=130,
            ).explanation
            assert back.state == SUCCEEDED
            assert [token.id for token in back.tokens][-4:] == [token.id for token in generation.output_tokens]

            # SYNC on the second: the worker's completion wakes the gateway that waits, not the one that queued.
            synced = other.Explain(explain_request(types_pb2.EXPLAIN_MODE_SYNC, "attention"), timeout=120)
            assert synced.explanation.state == SUCCEEDED

            # Both gateways list all three.
            for stub in (first, other):
                listed = stub.ListExplanations(explanations_pb2.ListExplanationsRequest(), timeout=30)
                ids = {summary.explanation_id for summary in listed.explanations}
                assert {queued_id, generation.explanation_id, synced.explanation_id} <= ids
    finally:
        cluster.close()


def _serving(channel: grpc.Channel) -> bool:
    try:
        reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=2)
    except grpc.RpcError:
        return False
    return bool(reply.status == SERVING)
