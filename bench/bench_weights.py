"""Weight shipping benchmark: loopback shard transfer (speed, memory) and re-plan serving pauses.

Two parts, on a random-weight bf16 llama of >= 1 GiB built once by `cached_model`:

1. transfer (needs the weight-shipping tree): one worker with an empty --cache-dir is shipped the
   whole model by `coordinator.cluster.shipping.Shipper`, directly (no Coordinator). Reports
   the hash
   indexing time of the first `files()` call, MB/s of the transfer, the peak RSS growth of this
   process and of the worker (VmRSS sampled every 20 ms), and the time of a second, cached ship.
2. pause (only APIs that exist before weight shipping too, so it runs on an older tree): two
   workers serve, a third waits outside the plan; a client loops "one streaming Generate of
   --tokens new tokens, sleep --sleep s". After a warm-up the third worker is announced (a join
   re-plan), then a plan worker is killed (a loss re-plan). The pause of an event is the longest
   wait a client saw around it (send -> first token, or token -> next token), beside the same
   max before any event (the baseline).

    python bench/bench_weights.py --json /tmp/after.json               # both parts, this tree
    cd /tmp/before && python bench/bench_weights.py --pause-only --label before \\
        --json /tmp/before.json                                       # an older tree
    python bench/bench_weights.py --pause-only --compare /tmp/before.json  # ratios after/before
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # the tree this copy of the script lives in, installed or not

import grpc  # noqa: E402

from coordinator.demo import ModelSpec, cached_model  # noqa: E402

GiB = 1 << 30
MB = 1e6
PROMPT = [1, 5, 9, 200, 33, 4, 77, 12]


def log(msg: str) -> None:
    """A line on stderr with the wall clock, for following a run."""
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


# -- memory -----------------------------------------------------------------------------------
def cpu_seconds(pid: int | str) -> float:
    """User + system CPU time of a process so far, every thread (/proc/<pid>/stat)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def status_kib(pid: int | str, key: str) -> int:
    """A `kB` field of /proc/<pid>/status in bytes (0 when the process is gone)."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


class PeakRss:
    """VmRSS of some processes sampled every `every` seconds in a thread; growth of the peak."""

    def __init__(self, pids: dict[str, int | str], every: float = 0.02) -> None:
        self.pids = pids
        self.every = every
        self.before: dict[str, int] = {}
        self.peak: dict[str, int] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _sample(self) -> None:
        for name, pid in self.pids.items():
            self.peak[name] = max(self.peak.get(name, 0), status_kib(pid, "VmRSS"))

    def _run(self) -> None:
        while not self._stop.wait(self.every):
            self._sample()

    def __enter__(self) -> PeakRss:
        self.before = {n: status_kib(p, "VmRSS") for n, p in self.pids.items()}
        self.peak = dict(self.before)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self._sample()

    def growth(self) -> dict[str, int]:
        return {n: self.peak[n] - self.before[n] for n in self.pids}


# -- part 1: transfer -------------------------------------------------------------------------
async def bench_transfer(path: Path, work: Path) -> dict[str, Any]:
    """Ship the whole model to one empty worker over loopback; a second ship finds it cached."""
    from coordinator.cluster.cluster import open_worker
    from coordinator.cluster.modelinfo import read_model_info
    from coordinator.cluster.shipping import Shipper, Transfer
    from coordinator.local import LocalWorkers

    info = read_model_info(path)
    n = info.num_layers
    local = LocalWorkers(1, memory=[8 * GiB], cache_dir=work / "ship-worker", names=["ship"])
    address = local.start()[0]
    try:
        worker = await open_worker(address)
        shipper = Shipper(info, work / "hashes")
        t0 = time.monotonic()
        files = await shipper.files(0, n)
        hash_s = time.monotonic() - t0
        t0 = time.monotonic()
        await Shipper(info, work / "hashes").files(0, n)  # a fresh Shipper: the saved index
        index_s = time.monotonic() - t0
        total = sum(f.size for f in files)
        log(f"hashed {len(files)} files, {total / MB:.0f} MB in {hash_s:.1f}s; shipping...")
        pid = local.procs[0].pid
        hwm0 = status_kib("self", "VmHWM")
        transfer = Transfer("ship")
        with PeakRss({"coordinator": "self", "worker": pid}) as rss:
            cpu0 = cpu_seconds("self"), cpu_seconds(pid)
            t0 = time.monotonic()
            await shipper.ship(worker.stub, "ship", 0, n, files, transfer)
            ship_s = time.monotonic() - t0
            cpu = cpu_seconds("self") - cpu0[0], cpu_seconds(pid) - cpu0[1]
        hwm1 = status_kib("self", "VmHWM")
        again = Transfer("ship")
        with PeakRss({"coordinator": "self", "worker": pid}) as rss2:
            t0 = time.monotonic()
            await shipper.ship(worker.stub, "ship", 0, n, files, again)
            cached_s = time.monotonic() - t0
        await worker.channel.close()
    finally:
        local.stop()
    growth = rss.growth()
    return {
        "files": len(files), "bytes": total, "sent": transfer.total, "resent": transfer.resent,
        "hash_s": hash_s, "index_s": index_s, "ship_s": ship_s, "mb_s": transfer.total / MB
        / ship_s, "coord_rss_before": rss.before["coordinator"],
        "coord_growth": growth["coordinator"], "coord_hwm_growth": hwm1 - hwm0,
        "worker_rss_before": rss.before["worker"], "worker_growth": growth["worker"],
        "cached_s": cached_s, "cached_sent": again.total,
        "cached_worker_growth": rss2.growth()["worker"], "coord_cpu_s": cpu[0],
        "worker_cpu_s": cpu[1],
    }


# -- part 2: pauses ---------------------------------------------------------------------------
@dataclass
class Request:
    """One client request: when it went, when each token message came, how it ended."""

    sent: float
    tokens: list[float] = field(default_factory=list)
    ended: float = 0.0
    error: str = ""

    def waits(self) -> list[tuple[float, float, str]]:
        """(start, end, kind) of every wait: send -> first token, token -> next token; a failed
        request's last wait ends at its failure."""
        marks = [self.sent, *self.tokens] + ([self.ended] if self.error else [])
        kinds = ["first token"] + ["token gap"] * (len(marks) - 2)
        if self.error and kinds:
            kinds[-1] = "until failure"
        return [(a, b, k) for a, b, k in zip(marks[:-1], marks[1:], kinds, strict=False)]


