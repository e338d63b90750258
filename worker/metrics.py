"""A worker's Prometheus metrics (SPEC: Metrics, Worker) and its own metrics HTTP endpoint."""

from __future__ import annotations

import socket
import sys
import threading
import time
from collections.abc import Iterable
from typing import Any
from wsgiref.simple_server import WSGIRequestHandler, make_server

import prometheus_client
from prometheus_client import (
    CollectorRegistry,
    Counter,
    Histogram,
    PlatformCollector,
    ProcessCollector,
    make_wsgi_app,
)
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.exposition import ThreadingWSGIServer
from prometheus_client.registry import Collector

from protos.grpc_metrics import MetricsInterceptor, server_interceptor

# One step of one stage: sub-millisecond on a tiny model, minutes for a long prefill chunk of a
# large model on a small machine.
FORWARD_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
                   5.0, 10.0, 30.0, 60.0, 120.0, 300.0)
# Handing one step's activations to the next stage: microseconds on loopback, seconds for a big
# prefill chunk over Wi-Fi.
TRANSFER_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1,
                    0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)

# The parts of one decode step on one stage (StepParts): tens of microseconds to a second.
PART_BUCKETS = (0.00001, 0.000025, 0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005,
                0.01, 0.025, 0.05, 0.1, 0.25, 1.0)
STEP_PARTS = ("receive", "host", "device", "serialise", "send", "waiting", "prepare")
STEP_KINDS = ("decode", "check")

MEMORY_KINDS = ("weights", "kv", "active", "peak", "total")
# of a decode step built ahead (worker/lookahead.py, worker/sent_ahead.py)
OUTCOMES = ("taken", "dropped", "early", "sent", "undone")
SAMPLE_EVERY = 0.25  # seconds between memory samples while steps run


class _StateCollector(Collector):
    """Gauges read at scrape time from the last sample (taken on the MLX thread)."""

    def __init__(self, metrics: WorkerMetrics) -> None:
        self.metrics = metrics

    def collect(self) -> Iterable[GaugeMetricFamily]:
        m = self.metrics
        with m.lock:
            memory = dict(m.memory)
            sessions = m.sessions
        mem = GaugeMetricFamily("shardline_worker_memory_bytes",
                                "Memory of this worker by kind: weights of the loaded shard, kv "
                                "caches, MLX active and peak allocation, usable total.",
                                labels=["kind"], unit="bytes")
        for kind in MEMORY_KINDS:
            mem.add_metric([kind], float(memory.get(kind, 0)))
        yield mem
        budget = max(memory.get("total", 0) - memory.get("weights", 0), 1)
        yield GaugeMetricFamily("shardline_kv_cache_usage_ratio",
                                "KV cache bytes over the KV budget (usable memory minus weights), "
                                "0 to 1.", value=min(memory.get("kv", 0) / budget, 1.0))
        yield GaugeMetricFamily("shardline_sessions",
                                "Sequences with KV caches on this stage.", value=float(sessions))


