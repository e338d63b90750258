"""Metrics: the names in docs/observability.md, right values, promtool-clean endpoints (dashboards:
test_dashboards.py)."""

from __future__ import annotations

import asyncio
import json
import re
import shutil
import subprocess
import time
import urllib.request
from types import SimpleNamespace

import grpc
import pytest
from conftest import ROOT, Serving, need, run
from prometheus_client.parser import text_string_to_metric_families

from coordinator.demo import ModelSpec
from protos import WIRE_VERSION, inference_pb2

SPEC_MODEL = ModelSpec(family="qwen3")
COORDINATOR_METRICS = {
    "shardline_requests_running", "shardline_requests_waiting", "shardline_prompt_tokens_total",
    "shardline_generation_tokens_total", "shardline_request_success_total",
    "shardline_request_failure_total", "shardline_time_to_first_token_seconds",
    "shardline_inter_token_latency_seconds", "shardline_e2e_request_latency_seconds",
    "shardline_workers", "shardline_worker_layers", "shardline_replans_total",
    "shardline_build_info", "shardline_shard_transfer_bytes_total",
    "shardline_spec_decode_draft_tokens_total", "shardline_spec_decode_accepted_tokens_total",
}
WORKER_METRICS = {
    "shardline_stage_forward_seconds", "shardline_activation_bytes_total",
    "shardline_activation_transfer_seconds", "shardline_worker_memory_bytes",
    "shardline_kv_cache_usage_ratio", "shardline_sessions", "shardline_shard_received_bytes_total",
}
GRPC_METRICS = {"grpc_server_started_total", "grpc_server_handled_total",
                "grpc_server_handling_seconds"}
SPEC_HISTOGRAMS = {"shardline_time_to_first_token_seconds",
                   "shardline_inter_token_latency_seconds",
                   "shardline_e2e_request_latency_seconds", "shardline_stage_forward_seconds",
                   "shardline_activation_transfer_seconds"}
# what a dashboard may query: SPEC's metric names only (grpc_server_* are for ad-hoc queries)
ALLOWED = (COORDINATOR_METRICS | WORKER_METRICS
           | {h + s for h in SPEC_HISTOGRAMS for s in ("_bucket", "_sum", "_count")})
DASHBOARDS = sorted((ROOT / "dashboards").glob("*.json"))
NO_PROMTOOL = "promtool not installed (Debian package prometheus; .ci/run installs it)"
PROMQL_WORDS = {"bool", "offset", "and", "or", "unless", "inf", "nan", "Inf", "NaN"}


def panels(dashboard: dict) -> list[dict]:
    out = []
    for p in dashboard["panels"]:
        out.append(p)
        out.extend(p.get("panels", []))
    return out


def panel_targets() -> list[tuple[str, str, dict]]:
    """(dashboard file, panel title, target) for every query of every dashboard panel."""
    out = []
    for path in DASHBOARDS:
        for p in panels(json.loads(path.read_text())):
            out.extend((path.name, p["title"], t) for t in p.get("targets", []))
    return out


def metric_names(expr: str) -> set[str]:
    """Metric names a PromQL expression selects (functions, labels and keywords left out)."""
    expr = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)
    expr = re.sub(r"\{[^}]*\}|\[[^\]]*\]", " ", expr)
    expr = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", " ", expr)
    names = set()
    for m in re.finditer(r"(?<![\w.])[A-Za-z_:][A-Za-z0-9_:]*", expr):
        if not expr[m.end():].lstrip().startswith("(") and m.group(0) not in PROMQL_WORDS:
            names.add(m.group(0))
    return names


def families(text: str) -> dict[str, list]:
    """Sample lists by sample name (`x_total`, `x_bucket`, ...) of a Prometheus text page."""
    out: dict[str, list] = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            out.setdefault(s.name, []).append(s)
    return out


def value(samples: dict, name: str, **labels: str) -> float:
    found = [s.value for s in samples.get(name, []) if all(s.labels.get(k) == v
                                                           for k, v in labels.items())]
    assert len(found) == 1, (name, labels, found)
    return found[0]


