"""Soak: hours-shaped load on a lab cluster with a worker killed, one paused and a link cut.

Four workers and a coordinator on network-namespace hosts of the lab (`tests/lab.py`, needs root
and iproute2), `--streams` concurrent client loops against the coordinator's gRPC API for
`--minutes`. Along the way (at fixed fractions of the run):

- 15%: worker w2 killed with SIGKILL; 20%: started again (as its service manager would);
- 40%: worker w3 paused with SIGSTOP for `--pause` seconds (past the failure timeout), then
  SIGCONT;
- 65%: worker w4's link cut for `--cut` seconds, then mended.

Every request is one of 8 fixed ones (greedy or seeded sampling), whose fault-free output is
taken at the start; each answer is compared with it. Prints per minute the tokens/s, ITL p99,
request latency p99 and the resident memory of the coordinator and the workers, then the count
of requests lost (an error) and of answers that differ from the fault-free run.

    sudo python bench/bench_soak.py --minutes 10
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

# Runs in the coordinator's namespace: the reference pass, then the client loops; one JSON line
# per finished request.
LOAD = r"""
import asyncio, json, sys, time
import grpc
from protos import inference_pb2, inference_pb2_grpc
address, streams, new, until = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), float(sys.argv[4])
PROMPTS = [[(7 * i + 13 * j) % 480 + 10 for j in range(6 + 3 * i)] for i in range(8)]

def request(k):
    sampling = dict(max_tokens=new)
    if k % 2:
        sampling.update(temperature=0.8, top_p=0.95, seed=100 + k)
    return inference_pb2.GenerateRequest(prompt_token_ids=PROMPTS[k],
                                         sampling=inference_pb2.SamplingParams(**sampling))

async def one(stub, k):
    t0, times, tokens = time.time(), [], []
    try:
        async for m in stub.Generate(request(k), timeout=180):
            if m.token_ids:
                times.append(time.time())
                tokens += list(m.token_ids)
        return dict(k=k, ok=True, t0=t0, t=time.time(), tokens=tokens,
                    itl=[b - a for a, b in zip(times, times[1:])])
    except grpc.aio.AioRpcError as e:
        return dict(k=k, ok=False, t0=t0, t=time.time(), code=e.code().name,
                    details=e.details(), tokens=tokens, itl=[])

async def main():
    async with grpc.aio.insecure_channel(address) as channel:
        stub = inference_pb2_grpc.InferenceStub(channel)
        refs = {}
        for k in range(8):
            r = await one(stub, k)
            assert r["ok"], r
            refs[k] = r["tokens"]
        print(json.dumps({"ready": time.time()}), flush=True)
        deadline = time.time() + until

        async def loop(s):
            n = s
            while time.time() < deadline:
                r = await one(stub, n % 8)
                r["same"] = r["tokens"] == refs[n % 8]
                print(json.dumps(r), flush=True)
                n += streams
        await asyncio.gather(*(loop(s) for s in range(streams)))

asyncio.run(main())
"""


def rss_mib(pid: int) -> float:
    """Resident memory of process `pid` in MiB (0 when it is gone: killed, not yet back)."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return 0.0