class Client:
    """Loops one streaming Generate then a sleep, recording every request."""

    def __init__(self, stub: Any, tokens: int, sleep: float) -> None:
        self.stub, self.tokens, self.sleep = stub, tokens, sleep
        self.requests: list[Request] = []
        self.stopping = False

    async def run(self) -> None:
        from protos import inference_pb2

        msg = inference_pb2.GenerateRequest(
            prompt_token_ids=PROMPT, sampling=inference_pb2.SamplingParams(max_tokens=self.tokens))
        while not self.stopping:
            r = Request(time.monotonic())
            self.requests.append(r)
            try:
                async for out in self.stub.Generate(msg):
                    if out.token_ids:
                        r.tokens.append(time.monotonic())
            except grpc.aio.AioRpcError as e:
                r.error = f"{e.code().name}: {e.details()}"
                log(f"request failed: {r.error}")
            r.ended = time.monotonic()
            await asyncio.sleep(self.sleep)

    def mid_stream(self) -> bool:
        """A request is running and has had 2 tokens: an event now lands in a stream."""
        r = self.requests[-1] if self.requests else None
        return r is not None and not r.ended and len(r.tokens) >= 2

    def done_ok_since(self, t: float) -> int:
        """Requests sent at or after `t` that finished without an error."""
        return sum(1 for r in self.requests if r.sent >= t and r.ended and not r.error)