def get(url: str) -> tuple[str, str]:
    with urllib.request.urlopen(url, timeout=10) as r:
        return r.read().decode(), r.headers.get("Content-Type", "")


# -- a live cluster ------------------------------------------------------------------------------
BUSY = ("receive", "host", "device", "serialise", "send")  # a step's parts while it runs


@pytest.fixture(scope="module")
def scraped(model_dir, workers):
    """Scrapes of coordinator and workers around a known request mix on a two-worker cluster."""
    path = model_dir(SPEC_MODEL)
    prompt, max_tokens = list(range(20, 45)), 12

    async def scenario():
        async with Serving(path, workers[:2]) as s:
            base = f"http://127.0.0.1:{s.coordinator.http_port}"
            sd = json.loads((await asyncio.to_thread(get, f"{base}/sd/workers"))[0])
            urls = [f"http://{t['targets'][0]}/metrics" for t in sd]
            before = [families((await asyncio.to_thread(get, u))[0]) for u in urls]
            tokens, finish, _ = await s.generate(prompt, max_tokens)

            def decoded(page: str, i: int) -> float:
                return sum(s.value for s in families(page).get(
                    "shardline_stage_forward_seconds_count", [])
                    if s.labels.get("phase") == "decode") - sum(
                    s.value for s in before[i].get("shardline_stage_forward_seconds_count", [])
                    if s.labels.get("phase") == "decode")

            def settled(pages: list) -> bool:
                """Every stage counted the same decode steps, each with all its parts (the
                last step's, and one stage 0 may have sent past it, come a moment after the
                reply: docs/architecture.md, "Sending ahead")."""
                counts = {decoded(p, i) for i, (p, _) in enumerate(pages)}
                if len(counts) != 1 or min(counts) < len(tokens):
                    return False
                return all(len({s.value for s in families(p).get(
                    "shardline_stage_step_part_seconds_count", [])
                    if s.labels.get("kind") == "decode" and s.labels.get("part") in BUSY}) == 1
                    for p, _ in pages)

            deadline = time.monotonic() + 20
            while True:
                after = [await asyncio.to_thread(get, u) for u in urls]
                if settled(after) or time.monotonic() > deadline:
                    break
                await asyncio.sleep(0.05)
            codes = []
            for ids, model in (([10**6], ""), ([1, 2], "no-such-model")):
                try:
                    await s.stub.Generate(inference_pb2.GenerateRequest(
                        model=model, prompt_token_ids=ids)).read()
                except grpc.aio.AioRpcError as e:
                    codes.append(e.code().name)
            call = s.stub.Generate(inference_pb2.GenerateRequest(
                prompt_token_ids=prompt, sampling=inference_pb2.SamplingParams(max_tokens=500)))
            await call.read()
            call.cancel()
            for _ in range(100):  # the server notices the cancel a moment later
                coordinator = await asyncio.to_thread(get, f"{base}/metrics")
                if 'grpc_code="CANCELLED"' in coordinator[0] and re.search(
                        r'failure_total\{reason="cancelled"\} 1', coordinator[0]):
                    break
                await asyncio.sleep(0.05)
            return SimpleNamespace(tokens=tokens, finish=finish, codes=codes, sd=sd,
                                   prompt=prompt, before=before, after=after,
                                   coordinator=coordinator,
                                   layers=[(w.shard.spec.layer_start, w.shard.spec.layer_end)
                                           for w in s.coordinator.cluster.workers])

    return run(scenario())


def test_promtool_check_metrics_passes_on_coordinator_and_workers(scraped):
    need(shutil.which("promtool"), NO_PROMTOOL)
    for text, _ in [scraped.coordinator, *scraped.after]:
        proc = subprocess.run(["promtool", "check", "metrics"], input=text, capture_output=True,
                              text=True, timeout=60)
        assert proc.returncode == 0, proc.stdout + proc.stderr