class WorkerMetrics:
    """Every worker metric, in its own registry (not the process-global one)."""

    def __init__(self, total_memory_bytes: int = 0,
                 registry: CollectorRegistry | None = None) -> None:
        prometheus_client.disable_created_metrics()
        self.registry = registry if registry is not None else CollectorRegistry()
        r = self.registry
        self.forward = Histogram("shardline_stage_forward_seconds",
                                 "Time this stage takes to run one step through its layers "
                                 "(evaluated), by phase: prefill if the step holds a prompt chunk.",
                                 ["phase"], buckets=FORWARD_BUCKETS, registry=r)
        self.activation_bytes = Counter("shardline_activation_bytes",
                                        "Hidden-state bytes received from the previous stage "
                                        "(in) and sent to the next (out).",
                                        ["direction"], unit="bytes", registry=r)
        self.transfer = Histogram("shardline_activation_transfer_seconds",
                                  "Time to hand one step's activations to the next stage's "
                                  "stream or direct link (includes flow-control backpressure).",
                                  buckets=TRANSFER_BUCKETS, registry=r)
        self.parts = Histogram("shardline_stage_step_part_seconds",
                               "Where one decode step's time goes on this stage: receive (in "
                               "hand until the MLX thread begins it), host (building its graph), "
                               "device (waiting for its values), serialise (building the output "
                               "messages), send (until written to the next stage or the "
                               "results), waiting (idle before it arrived), prepare (built ahead "
                               "while waiting); kind: decode or check (of proposals).",
                               ["part", "kind"], buckets=PART_BUCKETS, registry=r)
        self.link_steps = Counter("shardline_link_steps",
                                  "Steps that came from the previous stage (in) or went to "
                                  "the next (out) on a direct link (worker/link.py) instead "
                                  "of a Forward stream, and results the last stage wrote to "
                                  "stages following its tokens on one (follow).",
                                  ["direction"], registry=r)
        self.lookahead = Counter("shardline_lookahead_steps",
                                 "Decode steps and checks of proposals this stage built "
                                 "ahead (worker/lookahead.py, worker/check_ahead.py), by "
                                 "outcome: taken (the next step was the guess), dropped "
                                 "(rolled back), early (started on the last stage's tokens "
                                 "before the coordinator's step came), sent (of those, sent "
                                 "on to the next stage before it came), undone (a step sent "
                                 "ahead that this stage took back: it was not confirmed).",
                                 ["outcome"], registry=r)
        self.shard_received = Counter("shardline_shard_received",
                                      "Shard file bytes received from the coordinator into "
                                      "this worker's cache (chunks accepted).", unit="bytes",
                                      registry=r)
        # labelled children looked up once, not on every step
        self._forward = {phase: self.forward.labels(phase) for phase in ("prefill", "decode")}
        self._bytes = {d: self.activation_bytes.labels(d) for d in ("in", "out")}
        self._guesses = {o: self.lookahead.labels(o) for o in OUTCOMES}
        self.lock = threading.Lock()
        self.memory: dict[str, int] = {"total": total_memory_bytes}
        self.sessions = 0
        self._sampled_at = 0.0
        self._sampled_sessions = -1
        r.register(_StateCollector(self))
        ProcessCollector(registry=r)
        PlatformCollector(registry=r)
        self.interceptor: MetricsInterceptor = server_interceptor(r)

    @property
    def kv_bytes(self) -> int:
        """KV cache bytes of the last sample (read from any thread)."""
        with self.lock:
            return self.memory.get("kv", 0)

    def guesses(self, runner: Any) -> None:
        """Bring the lookahead counters up to a StageRunner's own (call on its MLX thread)."""
        lookahead = runner.lookahead
        for outcome in OUTCOMES[:-1] if lookahead is not None else ():
            built = getattr(lookahead, outcome) + getattr(lookahead.checks, outcome, 0)
            new = built - lookahead.reported[outcome]
            if new:
                self._guesses[outcome].inc(new)
                lookahead.reported[outcome] += new
        new = runner.sent.undone - runner.sent.reported  # (worker/sent_ahead.py)
        if new:
            self._guesses["undone"].inc(new)
            runner.sent.reported += new

    def step(self, seconds: float, prefill_tokens: int, bytes_in: int, bytes_out: int) -> None:
        """Record one step: its forward time and the activation bytes it took in and put out."""
        self._forward["prefill" if prefill_tokens else "decode"].observe(seconds)
        if bytes_in:
            self._bytes["in"].inc(bytes_in)
        if bytes_out:
            self._bytes["out"].inc(bytes_out)

    def sample(self, runner: Any, weight_bytes: int, force: bool = False) -> None:
        """Refresh memory, KV and session gauges. Call on the MLX thread (after a step or load).

        Between forced samples (load, a change in the number of sessions) it runs at most every
        SAMPLE_EVERY seconds so that decode steps stay cheap.
        """
        import mlx.core as mx

        sessions = len(runner.sessions) if runner is not None else 0
        now = time.monotonic()
        recent = now - self._sampled_at < SAMPLE_EVERY
        if not force and sessions == self._sampled_sessions and recent:
            return
        kv = runner.kv_bytes if runner is not None else 0
        active, peak = mx.get_active_memory(), mx.get_peak_memory()
        with self.lock:
            self.memory.update(weights=weight_bytes, kv=kv, active=active, peak=peak)
            self.sessions = sessions
        self._sampled_at, self._sampled_sessions = now, sessions