def p99(values: list[float]) -> float:
    if not values:
        return float("nan")
    values = sorted(values)
    return values[min(len(values) - 1, int(0.99 * len(values)))]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--minutes", type=float, default=10.0)
    ap.add_argument("--streams", type=int, default=8)
    ap.add_argument("--new", type=int, default=48, help="tokens per request")
    ap.add_argument("--pause", type=float, default=20.0, help="seconds w3 stays stopped")
    ap.add_argument("--cut", type=float, default=5.0, help="seconds w4's link is down")
    args = ap.parse_args()
    if os.geteuid() != 0:
        sys.exit("the soak runs on lab hosts (network namespaces): run it as root")

    from lab import Lab

    from coordinator.demo import ModelSpec, cached_model

    work = Path(tempfile.mkdtemp(prefix="shardline-soak-"))
    model = cached_model(ModelSpec(family="llama"), Path(os.environ.get(
        "SHARDLINE_CACHE_DIR", ROOT / ".pytest_cache" / "shardline")))
    lab = Lab(5, work)
    pids: dict[str, int] = {}

    def worker(i: int) -> None:
        proc = lab.start(i, f"w{i}", "worker", "serve", "--port", "50061", "--name", f"w{i}",
                         "--memory", "1GiB", "--cache-dir", str(work / f"w{i}"),
                         "--no-advertise")
        pids[f"w{i}"] = proc.pid

    try:
        lab.build()
        for i in (1, 2, 3, 4):
            worker(i)
        coordinator = lab.start(
            5, "coordinator", "coordinator", "serve", "--model", str(model), "--no-discover",
            "--workers", ",".join(f"{lab.ip(i)}:50061" for i in (1, 2, 3, 4)),
            "--grpc-port", "50051", "--http-port", "8080", "--context", "256",
            "--max-sequences", str(args.streams))
        pids["coordinator"] = coordinator.pid
        log = lab.procs[-1][1]
        deadline = time.monotonic() + 120
        while "ready" not in log.read_text():
            if coordinator.poll() is not None or time.monotonic() > deadline:
                sys.exit("the coordinator did not get ready:\n" + lab.logs())
            time.sleep(0.2)
        seconds = args.minutes * 60
        out = work / "load.jsonl"
        with open(out, "wb") as f:
            load = subprocess.Popen(
                ["ip", "netns", "exec", lab.hosts[4], sys.executable, "-c", LOAD,
                 "127.0.0.1:50051", str(args.streams), str(args.new), str(seconds)],
                cwd=ROOT, stdout=f, stderr=subprocess.STDOUT)
        while "ready" not in out.read_text():
            if load.poll() is not None:
                sys.exit("the load generator stopped:\n" + out.read_text() + lab.logs())
            time.sleep(0.2)
        start = json.loads(out.read_text().splitlines()[0])["ready"]
        print(f"fault-free references taken; {args.streams} streams for {args.minutes} min")
        events = [(0.15, "kill w2", lambda: os.kill(pids["w2"], signal.SIGKILL)),
                  (0.20, "restart w2", lambda: worker(2)),
                  (0.40, "pause w3", lambda: os.kill(pids["w3"], signal.SIGSTOP)),
                  (0.40 + args.pause / seconds, "wake w3",
                   lambda: os.kill(pids["w3"], signal.SIGCONT)),
                  (0.65, "cut w4", lambda: lab.cut(4)),
                  (0.65 + args.cut / seconds, "mend w4", lambda: lab.mend(4))]
        happened: list[tuple[float, str]] = []
        memory: list[tuple[float, float, float]] = []  # (t, coordinator MiB, workers MiB)
        next_sample = time.time()
        while load.poll() is None:
            now = time.time()
            while events and now - start >= events[0][0] * seconds:
                _, what, act = events.pop(0)
                act()
                happened.append((now - start, what))
                print(f"{now - start:7.1f}s  {what}", flush=True)
            if now >= next_sample:
                memory.append((now - start, rss_mib(pids["coordinator"]),
                               sum(rss_mib(pids[f"w{i}"]) for i in (1, 2, 3, 4))))
                next_sample = now + 10
            time.sleep(0.1)
        report(args, out, start, happened, memory)
    finally:
        for pid in pids.values():  # a stopped worker would not hear SIGTERM
            try:
                os.kill(pid, signal.SIGCONT)
            except ProcessLookupError:
                pass
        lab.teardown()


def report(args: argparse.Namespace, out: Path, start: float, happened: list,
           memory: list) -> None:
    rows = [json.loads(line) for line in out.read_text().splitlines()[1:]
            if line.startswith("{")]
    minutes = int(-(-args.minutes // 1))
    print("\n| minute | requests | tokens/s | ITL p99 ms | latency p99 s | coordinator MiB "
          "| workers MiB | faults |")
    print("|---|---|---|---|---|---|---|---|")
    for m in range(minutes):
        lo, hi = start + 60 * m, start + 60 * (m + 1)
        done = [r for r in rows if lo <= r["t"] < hi]
        tokens = sum(len(r["tokens"]) for r in done if r["ok"])
        itl = [x for r in done for x in r["itl"]]
        mem = [(c, w) for t, c, w in memory if 60 * m <= t < 60 * (m + 1)]
        faults = ", ".join(w for t, w in happened if 60 * m <= t < 60 * (m + 1))
        print(f"| {m + 1} | {len(done)} | {tokens / 60:.1f} | {1000 * p99(itl):.1f} | "
              f"{p99([r['t'] - r['t0'] for r in done]):.2f} | "
              f"{max((c for c, _ in mem), default=float('nan')):.0f} | "
              f"{max((w for _, w in mem), default=float('nan')):.0f} | {faults} |")
    lost = [r for r in rows if not r["ok"]]
    differ = [r for r in rows if r["ok"] and not r["same"]]
    print(f"\nrequests: {len(rows)}, lost: {len(lost)}, differing from the fault-free run: "
          f"{len(differ)}")
    for r in lost[:5]:
        print(f"  lost: request {r['k']} after {len(r['tokens'])} tokens: {r['code']} "
              f"{r['details']}")


if __name__ == "__main__":
    main()