async def wait_for(cond: Any, what: str, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise TimeoutError(f"waited {timeout:.0f}s for {what}")
        await asyncio.sleep(0.02)


async def announce(coordinator: Any, address: str, name: str) -> None:
    """Tell membership about the worker at `address` as mDNS would (tests/test_replan.py)."""
    from coordinator.cluster.discovery import split_address
    from coordinator.cluster.membership import dial
    from protos.discovery import WorkerAd

    joiner = await dial(address)
    node_id = joiner.info.id
    await joiner.channel.close()
    host, port = split_address(address)
    coordinator.membership._on_seen(f"{name}._shardline._tcp.local.",
                                    WorkerAd(id=node_id, cluster="default"), [host], port, "")


async def bench_pause(path: Path, work: Path, args: argparse.Namespace) -> dict[str, Any]:
    """Two workers serve, a third joins, then one of the plan's is killed; the client's waits
    (times in seconds from the first request)."""
    from coordinator.app import Coordinator, ServeOptions
    from coordinator.local import LocalWorkers
    from protos import inference_pb2_grpc

    os.environ["PYTHONPATH"] = str(ROOT)  # workers import this tree (sys.executable -m worker)
    local = LocalWorkers(3, memory=[args.worker_memory * GiB] * 3, cache_dir=work / "workers",
                         names=["p1", "p2", "p3"], extra_args=args.worker_args.split())
    addresses = local.start()
    coordinator = Coordinator(
        ServeOptions(model=str(path), workers=addresses[:2], host="127.0.0.1", grpc_port=0,
                     http_port=0, context=256, cache_dir=work),
        progress=lambda m: log("coordinator: " + m.replace("\n", "\n    ")))
    channel = None
    try:
        t0 = time.monotonic()
        await coordinator.start()
        start_s = time.monotonic() - t0
        membership = coordinator.membership
        membership.settle = 0.1
        channel = grpc.aio.insecure_channel(f"127.0.0.1:{coordinator.grpc_port}")
        client = Client(inference_pb2_grpc.InferenceStub(channel), args.tokens, args.sleep)
        task = asyncio.create_task(client.run())
        begin = time.monotonic()
        limit = args.phase_timeout
        await wait_for(lambda: client.done_ok_since(begin) >= args.warmup, "the warm-up", limit)
        base_from = time.monotonic()
        await wait_for(lambda: client.done_ok_since(base_from) >= args.baseline,
                       "the baseline requests", limit)
        events: dict[str, dict[str, float]] = {}

        async def event(name: str, trigger: Any) -> None:
            replans = membership.replans
            await wait_for(client.mid_stream, f"a request mid-stream before the {name}", limit)
            t = time.monotonic()
            log(f"{name}: triggering")
            await trigger()
            await wait_for(lambda: membership.replans > replans, f"the {name} re-plan", limit)
            done = time.monotonic()
            log(f"{name}: re-planned after {done - t:.1f}s")
            await wait_for(lambda: client.done_ok_since(done) >= args.after,
                           f"requests after the {name}", limit)
            events[name] = {"at": t, "replanned": done, "end": time.monotonic()}

        await event("join", lambda: announce(coordinator, addresses[2], "p3"))

        async def kill() -> None:
            local.procs[1].kill()  # p2: a middle stage of the 3-worker plan

        await event("loss", kill)
        client.stopping = True
        await asyncio.wait_for(task, limit)
    finally:
        if channel is not None:
            await channel.close()
        await coordinator.stop()
        local.stop()
    return {
        "start_s": start_s, "baseline_from": base_from - begin,
        "events": {n: {k: v - begin for k, v in ev.items()} for n, ev in events.items()},
        "requests": [asdict(r) | {"sent": r.sent - begin, "tokens": [t - begin for t in r.tokens],
                                  "ended": r.ended - begin} for r in client.requests],
    }


def max_wait(requests: list[Request], a: float, b: float, kind: str | None = None,
             inside: bool = False) -> tuple[float, str]:
    """The longest wait (of `kind`, or any) overlapping [a, b] (or inside it), and its kind."""
    best = (0.0, "")
    for r in requests:
        for s, e, k in r.waits():
            hit = a <= s and e <= b if inside else e >= a and s <= b
            if hit and (kind is None or k == kind) and e - s > best[0]:
                best = (e - s, k)
    return best


def summarize(p: dict[str, Any]) -> dict[str, Any]:
    """Baseline and per-event waits of one pause run (bench_pause's result)."""
    reqs = [Request(**r) for r in p["requests"]]
    a, b = p["baseline_from"], p["events"]["join"]["at"]
    out: dict[str, Any] = {
        "base_first": max_wait(reqs, a, b, "first token", inside=True)[0],
        "base_gap": max_wait(reqs, a, b, "token gap", inside=True)[0],
    }
    out["baseline"] = max(out["base_first"], out["base_gap"])
    took = sorted(r.ended - r.sent for r in reqs if a <= r.sent and r.ended <= b)
    out["base_request"] = took[len(took) // 2]  # median time of a whole request
    for name, ev in p["events"].items():
        lo, hi = ev["at"], ev["end"]
        pause, kind = max_wait(reqs, lo, hi)
        out[name] = {
            "pause": pause, "kind": kind,
            "first": max_wait(reqs, lo, hi, "first token")[0],
            "gap": max_wait(reqs, lo, hi, "token gap")[0],
            "replan": ev["replanned"] - lo,
            "tokens": sum(1 for r in reqs for t in r.tokens if lo <= t <= ev["replanned"]),
            "failed": [r.error for r in reqs if r.error and r.ended >= lo and r.sent <= hi],
            "requests": sum(1 for r in reqs if r.ended >= lo and r.sent <= hi),
            "longest": max(r.ended - r.sent for r in reqs if r.ended >= lo and r.sent <= hi),
        }
    return out


# -- report -----------------------------------------------------------------------------------
def transfer_table(t: dict[str, Any]) -> str:
    return "\n".join([
        "| model bytes | files | hash index, first (s) | index reread (s) | ship (s) | MB/s "
        "| CPU s coordinator / worker | peak RSS growth coordinator / worker (MB) "
        "| cached re-ship (s) | bytes sent by the re-ship |",
        "|---|---|---|---|---|---|---|---|---|---|",
        f"| {t['bytes'] / MB:.0f} MB | {t['files']} | {t['hash_s']:.2f} | {t['index_s']:.3f} "
        f"| {t['ship_s']:.2f} | {t['mb_s']:.0f} | {t['coord_cpu_s']:.1f} / "
        f"{t['worker_cpu_s']:.1f} | {t['coord_growth'] / MB:.1f} / "
        f"{t['worker_growth'] / MB:.1f} | {t['cached_s']:.3f} | {t['cached_sent']} |",
    ])


PAUSE_HEAD = [
    "| tree | event | baseline max wait: first token / token gap (s) | pause: max wait around "
    "it (s) | max first token / token gap around it (s) | longest request around it / "
    "baseline median request (s) | event -> re-plan done (s) | tokens served meanwhile "
    "| requests in window | failed | coordinator start (s) |",
    "|---|---|---|---|---|---|---|---|---|---|---|",
]


def pause_rows(label: str, p: dict[str, Any]) -> list[str]:
    s = summarize(p)
    rows = []
    for name in ("join", "loss"):
        e = s[name]
        rows.append(f"| {label} | {name} | {s['base_first']:.2f} / {s['base_gap']:.2f} "
                    f"| {e['pause']:.2f} ({e['kind']}) | {e['first']:.2f} / {e['gap']:.2f} "
                    f"| {e['longest']:.1f} / {s['base_request']:.1f} | {e['replan']:.1f} "
                    f"| {e['tokens']} | {e['requests']} "
                    f"| {len(e['failed'])} | {p['start_s']:.1f} |")
    return rows


def ratios(label: str, p: dict[str, Any], other_label: str, o: dict[str, Any]) -> list[str]:
    s, t = summarize(p), summarize(o)
    lines = []
    for name in ("join", "loss"):
        a, b = s[name], t[name]
        lines.append(f"{name}: pause {label}/{other_label} {a['pause']:.2f}/{b['pause']:.2f} = "
                     f"{a['pause'] / b['pause']:.2f}x; over each baseline "
                     f"{a['pause'] - s['baseline']:+.2f}s vs {b['pause'] - t['baseline']:+.2f}s; "
                     f"re-plan {a['replan']:.1f}s vs {b['replan']:.1f}s")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cache-dir", type=Path, default=None,
                        help="where the model is built (cached_model); default the usual cache")
    parser.add_argument("--model-dir", type=Path, default=None, help="use this model instead")
    parser.add_argument("--layers", type=int, default=16)
    parser.add_argument("--hidden", type=int, default=2048)
    parser.add_argument("--intermediate", type=int, default=5632)
    parser.add_argument("--heads", type=int, default=16)
    parser.add_argument("--kv-heads", type=int, default=8)
    parser.add_argument("--vocab", type=int, default=8192)
    parser.add_argument("--work", type=Path, default=None,
                        help="scratch dir for worker caches (default a temp dir, removed)")
    parser.add_argument("--pause-only", action="store_true", help="skip the transfer part")
    parser.add_argument("--transfer-only", action="store_true", help="skip the pause part")
    parser.add_argument("--label", default="after", help="this tree's name in the tables")
    parser.add_argument("--tokens", type=int, default=8, help="new tokens per request")
    parser.add_argument("--sleep", type=float, default=0.3, help="client sleep between requests")
    parser.add_argument("--warmup", type=int, default=1, help="requests before the baseline")
    parser.add_argument("--baseline", type=int, default=3, help="requests of the baseline")
    parser.add_argument("--after", type=int, default=2, help="requests after each re-plan")
    parser.add_argument("--worker-memory", type=int, default=8, help="GiB each worker offers")
    parser.add_argument("--worker-args", default="",
                        help="extra `worker serve` flags, e.g. --worker-args='--models-dir D'")
    parser.add_argument("--phase-timeout", type=float, default=300.0)
    parser.add_argument("--json", type=Path, default=None, help="write the results here")
    parser.add_argument("--compare", type=Path, nargs="*", default=[],
                        help="other runs' --json: their rows too, and ratios to this run")
    parser.add_argument("--report", action="store_true",
                        help="run nothing: print the tables of the --compare files")
    args = parser.parse_args()
    try:
        from worker.backend import tune_allocator
    except ImportError:  # a tree from before weight shipping (the pause part)
        pass
    else:
        tune_allocator()  # this process ships as `coordinator serve` does: tuned the same way
    others = [json.loads(f.read_text()) for f in args.compare]
    if args.report:
        for o in others:
            if "transfer" in o:
                print(f"{o['label']}:\n" + transfer_table(o["transfer"]))
        runs = [o for o in others if "pause" in o]
        print("\n".join(PAUSE_HEAD + [row for o in runs
                                        for row in pause_rows(o["label"], o["pause"])]))
        befores = [summarize(o["pause"]) for o in runs if o["label"].startswith("before")]
        for o in runs:
            if befores and not o["label"].startswith("before"):
                s = summarize(o["pause"])
                mean = {n: sum(b[n]["pause"] for b in befores) / len(befores)
                        for n in ("join", "loss")}
                print(f"{o['label']} / mean of {len(befores)} before run(s): " + "; ".join(
                    f"{n} pause {s[n]['pause']:.2f}/{mean[n]:.2f} = {s[n]['pause'] / mean[n]:.2f}x"
                    for n in ("join", "loss")))
        return

    import coordinator

    log(f"tree {Path(coordinator.__file__).resolve().parent.parent}, python {sys.executable}")
    spec = ModelSpec(family="llama", num_layers=args.layers, hidden_size=args.hidden,
                     intermediate_size=args.intermediate, num_attention_heads=args.heads,
                     num_key_value_heads=args.kv_heads, vocab_size=args.vocab)
    path = args.model_dir or cached_model(spec, args.cache_dir)
    size = sum(f.stat().st_size for f in path.glob("*.safetensors"))
    shape = (f"llama bf16, {args.layers} layers, hidden {args.hidden}, intermediate "
             f"{args.intermediate}, {args.heads} heads / {args.kv_heads} kv, vocab {args.vocab}"
             if args.model_dir is None else str(path))
    print(f"model {path.name}: {shape}; {size / MB:.0f} MB ({size / GiB:.2f} GiB) of weights")
    work = args.work or Path(tempfile.mkdtemp(prefix="bench-weights-"))
    results: dict[str, Any] = {"label": args.label, "model": str(path), "shape": shape,
                               "bytes": size, "argv": sys.argv}
    try:
        if not args.pause_only:
            results["transfer"] = t = asyncio.run(bench_transfer(path, work))
            print("\n### Transfer on loopback (one worker, empty cache)\n")
            print(transfer_table(t))
            shutil.rmtree(work / "ship-worker", ignore_errors=True)
        if not args.transfer_only:
            results["pause"] = p = asyncio.run(bench_pause(path, work, args))
            print(f"\n### Serving pauses ({args.tokens} new tokens a request, {args.sleep}s "
                  "between)\n")
            rows = [r for o in others for r in pause_rows(o["label"], o["pause"])]
            print("\n".join(PAUSE_HEAD + rows + pause_rows(args.label, p)))
            failed = [r["error"] for r in p["requests"] if r["error"]]
            print(f"\nfailed requests ({args.label}): {failed or 'none'}")
            for o in others:
                print("\n".join(ratios(args.label, p, o["label"], o["pause"])))
    finally:
        if args.json is not None:
            args.json.write_text(json.dumps(results, indent=1))
        if args.work is None:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