class StepParts:
    """Times each step's parts (WorkerMetrics.parts) by the step's kind: `decode` (one position
    a sequence) or `check` (proposals checked, coordinator/serving/speculation.py);
    `bench/bench_profile.py` and `bench/bench_speculation.py` read them. `arrived` and `sent`
    run on the event loop, `computed` and `prepared` on the MLX thread."""

    def __init__(self, metrics: WorkerMetrics) -> None:
        self._part = {(p, k): metrics.parts.labels(p, k) for p in STEP_PARTS for k in STEP_KINDS}
        self.in_flight = 0
        self._idle_since: float | None = None
        self._prepared = 0.0  # seconds built ahead in the current wait

    def arrived(self, now: float, kind: str) -> None:
        """A step of `kind` arrived: the wait it ends (and what was built ahead in it) is its."""
        if self.in_flight == 0 and self._idle_since is not None:
            self._part["waiting", kind].observe(now - self._idle_since)
            if self._prepared:
                self._part["prepare", kind].observe(self._prepared)
        self._prepared = 0.0
        self.in_flight += 1

    def computed(self, times: Any, kind: str | None) -> None:
        if kind is not None:
            for part in ("receive", "host", "device", "serialise"):
                self._part[part, kind].observe(getattr(times, part))

    def prepared(self, seconds: float) -> None:
        """A step built ahead while waiting (worker/lookahead.py; on the MLX thread)."""
        self._prepared += seconds

    def sent_ahead(self, times: Any) -> None:
        """A decode step stage 0 sent on ahead of its message (worker/sent_ahead.py; on the
        MLX thread): its `send` (it never arrived on the loop, so no wait ends or begins)."""
        self._part["send", "decode"].observe(times.sent - times.done)

    def sent(self, times: Any, kind: str | None) -> None:
        now = getattr(times, "sent", 0.0) or time.perf_counter()  # (written on a link)
        if kind is not None:
            self._part["send", kind].observe(now - times.done)
        self.in_flight -= 1
        if self.in_flight == 0:
            self._idle_since = now


def step_kind(msg: Any, prefill_tokens: int | None) -> str | None:
    """`check` for a step that checks proposals, `decode` for one position a sequence, None
    for anything else (prompt chunks, a failed step: `prefill_tokens` None)."""
    if prefill_tokens is None or not msg.seqs:
        return None
    if any(seq.draft for seq in msg.seqs):
        return "check"
    return None if prefill_tokens else "decode"


# Seconds a client of the metrics port has to send its request: one that never does (slowloris)
# holds its thread and descriptor no longer than that.
METRICS_CLIENT_SECONDS = 10.0


class _MetricsHandler(WSGIRequestHandler):
    timeout = METRICS_CLIENT_SECONDS  # on the socket: a read that waits longer ends the handler

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - the base's name
        pass


class _MetricsServer(ThreadingWSGIServer):
    """prometheus_client's threaded WSGI server, quiet about clients that were too slow or
    went away."""

    request_queue_size = 128  # socketserver's 5 drops a burst of connections' SYNs

    def handle_error(self, request: Any, client_address: Any) -> None:
        if isinstance(sys.exc_info()[1], OSError):
            return
        super().handle_error(request, client_address)


def start_metrics_server(metrics: WorkerMetrics, host: str, port: int = 0) -> tuple[Any, int]:
    """Serve `metrics` at http://host:port/metrics in a thread; returns (server, bound port)."""
    server_class = type("MetricsServer", (_MetricsServer,), {
        "address_family": socket.AF_INET6 if ":" in host else socket.AF_INET})
    server = make_server(host, port, make_wsgi_app(metrics.registry), server_class,
                         handler_class=_MetricsHandler)
    threading.Thread(target=server.serve_forever, name="shardline-metrics", daemon=True).start()
    return server, server.server_port


def hidden_bytes(msg: Any) -> int:
    """Bytes of hidden state carried by a StageMessage (0 for token ids only)."""
    return sum(len(seq.hidden.data) for seq in msg.seqs) if msg is not None else 0
