"""Hosts for lab tests: network namespaces on a bridge, links to cut and shape; `need` for tools."""

from __future__ import annotations

import os
import random
import re
import secrets
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from conftest import CI, ROOT, need  # noqa: F401 - used from here too (lab tests, the soak)


def is_root() -> bool:
    return hasattr(os, "geteuid") and os.geteuid() == 0


def need_lab(*tools: str) -> None:
    """Root and iproute2 (`ip`), plus `tools` (such as `tc`), or skip / fail under CI."""
    need(is_root(), "the lab builds network namespaces, which needs root")
    for tool in ("ip", *tools):
        need(shutil.which(tool), f"needs `{tool}` (iproute2)")


def sh(*cmd: str, check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, capture_output=True, text=True, check=check, timeout=30)


class Lab:
    """Namespaces `h1..hN` on one bridge, with a unique name and a random 10.x/24 subnet."""

    def __init__(self, hosts: int, workdir: Path) -> None:
        tag = secrets.token_hex(2)
        self.prefix = f"sl{tag}"
        self.bridge = f"{self.prefix}br"
        self.subnet = f"10.{random.randint(100, 250)}.{random.randint(0, 255)}"
        self.hosts = [f"{self.prefix}h{i}" for i in range(1, hosts + 1)]
        self.workdir = workdir
        self.procs: list[tuple[subprocess.Popen, Path]] = []

    def ip(self, host: int) -> str:
        return f"{self.subnet}.{host}"

    def veth(self, host: int) -> str:
        """The bridge's end of host `host`'s link (its other end is `eth0` in the host)."""
        return f"{self.prefix}v{host}"

    def build(self) -> None:
        sh("ip", "link", "add", self.bridge, "type", "bridge")
        sh("ip", "link", "set", self.bridge, "up")
        for i, ns in enumerate(self.hosts, 1):
            sh("ip", "netns", "add", ns)
            sh("ip", "link", "add", self.veth(i), "type", "veth", "peer", "name", "eth0",
               "netns", ns)
            sh("ip", "link", "set", self.veth(i), "master", self.bridge, "up")
            sh("ip", "-n", ns, "addr", "add", f"{self.ip(i)}/24", "dev", "eth0")
            sh("ip", "-n", ns, "link", "set", "eth0", "up")
            sh("ip", "-n", ns, "link", "set", "lo", "up")

    # -- faults ----------------------------------------------------------------------------
    def cut(self, host: int) -> None:
        """Pull host `host`'s cable: its link goes down on the bridge's side, so nothing gets
        through either way, while the host keeps its address and its sockets (no reset)."""
        sh("ip", "link", "set", self.veth(host), "down")

    def mend(self, host: int) -> None:
        """Plug the cable back in (the bridge forwards on the port again at once: no STP)."""
        sh("ip", "link", "set", self.veth(host), "up")

    def shape(self, host: int, *, delay_ms: int = 20, loss_pct: float = 5.0,
              rate: str = "1mbit") -> str:
        """Make host `host`'s link slow and lossy both ways; returns what was applied.

        With netem in the kernel: `netem delay D loss L rate R`. Without it: a token bucket
        (`tbf rate R`: slow) and a random drop of L% of the packets (classic BPF on clsact),
        as `delay` has no other qdisc here."""
        ends = [("ip", "netns", "exec", self.hosts[host - 1], "tc"), ("tc",)]
        devs = ["eth0", self.veth(host)]
        netem = f"delay {delay_ms}ms loss {loss_pct:g}% rate {rate}"
        done = [sh(*tc, "qdisc", "add", "dev", dev, "root", "netem", *netem.split(),
                   check=False) for tc, dev in zip(ends, devs, strict=True)]
        if all(p.returncode == 0 for p in done):
            return f"netem {netem}"
        self.unshape(host)
        # A >= threshold: drop (TC_ACT_SHOT, 2); else pass (TC_ACT_OK, 0). `ld rand` is
        # the ancillary load at SKF_AD_OFF + SKF_AD_RANDOM (-0x1000 + 56).
        threshold = min(2**32 - 1, int((1 - loss_pct / 100) * 2**32))
        drop = f"4,32 0 0 {2**32 - 0x1000 + 56},53 0 1 {threshold},6 0 0 2,6 0 0 0"
        for tc, dev in zip(ends, devs, strict=True):
            sh(*tc, "qdisc", "add", "dev", dev, "root", "tbf", "rate", rate, "burst", "4kb",
               "latency", "500ms")
            sh(*tc, "qdisc", "add", "dev", dev, "clsact")
            sh(*tc, "filter", "add", "dev", dev, "egress", "bpf", "da", "bytecode", drop)
        return f"tbf rate {rate} and a random {loss_pct:g}% drop (no netem in this kernel)"

    def unshape(self, host: int) -> None:
        """Take every shaping off host `host`'s link."""
        for tc, dev in ((("ip", "netns", "exec", self.hosts[host - 1], "tc"), "eth0"),
                        (("tc",), self.veth(host))):
            sh(*tc, "qdisc", "del", "dev", dev, "root", check=False)
            sh(*tc, "qdisc", "del", "dev", dev, "clsact", check=False)

    def dropped(self, host: int) -> int:
        """Packets the shaping of host `host`'s link has dropped so far, both ways."""
        total = 0
        for tc, dev in ((("ip", "netns", "exec", self.hosts[host - 1], "tc"), "eth0"),
                        (("tc",), self.veth(host))):
            out = sh(*tc, "-s", "qdisc", "show", "dev", dev, check=False).stdout
            total += sum(int(n) for n in re.findall(r"dropped (\d+)", out))
        return total

    # -- processes -------------------------------------------------------------------------
    def start(self, host: int, name: str, *args: str) -> subprocess.Popen:
        """Run `python -m ARGS` on host `host`; output goes to a log file named `name`."""
        log = self.workdir / f"{name}.log"
        with open(log, "wb") as out:
            proc = subprocess.Popen(
                ["ip", "netns", "exec", self.hosts[host - 1], sys.executable, "-m", *args],
                cwd=ROOT, stdout=out, stderr=subprocess.STDOUT)
        self.procs.append((proc, log))
        return proc

    def run(self, host: int, *args: str, timeout: float = 60) -> subprocess.CompletedProcess:
        return subprocess.run(["ip", "netns", "exec", self.hosts[host - 1], sys.executable,
                               *args], cwd=ROOT, capture_output=True, text=True,
                              timeout=timeout)

    def logs(self) -> str:
        return "\n".join(f"--- {log.name}\n{log.read_text(errors='replace')[-3000:]}"
                         for _, log in self.procs if log.exists())

    def teardown(self) -> None:
        for proc, _ in self.procs:
            if proc.poll() is None:
                proc.terminate()
        for proc, _ in self.procs:
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        for ns in self.hosts:
            pids = sh("ip", "netns", "pids", ns, check=False).stdout.split()
            for pid in pids:  # anything still in our namespaces was started by this test
                try:
                    os.kill(int(pid), signal.SIGKILL)
                except (ProcessLookupError, ValueError):
                    pass
            sh("ip", "netns", "del", ns, check=False)
        sh("ip", "link", "del", self.bridge, check=False)
        deadline = time.monotonic() + 10  # veth peers go away asynchronously with their netns
        while self.prefix in sh("ip", "-o", "link", "show", check=False).stdout and \
                time.monotonic() < deadline:
            time.sleep(0.1)
        for i in range(1, len(self.hosts) + 1):
            if self.veth(i) in sh("ip", "-o", "link", "show", check=False).stdout:
                sh("ip", "link", "del", self.veth(i), check=False)


@contextmanager
def built(hosts: int, workdir: Path, *tools: str) -> Iterator[Lab]:
    """A lab of `hosts` hosts for one test (skipped, or failed under CI, where it cannot be
    built), torn down after it with nothing of it left behind."""
    need_lab(*tools)
    lab = Lab(hosts, workdir)
    try:
        try:
            lab.build()
        except subprocess.CalledProcessError as e:
            need(False, f"cannot build network namespaces here: {e.stderr.strip()}")
        yield lab
    finally:
        lab.teardown()
    leftover = sh("ip", "-o", "link", "show", check=False).stdout
    assert lab.prefix not in leftover and not any(
        ns in sh("ip", "netns", "list", check=False).stdout for ns in lab.hosts)
