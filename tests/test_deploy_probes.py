"""Deploy files probe grpc.health.v1: Kubernetes `grpc:` probes, compose and image health checks."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import yaml
from test_deploy import DEPLOY, DOCKER, K8S, parse
from test_deploy_containers import base_docs, docs_of, interpolate, kustomize


@pytest.fixture(scope="module")
def healthcheck():
    spec = importlib.util.spec_from_file_location("healthcheck", DOCKER / "healthcheck.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _container(docs: dict, kind: str, name: str) -> dict:
    (container,) = docs[kind, name]["spec"]["template"]["spec"]["containers"]
    return container


def _port(container: dict, flag: str, default: int) -> int:
    args = [str(a) for a in container["args"]]
    return int(args[args.index(flag) + 1]) if flag in args else default


def check_probes(docs: dict, where: str) -> None:
    """Workers: readiness and liveness on grpc.health.v1 of the worker's --port. Coordinator:
    readiness on the whole server (SERVING once it can serve), startup and liveness on its
    `liveness` service (SERVING while it runs), all on its --grpc-port."""
    worker = _container(docs, "StatefulSet", "worker")
    port = _port(worker, "--port", 50061)
    assert port in [p["containerPort"] for p in worker["ports"]], where
    for probe in ("readinessProbe", "livenessProbe"):
        assert set(worker[probe]) - {"periodSeconds", "failureThreshold", "timeoutSeconds"} \
            == {"grpc"}, (where, probe, worker[probe])
        assert worker[probe]["grpc"] == {"port": port}, (where, probe)
    coordinator = _container(docs, "Deployment", "coordinator")
    grpc_port = _port(coordinator, "--grpc-port", 50051)
    assert coordinator["readinessProbe"]["grpc"] == {"port": grpc_port}, where
    for probe in ("startupProbe", "livenessProbe"):
        assert coordinator[probe]["grpc"] == {"port": grpc_port, "service": "liveness"}, \
            (where, probe)
    for container in (worker, coordinator):
        for probe in ("readinessProbe", "livenessProbe", "startupProbe"):
            assert "httpGet" not in container.get(probe, {}), (where, probe)
            assert "tcpSocket" not in container.get(probe, {}), (where, probe)


def test_k8s_base_probes_are_grpc_health_on_the_serving_ports():
    check_probes(base_docs(), "k8s base")


def test_k8s_cuda_overlay_keeps_the_probes():
    (patch,) = docs_of(K8S / "overlays/cuda/worker-gpu.yaml")
    (worker,) = patch["spec"]["template"]["spec"]["containers"]
    assert not {"readinessProbe", "livenessProbe"} & set(worker)  # the base's stay
    assert _port(worker, "--port", 50061) == _port(
        _container(base_docs(), "StatefulSet", "worker"), "--port", 50061)


@pytest.mark.parametrize("overlay", ["", "overlays/cuda"])
def test_k8s_built_manifests_probe_grpc_health(overlay):
    built = kustomize(K8S / overlay)
    if built is None:
        pytest.skip("kubectl is not installed")
    check_probes({(d["kind"], d["metadata"]["name"]): d for d in built},
                 f"kustomize {overlay or 'deploy/k8s'}")


def test_compose_healthchecks_ask_each_services_grpc_health():
    compose = yaml.safe_load((DEPLOY / "compose.yaml").read_text())
    services = {n: s for n, s in compose["services"].items()
                if "cluster" in s.get("profiles", [])}
    assert services
    for name, service in services.items():
        served = parse([interpolate(str(a)) for a in service["command"]], f"compose {name}")
        kind, *argv = service["healthcheck"]["test"]
        assert kind == "CMD", name
        probe = parse(argv, f"compose {name} healthcheck", command="health")
        assert Path(argv[0]).name == Path(service["command"][0]).name, name
        port = served.grpc_port if argv[0] == "coordinator" else served.port
        assert probe.address == f"127.0.0.1:{port}" and probe.service == "", name
        assert service["healthcheck"]["start_period"], name


def test_healthcheck_finds_the_server_and_asks_its_grpc_port(healthcheck):
    cmd = ["/opt/shardline/bin/python", "/opt/shardline/bin/worker", "serve", "--port", "50071"]
    found = healthcheck.find_command([["/sbin/docker-init", "--", "sh"], cmd])
    assert found == ("worker", ["serve", "--port", "50071"])
    assert healthcheck.probe_argv(*found) == ["health", "--address", "127.0.0.1:50071"]
    found = healthcheck.find_command([["coordinator", "serve", "--demo", "--grpc-port", "50052",
                                       "--host", "10.0.0.5"]])
    assert healthcheck.probe_argv(*found) == ["health", "--address", "10.0.0.5:50052"]
    tls = ["--tls-cert", "c.crt", "--tls-key", "c.key", "--tls-ca", "ca.crt"]
    for program in ("worker", "coordinator"):
        found = healthcheck.find_command([[program, "serve", *tls, "--host", "::1"]])
        argv = healthcheck.probe_argv(*found)
        assert argv[:3] == ["health", "--address",
                            f"[::1]:{50061 if program == 'worker' else 50051}"]
        probe = parse([program, *argv], f"healthcheck of {program}", command="health")
        assert (str(probe.tls_cert), str(probe.tls_key), str(probe.tls_ca)) == \
            ("c.crt", "c.key", "ca.crt")
    assert healthcheck.find_command([["python", "-m", "http.server"]]) is None
    assert healthcheck.find_command([["worker", "cache", "list"]]) is None
    assert healthcheck.find_command([["worker", "health"]]) is None  # itself
    if Path("/proc/self/cmdline").exists():  # Linux, as in a container
        assert healthcheck.running_cmdlines()  # this process, at least
