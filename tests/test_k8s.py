"""Kubernetes: the example manifests hold together, and EdgeClient spreads calls over
several real servers when the target names several (what a headless Service gives).
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest
import torch
from conftest import ROOT, ServerThread

from cloud.cli import build_parser
from cloud.config import ModelEntry, ServerConfig
from cloud.runtime import TailRuntime
from edge.client import EdgeClient, default_lb_policy, lb_options
from splitnet.data import load_digits
from splitnet.models import load_model

yaml = pytest.importorskip("yaml", reason="PyYAML is part of the dev extra")

MANIFEST = ROOT / "cloud" / "k8s" / "splitnet-cloud.yaml"


def _docs() -> dict[str, dict]:
    docs = [d for d in yaml.safe_load_all(MANIFEST.read_text()) if d]
    return {d["kind"]: d for d in docs}


def test_manifest_deployment_and_headless_service() -> None:
    docs = _docs()
    assert set(docs) == {"Deployment", "Service"}
    deployment, service = docs["Deployment"], docs["Service"]
    pod = deployment["spec"]["template"]
    labels = pod["metadata"]["labels"]
    assert deployment["spec"]["selector"]["matchLabels"].items() <= labels.items()
    assert deployment["spec"]["replicas"] > 1
    # Headless: DNS returns every ready pod, so clients balance per call.
    assert service["spec"]["clusterIP"] == "None"
    assert service["spec"]["selector"].items() <= labels.items()
    (container,) = pod["spec"]["containers"]
    ports = {p["name"]: p for p in container["ports"]}
    port = ports["grpc"]
    (service_port,) = service["spec"]["ports"]
    assert service_port["targetPort"] == port["name"] and service_port["port"] == port["containerPort"]
    # Readiness and liveness through gRPC health checking on the serving port.
    for probe in ("readinessProbe", "livenessProbe"):
        assert container[probe]["grpc"]["port"] == port["containerPort"], probe
    # The container's arguments are valid splitnet-cloud arguments that listen there.
    assert container["command"] == ["splitnet-cloud"]
    args = build_parser().parse_args(container["args"])
    assert args.port == port["containerPort"] and args.host == "0.0.0.0" and args.insecure
    assert args.token_file.startswith(
        next(m["mountPath"] for m in container["volumeMounts"] if m["name"] == "tokens")
    )
    (model,) = args.model
    assert model.weights.startswith(
        next(m["mountPath"] for m in container["volumeMounts"] if m["name"] == "models")
    )
    assert pod["spec"]["terminationGracePeriodSeconds"] > args.grace_s
    # Metrics on the declared port, where the scrape annotation points.
    assert args.metrics_port == ports["metrics"]["containerPort"]
    assert pod["metadata"]["annotations"]["prometheus.io/port"] == str(args.metrics_port)


def test_default_lb_policy() -> None:
    assert default_lb_policy("dns:///splitnet-cloud.default.svc.cluster.local:50051") == (
        "round_robin"
    )
    assert default_lb_policy("ipv4:10.0.0.1:50051,10.0.0.2:50051") == "round_robin"
    assert default_lb_policy("10.0.0.1:50051") == "pick_first"
    assert default_lb_policy("localhost:50051") == "pick_first"
    (option,) = lb_options("round_robin")
    assert option[0] == "grpc.service_config"
    assert json.loads(option[1]) == {"loadBalancingConfig": [{"round_robin": {}}]}
    with pytest.raises(ValueError, match="lb_policy"):
        lb_options("random")


@pytest.fixture()
def three_servers(digits_runtime: TailRuntime):  # type: ignore[no-untyped-def]
    config = ServerConfig(models=(ModelEntry(name="digits-cnn"),), port=0)
    servers = [ServerThread(config, digits_runtime) for _ in range(3)]
    yield servers
    for s in servers:
        s.stop()


def test_round_robin_over_several_real_servers(
    three_servers: list[ServerThread], digits_weights: Path
) -> None:
    local = load_model("digits-cnn", digits_weights)
    xs = load_digits()["test"].x[:30]
    target = "ipv4:" + ",".join(s.address for s in three_servers)
    served_before = [s.server.service.served for s in three_servers]  # type: ignore[union-attr]
    with EdgeClient(target, "digits-cnn", weights=digits_weights, cut="pool1") as client:
        assert client.lb_policy == "round_robin"
        for i in range(30):
            out = client.infer(xs[i : i + 1]).output
            assert torch.equal(out, local(xs[i : i + 1]))
        counts = [
            s.server.service.served - b  # type: ignore[union-attr]
            for s, b in zip(three_servers, served_before, strict=True)
        ]
        assert sum(counts) == 30
        assert min(counts) >= 5, counts  # every server takes a share, not one for all
        # One server goes away: the channel drops it and the others answer.
        three_servers[0].stop()
        results = Counter(
            torch.equal(client.infer(xs[i : i + 1]).output, local(xs[i : i + 1]))
            for i in range(10)
        )
        assert results == Counter({True: 10})


def test_dns_target_reaches_the_server(
    three_servers: list[ServerThread], digits_weights: Path
) -> None:
    # Here DNS gives one address (localhost); in a cluster the headless Service's
    # name gives one per ready pod, and the same round_robin policy spreads over them.
    x = load_digits()["test"].x[:2]
    target = f"dns:///localhost:{three_servers[1].port}"
    with EdgeClient(target, "digits-cnn", weights=digits_weights, cut="fc1") as client:
        assert client.lb_policy == "round_robin"
        assert torch.equal(client.infer(x).output, load_model("digits-cnn", digits_weights)(x))