def test_endpoints_export_every_spec_metric_in_text_format(scraped):
    text, content_type = scraped.coordinator
    assert content_type.startswith("text/plain")
    names = {f.name for f in text_string_to_metric_families(text)}
    # the parser drops _total from counter family names
    norm = {n.removesuffix("_total") for n in COORDINATOR_METRICS | GRPC_METRICS}
    assert norm <= names, norm - names
    for worker_text, _ in scraped.after:
        names = {f.name for f in text_string_to_metric_families(worker_text)}
        norm = {n.removesuffix("_total") for n in WORKER_METRICS | GRPC_METRICS}
        assert norm <= names, norm - names
        assert "_created" not in worker_text and "request_id" not in worker_text


# every label key a sample may carry: no per-request value (request_id, seq_id, prompt ...)
GRPC_LABELS = {"grpc_type", "grpc_service", "grpc_method", "grpc_code"}
PROCESS_LABELS = {"implementation", "major", "minor", "patchlevel", "version"}  # python_info
COORDINATOR_LABELS = {"le", "finished_reason", "reason", "state", "worker", "version", "api",
                      *GRPC_LABELS, *PROCESS_LABELS}
WORKER_LABELS = {"le", "phase", "direction", "kind", "part", "outcome", *GRPC_LABELS,
                 *PROCESS_LABELS}
# the largest finite bucket of each histogram (the code's lists: up to minutes)
TOP_BUCKETS = {"shardline_time_to_first_token_seconds": "2560.0",
               "shardline_inter_token_latency_seconds": "80.0",
               "shardline_e2e_request_latency_seconds": "7680.0",
               "shardline_stage_forward_seconds": "300.0",
               "shardline_activation_transfer_seconds": "30.0",
               "grpc_server_handling_seconds": "600.0"}


def label_keys(text: str) -> dict[str, set[str]]:
    """Every label key of a Prometheus text page, with the samples that carry it."""
    out: dict[str, set[str]] = {}
    for name, samples in families(text).items():
        for s in samples:
            for key in s.labels:
                out.setdefault(key, set()).add(name)
    return out


def test_no_sample_carries_a_label_outside_the_allowlist(scraped):
    keys = label_keys(scraped.coordinator[0])
    assert set(keys) <= COORDINATOR_LABELS, {k: keys[k] for k in set(keys) - COORDINATOR_LABELS}
    assert {"state", "worker", "finished_reason", "reason", "grpc_code"} <= set(keys)
    for text, _ in scraped.after:
        keys = label_keys(text)
        assert set(keys) <= WORKER_LABELS, {k: keys[k] for k in set(keys) - WORKER_LABELS}
        assert {"phase", "direction", "kind", "grpc_method"} <= set(keys)


def test_every_worker_times_the_parts_of_its_decode_steps(scraped):
    # bench/bench_profile.py reads these: each part of a decode step, on every stage
    for text, _ in scraped.after:
        counts = {s.labels["part"]: s.value
                  for s in families(text)["shardline_stage_step_part_seconds_count"]
                  if s.labels["kind"] == "decode"}
        sums = {s.labels["part"]: s.value
                for s in families(text)["shardline_stage_step_part_seconds_sum"]
                if s.labels["kind"] == "decode"}
        assert all(counts[p] > 0 and sums[p] > 0 for p in BUSY), counts
        assert len({counts[p] for p in BUSY}) == 1  # one of each per decode step
        assert counts["waiting"] > 0


def test_histograms_reach_minutes_and_the_top_bucket_holds_every_observation(scraped):
    pages = [families(scraped.coordinator[0])] + [families(t) for t, _ in scraped.after]
    seen = set()
    for page in pages:
        for name, top in TOP_BUCKETS.items():
            buckets = page.get(f"{name}_bucket", [])
            if not buckets:
                continue
            seen.add(name)
            series: dict[tuple, dict[str, float]] = {}
            for b in buckets:
                rest = tuple(sorted((k, v) for k, v in b.labels.items() if k != "le"))
                series.setdefault(rest, {})[b.labels["le"]] = b.value
            for rest, by_le in series.items():
                finite = max((le for le in by_le if le != "+Inf"), key=float)
                assert finite == top, (name, rest, finite)
                assert by_le[top] == by_le["+Inf"], (name, rest)  # nothing took longer
    assert seen == set(TOP_BUCKETS)


