"""Cluster membership over time: wait for workers, health-check them, re-plan on joins.

`Membership.gather` connects the static workers, browses mDNS and waits until `--min-workers`
are usable. `Membership.watch` then keeps the view current while serving: an mDNS goodbye or
expiry, or two failed health checks, marks a worker within seconds. A serving worker that goes,
or a pipeline stream that breaks, breaks the pipeline: the plan's workers are probed and the
model re-planned over those that answer at once, while running requests wait to resume
(coordinator.serving.engine); if they cannot hold it, requests get UNAVAILABLE with the numbers. A
worker that joins never disturbs running requests: it enters the plan at the next re-plan,
which happens only while no request runs or waits (never with `--no-rebalance`).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Sequence
from typing import Any

import grpc

from coordinator.cluster.cluster import SERVING, ClusterError, Worker, dial, wait_all
from coordinator.cluster.discovery import (
    JOINING,
    LEFT,
    LOAD_FAILED,
    RESTARTED,
    UNREACHABLE,
    Browser,
    Member,
    MemberTable,
    ask_info,
    resolve_ips,
)
from coordinator.cluster.planner import PlanError
from protos import inference_pb2
from protos.discovery import ApiAd, WorkerAd, check_cluster_name
from protos.netif import describe, list_interfaces
from protos.units import format_size

log = logging.getLogger("shardline.membership")


class Membership:
    """Who is in the cluster, kept current by mDNS events and health checks."""

    def __init__(self, *, cluster: str = "default", discover: bool = True, min_workers: int = 1,
                 timeout: float | None = None, interface: str | None = None,
                 rebalance: bool = True, progress: Callable[[str], None] = print,
                 health_interval: float = 2.0, settle: float = 1.0,
                 secret: bytes | None = None, worker_wait: float = 0.0) -> None:
        check_cluster_name(cluster)
        if min_workers < 1:
            raise ValueError("--min-workers must be at least 1")
        self.cluster_name = cluster
        self.discover = discover
        self.min_workers = min_workers
        self.timeout = timeout
        self.interface = interface
        self.rebalance = rebalance
        self.progress = progress
        self.health_interval = health_interval
        self.settle = settle
        self.worker_wait = worker_wait  # seconds the static workers may take to answer
        self.secret = secret
        local = [a for i in list_interfaces() for a in i.addresses]
        self.table = MemberTable(cluster, local_ips=local)
        self.browser: Browser | None = None
        self.source: Any = None  # the Coordinator, once serving
        self.changed = asyncio.Event()
        self._last_change = 0.0
        self._tasks: set[asyncio.Task] = set()
        self._loop_task: asyncio.Task | None = None
        self._replanning = False
        self._probing = 0  # probes after a break under way: re-plan once they have answered
        self._refused: set[int] = set()  # ids of worker sets a re-plan already failed on
        self.replans = 0

    # -- events ----------------------------------------------------------------------------
    def _spawn(self, coro: Any) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _changed(self) -> None:
        self._last_change = time.monotonic()
        self.changed.set()
        if self.source is not None:
            self._check_plan()

    def _on_seen(self, name: str, ad: WorkerAd | None, ips: list[str], port: int,
                 error: str, server: str = "") -> None:
        # keyed by instance name and SRV host: workers make their host name unique per
        # process, so two processes claiming one instance name stay apart
        key = f"{name}@{server}" if server else name
        old = self.table.members.get(key)
        member, should_dial = self.table.saw(key, ad, [ip for ip in ips if ip], port, error,
                                             instance=name)
        replaced = old.worker if old is not None and old is not member else None
        if should_dial:
            if replaced is not None and not old.gone:
                member.worker = replaced  # still the plan's worker while it is re-dialled
            self._spawn(self._dial(member, replaced, old is not None and old.gone == LEFT))
        elif replaced is not None:
            self._release(replaced)
        self._changed()

    def _on_gone(self, name: str) -> None:
        claiming = self.table.claiming(name)
        if len(claiming) == 1:
            self.table.left(claiming[0].key, LEFT)
            self._changed()
        elif len(claiming) > 1:  # a shared name: find out who really left
            for member in claiming:
                self._spawn(self._verify(member))

    async def _verify(self, member: Member) -> None:
        await asyncio.sleep(1.5)  # a leaving worker answers during its shutdown grace
        worker = await dial(member.address, timeout=1.5, secret=self.secret)
        if worker is not None:
            await worker.channel.close()
        elif self.table.left(member.key, LEFT) is not None:
            self._changed()

    async def _dial(self, member: Member, replaced: Worker | None = None, left: bool = False
                    ) -> None:
        """Dial a member announced on mDNS; `replaced` is what its previous record held; `left`:
        that record had said goodbye (a late copy of its announcement must not revive it)."""
        refused: list[str] = []
        stopping: list[str] = []
        try:
            for address in member.addresses:
                worker = await dial(address, secret=self.secret, refused=refused,
                                    stopping=stopping)
                if worker is None:
                    continue
                if self.table.members.get(member.key) is not member or member.gone == LEFT:
                    await worker.channel.close()  # superseded while we dialled
                    return
                worker = self._adopt(worker, replaced, member)
                self.table.identified(member, worker)
                if member.reason:
                    self._release(worker)
                    member.worker = None
                self._changed()
                return
            if refused:
                member.reason = refused[0]
                log.warning("leaving out %s: %s", member.label, refused[0])
                self._changed()
            elif not member.gone:
                gone = LEFT if left or stopping else UNREACHABLE
                member.gone, member.gone_since = gone, time.monotonic()
                self._changed()
        finally:
            if replaced is not None and replaced is not member.worker:
                self._release(replaced)

    def _adopt(self, fresh: Worker, replaced: Worker | None, member: Member) -> Worker:
        """The Worker already held for this process (same node id at the same address), with
        the fresh Info, else `fresh`: a re-announcement (a TXT that changed, two processes
        sharing an instance name) must not turn a plan's worker into a stranger and re-plan."""
        held = [replaced] if replaced is not None else []
        if self.source is not None:
            held += self.source.cluster.workers
        held += [m.worker for m in self.table.members.values() if m.worker is not None]
        for w in held:
            if w is not fresh and w.info.id == fresh.info.id and w.address == fresh.address \
                    and all(m.worker is not w or m.gone or m is member
                            for m in self.table.members.values()):
                w.info = fresh.info
                self._spawn(fresh.channel.close())
                return w
        return fresh

    def _release(self, worker: Worker) -> None:
        """Close a worker's channel unless the plan or a present member still uses it."""
        cluster = self.source.cluster if self.source is not None else None
        if cluster is not None and worker in cluster.workers:
            return
        if any(m.worker is worker and not m.gone for m in self.table.members.values()):
            return
        self._spawn(worker.channel.close())

    # -- health checks ---------------------------------------------------------------------
    async def _check(self, member: Member, timeout: float | None = None, misses: int = 2
                     ) -> None:
        """A health check: `misses` failures in a row make the worker unreachable (after a
        pipeline break one quick try is enough)."""
        try:
            info = await ask_info(member.worker,
                                  timeout=timeout or max(self.health_interval, 2.0))
        except grpc.aio.AioRpcError:
            member.failures += 1
            if member.failures >= misses and not member.gone:
                member.gone, member.gone_since = UNREACHABLE, time.monotonic()
                log.warning("worker %s does not answer health checks", member.label)
                self._changed()
            return
        if info.stopping:  # leaving: as if its goodbye had come
            if self.table.left(member.key, LEFT) is not None:
                self._changed()
            return
        member.failures = 0
        member.worker.info = info
        if member.gone == UNREACHABLE:
            member.gone = ""
            self._changed()

    async def _tick(self) -> None:
        checks = []
        for m in list(self.table.members.values()):
            if m.reason or m.alias_of or m.gone == LEFT:
                continue
            if m.worker is not None:
                checks.append(self._check(m))
            elif m.source == "mdns" and m.gone == UNREACHABLE:
                checks.append(self._dial(m))
        for m in self.table.recheck_duplicates():
            checks.append(self._dial(m))
        await asyncio.gather(*checks)
        in_plan = set(map(id, self.source.cluster.workers)) if self.source else set()
        for m in self.table.forget(300.0, keep=lambda m: id(m.worker) in in_plan):
            if m.worker is not None:
                self._release(m.worker)
        if self.source is not None:
            self._check_plan()

    async def _loop(self) -> None:
        while True:
            await asyncio.sleep(self.health_interval)
            try:
                await self._tick()
            except Exception:  # noqa: BLE001 - never let one bad check end the loop
                log.exception("membership check failed")

    # -- startup ---------------------------------------------------------------------------
    async def gather(self, static: Sequence[str]) -> list[Worker]:
        """Connect the static workers, browse, wait for `min_workers`; the usable workers."""
        found = await wait_all(static, self.secret, self.worker_wait, self.progress)
        for address, worker in zip(static, found, strict=True):
            member = self.table.add_static(address, await resolve_ips(address))
            self.table.identified(member, worker)
            if member.reason:
                self.progress(f"  left out {member.label}: {member.reason}")
        if self.discover:
            self.browser = Browser(self._on_seen, self._on_gone, self.interface)
            if not await self.browser.start():
                self.progress("mDNS: no LAN interface found, not browsing (use --workers, or "
                              "--interface NAME)")
                self.browser = None
        self._loop_task = asyncio.get_running_loop().create_task(self._loop())
        if len(self.table.usable()) < self.min_workers:
            await self._wait()
        return [m.worker for m in self.table.usable()]

    def _summary(self) -> str:
        seen = [f"{m.label} ({m.status()})" for m in self.table.members.values()
                if not m.alias_of]
        return "seen: " + ("; ".join(seen) if seen else "none")

    async def _wait(self) -> None:
        need = self.min_workers
        if self.browser is None:
            raise ClusterError(f"{len(self.table.usable())} usable worker(s), --min-workers "
                               f"{need} and no mDNS to find more; {self._summary()}")
        self.progress(f"waiting for {need} worker(s) of cluster {self.cluster_name!r} on mDNS "
                      f"({describe(self.browser.interfaces)})...")
        deadline = None if not self.timeout else time.monotonic() + self.timeout
        told: dict[str, str] = {}
        while True:
            self._tell(told)
            if len(self.table.usable()) >= need:
                break
            remaining = None if deadline is None else deadline - time.monotonic()
            if remaining is not None and remaining <= 0:
                raise ClusterError(f"found {len(self.table.usable())} of {need} workers in "
                                   f"{self.timeout:g}s; {self._summary()}")
            self.changed.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.changed.wait(), remaining)
        await asyncio.sleep(self.settle)  # workers announced in the same moment join this plan
        self._tell(told)

    def _tell(self, told: dict[str, str]) -> None:
        """Print each worker found or left out, once per status."""
        count = len(self.table.usable())
        for m in list(self.table.members.values()):
            status = m.status()
            if m.alias_of or told.get(m.key) == status or status == JOINING:
                continue
            told[m.key] = status
            if m.usable:
                info = m.worker.info
                self.progress(f"  found {info.name} at {m.address}: {info.backend}, "
                              f"{format_size(info.memory_bytes)} [{count}/{self.min_workers}]")
            else:
                self.progress(f"  left out {m.label}: {m.reason or status}")

    # -- serving ---------------------------------------------------------------------------
    async def watch(self, source: Any) -> None:
        """Follow membership while `source` (the Coordinator) serves; announce its API."""
        self.source = source
        source.cluster.extra_states = self.rows
        source.cluster.on_broken = self._on_broken
        if source.cluster.pipeline is not None:
            source.cluster.pipeline.on_broken = self._on_broken
        if self.browser is not None:
            await self.browser.register_api(source.grpc_port, ApiAd(
                cluster=self.cluster_name, http_port=getattr(source, "http_port", 0) or 0,
                model=source.model.model_id))
        self._check_plan()

    def rows(self) -> list[inference_pb2.WorkerState]:
        """GetCluster rows for workers seen but not in the plan."""
        plan = self.source.cluster.workers if self.source is not None else []
        return self.table.rows(exclude=plan)

    def _check_plan(self) -> None:
        """Mark plan workers that went or came back; start a re-plan when one is due.

        Losing a plan worker (gone, unreachable, or back without its shard) breaks the
        pipeline at once, so its requests stop waiting on it and resume after the re-plan."""
        cluster = self.source.cluster
        lost = []
        for w in cluster.workers[: len(cluster.plan.stages) if cluster.plan else 0]:
            m = self.table.member_of(w)
            if m is None or m.gone:
                w.status = m.gone if m is not None and m.gone else LEFT
                lost.append(w.info.name)
            elif w.status in (LEFT, UNREACHABLE):
                # back: still serving if it kept its shard, else it restarted and needs one
                kept = w.info.shard.spec.plan_id == cluster.plan_id
                w.status = SERVING if kept else RESTARTED
                if not kept:
                    lost.append(w.info.name)
            elif w.status == RESTARTED:
                lost.append(w.info.name)
        pipeline = cluster.pipeline
        if lost and pipeline is not None and not pipeline.broken:
            pipeline.fail(f"lost worker {', '.join(lost)} (left, unreachable or restarted)")
        if self.due() and not self._replanning:
            self._replanning = True
            self._spawn(self._replan())

    def _on_broken(self, reason: str) -> None:
        """The pipeline broke (called before its requests hear of it): find out who is still
        there and re-plan over them; requests wait for that (Cluster.recovering)."""
        log.warning("%s; re-planning over the live workers", reason)
        self.source.cluster.recovering = True
        # counted now, not when the probes start: a health check breaks the pipeline from
        # inside _check_plan, which must not then start a re-plan that finds the probes under
        # way, does nothing and ends the recovery while the requests wait for it
        self._probing += 1
        self._spawn(self._after_break())

    async def _after_break(self) -> None:
        """Probe the plan's workers after a break (counted in `_probing` by _on_broken), then
        re-plan over those that answered."""
        cluster = self.source.cluster
        try:
            plan = cluster.workers[: len(cluster.plan.stages) if cluster.plan else 0]
            members = [m for w in plan if (m := self.table.member_of(w)) is not None]
            await asyncio.gather(*(self._check(m, timeout=1.5, misses=1)
                                   for m in members if not m.gone))
        finally:
            self._probing -= 1
        try:
            self._check_plan()
        finally:
            self._end_recovery()

    def _end_recovery(self) -> None:
        """Requests stop waiting for a recovery once no probe or re-plan is under way."""
        if not self._probing and not self._replanning:
            self.source.cluster.recovering = False

    def due(self) -> str:
        """Why a re-plan is due ("worker_lost": the pipeline is broken; "worker_joined"), or
        "" (none, or the last re-plan over these same workers failed): what the membership
        loop acts on, exposed so that a caller can see that no re-plan is coming."""
        if self.source.engine is None or self._probing:
            return ""
        cluster = self.source.cluster
        usable = [m.worker for m in self.table.usable()]
        if not usable or frozenset(map(id, usable)) in self._refused:
            return ""
        if cluster.pipeline is not None and cluster.pipeline.broken:
            return "worker_lost"
        joined = [w for w in usable if w not in cluster.workers or w.status == RESTARTED]
        return "worker_joined" if joined and self.rebalance else ""

    async def _replan(self) -> None:
        cluster = self.source.cluster
        try:
            while why := self.due():
                if why == "worker_lost":
                    # nothing can run on a broken pipeline: re-plan now; the requests that
                    # were running wait for it and then resume
                    cluster.recovering = True
                    await self._reload(why)
                    continue
                if time.monotonic() - self._last_change >= self.settle:
                    # the old pipeline serves while the new shards load; its requests then
                    # resume on the new plan
                    await self._reload(why)
                    continue
                await asyncio.sleep(0.2)
        finally:
            self._replanning = False
            self._end_recovery()

    async def _reload(self, why: str) -> None:
        """Plan over the usable workers (plan order kept, joiners last) and load the shards;
        a failure is remembered for this set of workers (`due` skips it until it changes)."""
        cluster, engine = self.source.cluster, self.source.engine
        for attempt in range(2):
            usable = [m.worker for m in self.table.usable()]
            workers = [w for w in cluster.workers if w in usable]
            workers += [w for w in usable if w not in workers]
            old_workers, old_plan = cluster.workers, cluster.plan
            cluster.workers = workers
            try:
                plan = cluster.make_plan()
            except PlanError as e:
                cluster.workers, cluster.plan = old_workers, old_plan
                self._refused.add(frozenset(map(id, usable)))
                self.progress(f"not re-planning over {len(workers)} worker(s): {e}")
                if cluster.pipeline is not None and cluster.pipeline.broken:
                    cluster.pipeline.broken = f"the live workers cannot hold the model: {e}"
                return
            self.progress(f"re-planning over {len(workers)} worker(s):\n{plan.describe()}")

            def switched() -> None:
                if engine.prefix is not None:
                    engine.prefix.clear()  # cached sequences live on the old shards

            try:
                await cluster.load(self.progress, keep_serving=why == "worker_joined",
                                   switched=switched)
            except ClusterError as e:
                self.progress(f"re-plan failed: {e}")
                for w in workers:
                    m = self.table.member_of(w)
                    if w.status == "failed" and m is not None and m.gone != LEFT:
                        m.reason = LOAD_FAILED
                if cluster.pipeline is not None:
                    cluster.pipeline.fail(f"re-plan failed: {e}")  # its shards are gone
                if attempt == 0 and len(self.table.usable()) >= 1:
                    continue
                self._refused.add(frozenset(map(id, self.table.usable())))
                return
            self.replans += 1
            if (metrics := getattr(self.source, "metrics", None)) is not None:
                metrics.replans.labels(why).inc()
            for w in old_workers:
                if w not in workers and self.table.member_of(w) is None:
                    await w.channel.close()
            self.progress(f"serving on {len(plan.stages)} worker(s) after the re-plan")
            return

    async def close(self) -> None:
        if self.source is not None:  # shutting down: workers stopping now is no failure
            cluster = self.source.cluster
            cluster.on_broken = None
            if cluster.pipeline is not None:
                cluster.pipeline.on_broken = None
        if self._loop_task is not None:
            self._loop_task.cancel()
        for task in list(self._tasks):
            task.cancel()
        if self.browser is not None:
            await self.browser.close()
        plan = self.source.cluster.workers if self.source is not None else []
        for m in self.table.members.values():
            if m.worker is not None and m.worker not in plan:
                await m.worker.channel.close()
