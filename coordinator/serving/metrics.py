"""The coordinator's Prometheus metrics (SPEC: Metrics) and the `/sd/workers` target list."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Iterable
from dataclasses import dataclass
from typing import Any

import prometheus_client
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    PlatformCollector,
    ProcessCollector,
    generate_latest,
)
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

import protos
from coordinator.cluster.cluster import WORKER_STATES
from coordinator.cluster.discovery import GONE_STATES, MEMBER_STATES, RESTARTED, STANDBY
from protos import inference_pb2
from protos.grpc_metrics import MetricsInterceptor, server_interceptor

# vLLM's lists (research/ecosystem-conventions.md 1.1), with finer low buckets for small models.
TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0,
                7.5, 10.0, 20.0, 40.0, 80.0, 160.0, 640.0, 2560.0)
ITL_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5,
               0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0)
E2E_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0,
               30.0, 40.0, 50.0, 60.0, 120.0, 240.0, 480.0, 960.0, 1920.0, 7680.0)

FINISH_REASONS = {inference_pb2.FINISH_REASON_STOP: "stop",
                  inference_pb2.FINISH_REASON_LENGTH: "length"}
FAILURE_REASONS = ("cancelled", "invalid_argument", "not_found", "resource_exhausted",
                   "unavailable", "internal")
REPLAN_REASONS = ("initial", "worker_joined", "worker_lost")
# every state shardline_workers reports (0 while no worker is in it): a plan worker's status,
# then the membership states of workers outside the plan (names defined where they are set)
STATES = (*WORKER_STATES, RESTARTED, *MEMBER_STATES)
LOOPBACK = ("127.0.0.1", "localhost", "::1", "[::1]", "0.0.0.0")


def worker_labels(workers: list[Any]) -> list[str]:
    """The `worker` label of each worker: its name, or name@address where names repeat."""
    names = [w.info.name for w in workers]
    return [n if names.count(n) == 1 else f"{n}@{w.address}"
            for n, w in zip(names, workers, strict=True)]


@dataclass(frozen=True)
class KnownWorker:
    """One worker the coordinator knows, in the plan or not, with its state and label."""

    state: str
    worker: Any = None  # coordinator.cluster.cluster.Worker; None unless in the plan or on standby
    label: str = ""  # the `worker` label ("" for members neither in the plan nor on standby)
    in_plan: bool = False

    @property
    def scrapable(self) -> bool:
        """An `/sd/workers` target: a live plan or standby worker with a metrics port."""
        return (self.worker is not None and self.state not in GONE_STATES
                and bool(self.worker.info.metrics_port))


def known_workers(source: Any) -> list[KnownWorker]:
    """The plan's workers (`source.cluster.workers`), then every other member the membership
    of `source` (the Coordinator) knows: standby, excluded, joining, left, unreachable.

    The `worker` labels are given here, once, over the plan's workers and the standby ones
    together, so `shardline_worker_layers` and `/sd/workers` always agree."""
    plan = list(getattr(getattr(source, "cluster", None), "workers", None) or [])
    membership = getattr(source, "membership", None)
    table = getattr(membership, "table", None)
    members = table.others(exclude=plan) if table is not None else []
    standby = [m.worker for m in members if m.state_name == STANDBY]
    labels = dict(zip(map(id, plan + standby), worker_labels(plan + standby), strict=True))
    out = [KnownWorker(w.status, w, labels[id(w)], True) for w in plan]
    for m in members:
        if m.state_name == STANDBY:
            out.append(KnownWorker(STANDBY, m.worker, labels[id(m.worker)]))
        else:
            out.append(KnownWorker(m.state_name))
    return out


class _StateCollector(Collector):
    """Gauges read at scrape time from the coordinator: scheduler queue and workers."""

    def __init__(self, metrics: CoordinatorMetrics) -> None:
        self.metrics = metrics

    def collect(self) -> Iterable[GaugeMetricFamily]:
        source = self.metrics.source
        engine = getattr(source, "engine", None)
        scheduler = getattr(engine, "scheduler", None)
        yield GaugeMetricFamily("shardline_requests_running",
                                "Requests holding a running slot (prefilling or decoding).",
                                value=float(getattr(scheduler, "running", 0)))
        yield GaugeMetricFamily("shardline_requests_waiting",
                                "Requests queued for a running slot.",
                                value=float(getattr(scheduler, "waiting", 0)))
        known = known_workers(source)
        states = dict.fromkeys(STATES, 0)
        for k in known:
            states[k.state] = states.get(k.state, 0) + 1
        family = GaugeMetricFamily("shardline_workers", "Workers known to the coordinator, by "
                                   "state: in the plan, standby, excluded or gone.",
                                   labels=["state"])
        for state, count in states.items():
            family.add_metric([state], float(count))
        yield family
        layers = GaugeMetricFamily("shardline_worker_layers",
                                   "Layers assigned to each worker by the current plan.",
                                   labels=["worker"])
        for k in known:
            if k.in_plan:
                spec = k.worker.shard.spec if k.worker.shard is not None else None
                layers.add_metric([k.label],
                                  float(spec.layer_end - spec.layer_start if spec else 0))
        yield layers


class CoordinatorMetrics:
    """Every coordinator metric, in its own registry (not the process-global one)."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        prometheus_client.disable_created_metrics()
        self.registry = registry if registry is not None else CollectorRegistry()
        r = self.registry
        self.source: Any = None
        self.prompt_tokens = Counter("shardline_prompt_tokens", "Prompt tokens prefilled.",
                                     registry=r)
        self.generation_tokens = Counter("shardline_generation_tokens",
                                         "Tokens generated (as Usage.completion_tokens counts "
                                         "them).", registry=r)
        self.success = Counter("shardline_request_success", "Requests finished, by reason.",
                               ["finished_reason"], registry=r)
        self.failure = Counter("shardline_request_failure", "Requests that did not finish: "
                               "refused, failed or cancelled, by reason.", ["reason"], registry=r)
        self.ttft = Histogram("shardline_time_to_first_token_seconds",
                              "From a request reaching the engine (queue time included) to "
                              "its first token.", buckets=TTFT_BUCKETS, registry=r)
        self.itl = Histogram("shardline_inter_token_latency_seconds",
                             "Time between consecutive tokens of a request.",
                             buckets=ITL_BUCKETS, registry=r)
        self.e2e = Histogram("shardline_e2e_request_latency_seconds",
                             "From a request reaching the engine to its last token, for "
                             "finished requests.", buckets=E2E_BUCKETS, registry=r)
        self.replans = Counter("shardline_replans", "Plans made and loaded, by reason.",
                               ["reason"], registry=r)
        self.shard_transfer = Counter("shardline_shard_transfer",
                                      "Shard file bytes sent to each worker (chunks sent "
                                      "again after a refusal included).", ["worker"],
                                      unit="bytes", registry=r)
        self.spec_draft = Counter("shardline_spec_decode_draft_tokens",
                                  "Tokens proposed by speculative decoding (ngram or a draft "
                                  "model) and sent to the pipeline to check.", registry=r)
        self.spec_accepted = Counter("shardline_spec_decode_accepted_tokens",
                                     "Proposed tokens the model confirmed (each one a token "
                                     "that needed no trip of its own).", registry=r)
        self.build_info = Gauge("shardline_build_info", "Shardline version and wire version; "
                                "always 1.", ["version", "api"], registry=r)
        self.build_info.labels(protos.__version__, str(protos.WIRE_VERSION)).set(1)
        for reason in FINISH_REASONS.values():
            self.success.labels(reason)
        for reason in FAILURE_REASONS:
            self.failure.labels(reason)
        for reason in REPLAN_REASONS:
            self.replans.labels(reason)
        r.register(_StateCollector(self))
        ProcessCollector(registry=r)
        PlatformCollector(registry=r)
        self.interceptor: MetricsInterceptor = server_interceptor(r)

    def watch(self, source: Any) -> None:
        """Read requests and workers at scrape time from `source.engine` and `source.cluster`."""
        self.source = source

    def render(self) -> tuple[bytes, str]:
        """(body, content type) of the Prometheus text exposition, for GET /metrics."""
        return generate_latest(self.registry), CONTENT_TYPE_LATEST

    def count_failure(self, error: BaseException) -> None:
        """Count a refused request once (errors that passed through `observe` are counted)."""
        if getattr(error, "_shardline_counted", False):
            return
        code = getattr(error, "code", None)
        reason = code.lower() if isinstance(code, str) else "internal"
        self.failure.labels(reason).inc()
        try:
            error._shardline_counted = True  # type: ignore[attr-defined]
        except AttributeError:
            pass

    async def observe(self, chunks: AsyncIterator[Any], prompt_tokens: int
                      ) -> AsyncIterator[Any]:
        """Pass a request's chunks through, recording tokens, TTFT, ITL, e2e and its outcome."""
        t0 = time.perf_counter()
        last: float | None = None
        seen = 0
        done = False
        try:
            async for chunk in chunks:
                now = time.perf_counter()
                new = len(chunk.token_ids)
                if chunk.usage is not None:
                    new = max(new, chunk.usage.completion_tokens - seen)
                if new:
                    if last is None:
                        self.ttft.observe(now - t0)
                        self.prompt_tokens.inc(prompt_tokens)
                        gaps = [0.0] * (new - 1)  # tokens that came with the first one
                    else:
                        gaps = [(now - last) / new] * new
                    for gap in gaps:
                        self.itl.observe(gap)
                    self.generation_tokens.inc(new)
                    seen += new
                    last = now
                if chunk.finish_reason:
                    reason = FINISH_REASONS.get(chunk.finish_reason)
                    if reason is None:
                        self.failure.labels("cancelled").inc()
                    else:
                        self.success.labels(reason).inc()
                        self.e2e.observe(now - t0)
                    done = True
                yield chunk
        except BaseException as e:
            if not done:
                if isinstance(e, Exception):
                    self.count_failure(e)
                else:  # CancelledError, GeneratorExit: the client went away
                    self.failure.labels("cancelled").inc()
                done = True
            raise
        finally:
            if not done:  # the stream ended without a finish reason
                self.failure.labels("internal").inc()
            aclose = getattr(chunks, "aclose", None)
            if aclose is not None:
                await aclose()


def _split_address(address: str) -> str:
    host, sep, _port = address.rpartition(":")
    return host if sep else address


def sd_targets(source: Any, loopback_host: str | None = None) -> list[dict]:
    """Prometheus `http_sd_configs` JSON: every live worker's metrics endpoint with its labels
    (the plan's workers and standby ones; `worker` as in shardline_worker_layers).

    `loopback_host` replaces a loopback worker host (a local worker seen from a Prometheus in
    Docker: `host.docker.internal`).
    """
    out = []
    for k in known_workers(source):
        if not k.scrapable:
            continue
        w = k.worker
        host = _split_address(w.address)
        if loopback_host and (host in LOOPBACK or host.startswith("127.")):
            host = loopback_host
        spec = w.shard.spec if k.in_plan and w.shard is not None else None
        labels = {"worker": k.label, "worker_id": w.info.id}
        if spec is not None:
            labels["layers"] = f"[{spec.layer_start}, {spec.layer_end})"
            labels["stage"] = str(spec.stage_index)
        out.append({"targets": [f"{host}:{w.info.metrics_port}"], "labels": labels})
    return out