def test_coordinator_counts_tokens_latencies_and_outcomes(scraped):
    c = families(scraped.coordinator[0])
    n = len(scraped.tokens)
    assert scraped.codes == ["INVALID_ARGUMENT", "NOT_FOUND"]
    assert value(c, "shardline_prompt_tokens_total") == 2 * len(scraped.prompt)  # + cancelled
    assert value(c, "shardline_generation_tokens_total") >= n + 1
    reason = {1: "stop", 2: "length"}[scraped.finish]
    assert value(c, "shardline_request_success_total", finished_reason=reason) == 1
    for why in ("invalid_argument", "not_found", "cancelled"):
        assert value(c, "shardline_request_failure_total", reason=why) == 1, why
    assert value(c, "shardline_time_to_first_token_seconds_count") == 2
    assert value(c, "shardline_e2e_request_latency_seconds_count") == 1
    assert value(c, "shardline_inter_token_latency_seconds_count") >= n - 1
    inf = value(c, "shardline_e2e_request_latency_seconds_bucket", le="+Inf")
    assert inf == 1 and value(c, "shardline_e2e_request_latency_seconds_bucket", le="7680.0") == 1
    assert value(c, "shardline_requests_running") == 0
    assert value(c, "shardline_requests_waiting") == 0
    assert value(c, "shardline_workers", state="serving") == 2
    layers = {s.labels["worker"]: s.value for s in c["shardline_worker_layers"]}
    assert layers == {"w1": scraped.layers[0][1] - scraped.layers[0][0],
                      "w2": scraped.layers[1][1] - scraped.layers[1][0]}
    assert value(c, "shardline_replans_total", reason="initial") == 1
    assert value(c, "shardline_build_info", version="0.1.0", api=str(WIRE_VERSION)) == 1
    handled = {(s.labels["grpc_method"], s.labels["grpc_code"]): s.value
               for s in c["grpc_server_handled_total"]}
    assert handled[("Generate", "OK")] == 1
    assert handled[("Generate", "INVALID_ARGUMENT")] == 1
    assert handled[("Generate", "NOT_FOUND")] == 1
    assert handled[("Generate", "CANCELLED")] == 1
    # latency by method and code: the handling histogram carries grpc_code too
    timed = {(s.labels["grpc_method"], s.labels["grpc_code"]): s.value
             for s in c["grpc_server_handling_seconds_count"]}
    for key in (("Generate", "OK"), ("Generate", "INVALID_ARGUMENT"), ("Generate", "NOT_FOUND"),
                ("Generate", "CANCELLED")):
        assert timed[key] == handled[key] == 1, key
    assert value(c, "grpc_server_handling_seconds_bucket", grpc_method="Generate",
                 grpc_code="NOT_FOUND", le="+Inf") == 1


