"""Dashboards and the monitoring deploy files, without a cluster: every panel queries metric names
the docs list, and Prometheus is provisioned to find every node."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml
from conftest import ROOT, need
from test_metrics import (
    ALLOWED,
    COORDINATOR_METRICS,
    DASHBOARDS,
    NO_PROMTOOL,
    WORKER_METRICS,
    families,
    metric_names,
    panel_targets,
    panels,
)

from coordinator.serving.metrics import sd_targets
from protos import WIRE_VERSION


# -- dashboards and deploy (no cluster) ----------------------------------------------------------
def test_metric_name_extraction():
    expr = ('histogram_quantile(0.95, sum by (le, worker) (rate(shardline_x_bucket'
            '{worker=~"$worker", a="b c"}[$__rate_interval]))) / on (worker) shardline_y > bool 0')
    assert metric_names(expr) == {"shardline_x_bucket", "shardline_y"}


@pytest.mark.parametrize("path", DASHBOARDS, ids=lambda p: p.name)
def test_dashboard_structure(path: Path):
    board = json.loads(path.read_text())
    variables = {v["name"]: v for v in board["templating"]["list"]}
    ds = variables["DS_PROMETHEUS"]
    assert ds["type"] == "datasource" and ds["query"] == "prometheus"
    assert board["uid"] and board["title"].startswith("Shardline")
    ids = [p["id"] for p in panels(board)]
    assert len(ids) == len(set(ids)), f"duplicate panel ids in {path.name}"
    for p in panels(board):
        if p["type"] == "row":
            continue
        assert p["datasource"] == {"type": "prometheus", "uid": "${DS_PROMETHEUS}"}, p["title"]
        assert p.get("description") and p["targets"], p["title"]
        for t in p["targets"]:
            assert t["datasource"]["uid"] == "${DS_PROMETHEUS}", p["title"]
            names = metric_names(t["expr"])
            assert names and names <= ALLOWED, (p["title"], names - ALLOWED)


def test_dashboards_cover_the_issue():
    exprs = " ".join(t["expr"] for _, _, t in panel_targets())
    for name in COORDINATOR_METRICS | WORKER_METRICS:
        assert name in exprs, f"no dashboard panel uses {name}"
    assert [p.name for p in DASHBOARDS] == ["cluster-overview.json", "request-latency.json",
                                            "stage-detail.json"]


def test_every_panel_is_described_in_the_docs():
    doc = (ROOT / "docs" / "observability.md").read_text()
    for name, title, _ in panel_targets():
        assert f"**{title}**" in doc, f"docs/observability.md does not describe {name}: {title}"


def test_deploy_provisions_prometheus_and_grafana():
    deploy = ROOT / "deploy"
    compose = yaml.safe_load((deploy / "compose.yaml").read_text())
    assert {"prometheus", "grafana"} <= set(compose["services"])
    for service in compose["services"].values():
        for volume in service.get("volumes", []):
            source = volume.split(":")[0]
            if source.startswith("."):
                assert (deploy / source).exists(), volume
    prom = yaml.safe_load((deploy / "prometheus.yml").read_text())
    jobs = {j["job_name"]: j for j in prom["scrape_configs"]}
    sd = jobs["shardline-workers"]["http_sd_configs"][0]["url"]
    assert sd.startswith("http://host.docker.internal:") and "/sd/workers" in sd
    datasources = yaml.safe_load(
        (deploy / "grafana/provisioning/datasources/prometheus.yaml").read_text())["datasources"]
    assert datasources[0]["type"] == "prometheus" and datasources[0]["url"].endswith(":9090")
    providers = yaml.safe_load(
        (deploy / "grafana/provisioning/dashboards/shardline.yaml").read_text())["providers"]
    mounted = [v for v in compose["services"]["grafana"]["volumes"] if v.startswith("../dash")]
    assert mounted and mounted[0].split(":")[1] == providers[0]["options"]["path"]


def test_promtool_accepts_the_prometheus_config():
    need(shutil.which("promtool"), NO_PROMTOOL)
    proc = subprocess.run(["promtool", "check", "config", str(ROOT / "deploy/prometheus.yml")],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_sd_targets_labels_loopback_and_dead_workers():
    def worker(name, address, status="serving", mport=9100, layers=(0, 3), stage=0):
        spec = SimpleNamespace(layer_start=layers[0], layer_end=layers[1], stage_index=stage)
        return SimpleNamespace(address=address, status=status,
                               info=SimpleNamespace(name=name, id=f"id-{name}", metrics_port=mport),
                               shard=SimpleNamespace(spec=spec))

    # the states membership really sets on plan workers it lost (membership._check_plan)
    cluster = SimpleNamespace(workers=[
        worker("mini", "127.0.0.1:50061"), worker("mini", "10.0.0.7:50061", layers=(3, 6), stage=1),
        worker("gone", "10.0.0.8:50061", status="left"),
        worker("dead", "10.0.0.10:50061", status="unreachable"),
        worker("old", "10.0.0.9:1", mport=0),
    ])
    source = SimpleNamespace(cluster=cluster)
    assert sd_targets(None) == []
    assert sd_targets(source, "host.docker.internal") == [
        {"targets": ["host.docker.internal:9100"],
         "labels": {"worker": "mini@127.0.0.1:50061", "worker_id": "id-mini",
                    "layers": "[0, 3)", "stage": "0"}},
        {"targets": ["10.0.0.7:9100"],
         "labels": {"worker": "mini@10.0.0.7:50061", "worker_id": "id-mini",
                    "layers": "[3, 6)", "stage": "1"}},
    ]
    assert sd_targets(source)[0]["targets"] == ["127.0.0.1:9100"]


def test_standby_and_lost_workers_are_counted_and_standby_ones_scraped():
    """Workers outside the plan (standby joiners, excluded, joining, left, unreachable) show in
    shardline_workers under the states membership sets; live plan and standby workers are in
    /sd/workers, with the labels shardline_worker_layers uses; gone ones drop out."""
    from coordinator.cluster.cluster import Worker
    from coordinator.cluster.discovery import LEFT, UNREACHABLE
    from coordinator.cluster.membership import Membership
    from coordinator.serving.metrics import CoordinatorMetrics
    from protos import worker_pb2
    from protos.discovery import WorkerAd

    plan_id = "p1"

    def worker(name: str, ip: str, layers: tuple[int, int] | None = None) -> Worker:
        info = worker_pb2.WorkerInfo(id=f"id-{ip}", name=name, cluster="lab", api=WIRE_VERSION,
                                     memory_bytes=1 << 30, backend="cpu", metrics_port=9100)
        w = Worker(address=f"{ip}:50061", info=info, channel=None)
        if layers is not None:
            w.shard = worker_pb2.ShardInfo(spec=worker_pb2.ShardSpec(
                layer_start=layers[0], layer_end=layers[1], stage_index=layers[0] // 3,
                plan_id=plan_id))
            w.info.shard.CopyFrom(w.shard)
            w.status = "serving"
        return w

    membership = Membership(cluster="lab", discover=False, progress=lambda s: None)
    table = membership.table
    a, b = worker("a", "10.0.0.1", (0, 3)), worker("b", "10.0.0.2", (3, 6))
    joiner, stray = worker("a", "10.0.0.3"), worker("s", "10.0.0.4")
    for w in (a, b, joiner, stray):
        table.identified(table.add_static(w.address), w)
    stray_key = table.member_of(stray).key
    table.saw("x._shardline._tcp.local.", WorkerAd(id="x", cluster="prod"), ["10.0.0.5"], 1)
    table.saw("y._shardline._tcp.local.", WorkerAd(id="y", cluster="lab"), ["10.0.0.6"], 1)
    cluster = SimpleNamespace(workers=[a, b], plan=SimpleNamespace(stages=[0, 1]),
                              plan_id=plan_id, pipeline=None)
    source = SimpleNamespace(cluster=cluster, membership=membership, engine=None)
    membership.source = source
    metrics = CoordinatorMetrics()
    metrics.watch(source)

    def counts() -> dict[str, float]:
        c = families(metrics.render()[0].decode())
        return {s.labels["state"]: s.value for s in c["shardline_workers"] if s.value}

    def listed() -> dict[str, str]:
        return {t["labels"]["worker"]: t["labels"].get("layers", "") for t in sd_targets(source)}

    # the plan's a and the standby a share a name: both are name@address, in both places
    assert listed() == {"a@10.0.0.1:50061": "[0, 3)", "b": "[3, 6)", "a@10.0.0.3:50061": "",
                        "s": ""}
    assert counts() == {"serving": 2, "standby": 2, "excluded": 1, "joining": 1}
    layers = families(metrics.render()[0].decode())["shardline_worker_layers"]
    assert {s.labels["worker"]: s.value for s in layers} == {"a@10.0.0.1:50061": 3, "b": 3}

    # b leaves (mDNS goodbye): membership marks the plan worker, it leaves /sd/workers
    table.left(table.member_of(b).key, LEFT)
    membership._check_plan()
    assert b.status == LEFT
    assert set(listed()) == {"a@10.0.0.1:50061", "a@10.0.0.3:50061", "s"}
    assert counts() == {"serving": 1, "left": 1, "standby": 2, "excluded": 1, "joining": 1}
    # the re-plan drops b from the plan: still counted as left (membership remembers it)
    cluster.workers = [a]
    assert counts() == {"serving": 1, "left": 1, "standby": 2, "excluded": 1, "joining": 1}
    # a standby worker stops answering health checks: out of /sd/workers, counted unreachable
    table.left(stray_key, UNREACHABLE)
    assert set(listed()) == {"a@10.0.0.1:50061", "a@10.0.0.3:50061"}
    assert counts() == {"serving": 1, "left": 1, "standby": 1, "unreachable": 1, "excluded": 1,
                        "joining": 1}
    # a plan worker unreachable is out too (the standby a keeps its label while the lost a is
    # still in the plan: the names stay those of shardline_worker_layers)
    table.left(table.member_of(a).key, UNREACHABLE)
    membership._check_plan()
    assert a.status == UNREACHABLE and set(listed()) == {"a@10.0.0.3:50061"}
    assert counts() == {"unreachable": 2, "left": 1, "standby": 1, "excluded": 1, "joining": 1}
