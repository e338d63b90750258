"""Re-plans in a row under load: a worker killed and restarted again and again, on loopback.

Four workers and a coordinator on 127.0.0.1 (no root, no lab), the soak's 8 client loops
(bench/bench_soak.py: 8 fixed requests, greedy and seeded, each compared with its fault-free
output). Every `--every` seconds worker w3 is killed (SIGKILL: a loss re-plan, its requests
resume) and restarted half-way (a join re-plan while the old plan drains). Prints the requests
lost and those differing from the fault-free run, with where each differing one started.

    python bench/bench_replans.py --cycles 8
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "bench")]

from bench_soak import LOAD  # noqa: E402 - after the path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cycles", type=int, default=8)
    ap.add_argument("--every", type=float, default=14.0, help="seconds between kills")
    ap.add_argument("--base-port", type=int, default=51060)
    ap.add_argument("--coordinator-arg", action="append", default=[],
                    help="passed to `coordinator serve` (e.g. --prefix-cache-tokens=0)")
    args = ap.parse_args()

    from coordinator.demo import ModelSpec, cached_model

    work = Path(tempfile.mkdtemp(prefix="shardline-replans-"))
    model = cached_model(ModelSpec(family="llama"), ROOT / ".pytest_cache" / "shardline")
    ports = [args.base_port + 1 + i for i in range(4)]
    procs: dict[str, subprocess.Popen] = {}

    def start(name: str, *cmd: str) -> subprocess.Popen:
        with open(work / f"{name}.log", "ab") as log:
            procs[name] = subprocess.Popen([sys.executable, "-m", *cmd], cwd=ROOT, stdout=log,
                                           stderr=subprocess.STDOUT)
        return procs[name]

    def worker(i: int) -> None:
        start(f"w{i}", "worker", "serve", "--host", "127.0.0.1", "--port", str(ports[i]),
              "--name", f"w{i}", "--memory", "1GiB", "--cache-dir", str(work / f"w{i}"),
              "--no-advertise")

    def wait_for(path: Path, word: str) -> None:
        while word not in path.read_text(errors="replace"):
            time.sleep(0.2)

    events: list[tuple[float, str]] = []
    try:
        for i in range(4):
            worker(i)
        start("coordinator", "coordinator", "serve", "--model", str(model), "--no-discover",
              "--workers", ",".join(f"127.0.0.1:{p}" for p in ports), "--worker-wait", "30",
              "--host", "127.0.0.1", "--grpc-port", str(args.base_port), "--http-port", "0",
              "--context", "256", "--max-sequences", "8", *args.coordinator_arg)
        wait_for(work / "coordinator.log", "ready")
        out = work / "load.jsonl"
        with open(out, "wb") as f:
            load = subprocess.Popen([sys.executable, "-c", LOAD, f"127.0.0.1:{args.base_port}",
                                     "8", "48", str(args.cycles * args.every + 5)],
                                    cwd=ROOT, stdout=f, stderr=subprocess.STDOUT)
        wait_for(out, "ready")
        for _ in range(args.cycles):
            time.sleep(args.every * 0.3)
            procs["w3"].kill()
            events.append((time.time(), "kill"))
            time.sleep(args.every * 0.4)
            worker(3)
            events.append((time.time(), "restart"))
            time.sleep(args.every * 0.3)
        load.wait()
    finally:
        for proc in procs.values():
            if proc.poll() is None:
                proc.terminate()
    rows = [json.loads(line) for line in out.read_text().splitlines()[1:]
            if line.startswith("{")]
    lost = [r for r in rows if not r["ok"]]
    differ = [r for r in rows if r["ok"] and not r["same"]]
    print(f"requests: {len(rows)}, lost: {len(lost)}, differing from the fault-free run: "
          f"{len(differ)} ({work})")
    for r in lost[:5]:
        print(f"  lost: request {r['k']}: {r['code']} {r['details']}")
    for r in differ:
        when, what = min(events, key=lambda e: abs(e[0] - r["t0"]))
        print(f"  differs: request {r['k']}, started {r['t0'] - when:+.1f}s from a {what}")


if __name__ == "__main__":
    main()