def test_workers_count_steps_bytes_memory_and_sessions(scraped):
    n = len(scraped.tokens)
    before = scraped.before
    after = [families(t) for t, _ in scraped.after]

    def delta(i: int, name: str, **labels: str) -> float:
        return value(after[i], name, **labels) - value(before[i], name, **labels)

    # stage 0 may have sent one step past the last token on before the stream ended
    # (docs/architecture.md, "Sending ahead"): both stages ran it then
    extra = [delta(i, "shardline_stage_forward_seconds_count", phase="decode") - n
             for i in range(2)]
    assert extra[0] in (0, 1) and extra[1] == extra[0]
    for i in range(2):
        # prompt[:-1] is one prefill chunk; the last prompt token and n - 1 tokens are decoded
        assert delta(i, "shardline_stage_forward_seconds_count", phase="prefill") == 1
        weights = value(after[i], "shardline_worker_memory_bytes", kind="weights")
        total = value(after[i], "shardline_worker_memory_bytes", kind="total")
        assert 0 < weights < value(after[i], "shardline_worker_memory_bytes", kind="peak")
        assert total == (1 << 30) * (i + 1)
        assert 0 <= value(after[i], "shardline_kv_cache_usage_ratio") <= 1
    sent = delta(0, "shardline_activation_bytes_total", direction="out")
    positions = len(scraped.prompt) + n - 1 + extra[0]
    assert sent > 0 and sent % positions == 0
    assert delta(1, "shardline_activation_bytes_total", direction="in") == sent
    assert delta(0, "shardline_activation_bytes_total", direction="in") == 0
    assert delta(1, "shardline_activation_bytes_total", direction="out") == 0
    assert delta(0, "shardline_activation_transfer_seconds_count") == n + 1 + extra[0]
    assert delta(1, "shardline_activation_transfer_seconds_count") == 0
    # the gRPC interceptor is wired into every worker's server: it counted the shard load and
    # the pipeline stream into it (coordinator -> stage 0, stage 0 -> stage 1)
    for page in after:
        ok = value(page, "grpc_server_handled_total", grpc_service="shardline.v1.Worker",
                   grpc_method="LoadShard", grpc_code="OK")
        assert ok >= 1
        assert value(page, "grpc_server_handling_seconds_count", grpc_service="shardline.v1.Worker",
                     grpc_method="LoadShard", grpc_code="OK") == ok
        forward = [s for s in page["grpc_server_started_total"]
                   if s.labels["grpc_service"] == "shardline.v1.Worker"
                   and s.labels["grpc_method"] == "Forward"]
        assert len(forward) == 1 and forward[0].labels["grpc_type"] == "bidi_stream"
        assert forward[0].value >= 1


def test_sd_workers_lists_each_worker_metrics_endpoint(scraped):
    assert [t["labels"]["worker"] for t in scraped.sd] == ["w1", "w2"]
    for t, (start, end) in zip(scraped.sd, scraped.layers, strict=True):
        assert t["labels"]["layers"] == f"[{start}, {end})"
        assert t["labels"]["worker_id"] and t["targets"][0].startswith("127.0.0.1:")


def test_steps_that_check_proposals_are_timed_apart_from_decode_steps():
    # bench/bench_speculation.py splits a round's time on each stage from these
    from prometheus_client import generate_latest

    from protos import worker_pb2
    from worker.metrics import StepParts, WorkerMetrics, step_kind

    metrics = WorkerMetrics()
    parts = StepParts(metrics)
    times = SimpleNamespace(receive=0.001, host=0.002, device=0.003, serialise=0.004,
                            done=time.perf_counter())
    plain = worker_pb2.StageMessage(seqs=[worker_pb2.SeqInput(seq_id="a", token_ids=[5])])
    check = worker_pb2.StageMessage(seqs=[worker_pb2.SeqInput(seq_id="a", token_ids=[5, 6, 7],
                                                              draft=2)])
    chunk = worker_pb2.StageMessage(seqs=[worker_pb2.SeqInput(seq_id="b", token_ids=[1, 2])])
    assert [step_kind(plain, 0), step_kind(check, 3), step_kind(chunk, 2),
            step_kind(check, None)] == ["decode", "check", None, None]
    for msg, prefill in ((plain, 0), (check, 3), (check, 3), (chunk, 2)):
        parts.arrived(time.perf_counter(), "check" if msg is check else "decode")
        parts.prepared(0.0005)
        parts.computed(times, step_kind(msg, prefill))
        parts.sent(times, step_kind(msg, prefill))
    page = families(generate_latest(metrics.registry).decode())
    counts = {(s.labels["part"], s.labels["kind"]): s.value
              for s in page["shardline_stage_step_part_seconds_count"]}
    assert counts["host", "decode"] == 1 and counts["host", "check"] == 2
    assert counts["device", "check"] == 2 and counts["send", "check"] == 2
    # a wait is the next step's: the first step ended none, the chunk's wait is a decode's
    assert counts["waiting", "check"] == 2 and counts["waiting", "decode"] == 1
    assert counts["prepare", "check"] == 2 and counts["prepare", "decode"] == 1
