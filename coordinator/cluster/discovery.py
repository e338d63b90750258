"""Workers seen on mDNS or given with --workers: which are usable, and why others are left out.

`MemberTable` is the bookkeeping (no I/O, unit-tested): every worker seen, keyed by its mDNS
instance name or its static address, with the reason it is left out (other cluster, other wire
version, duplicate node id, unreachable) or gone (goodbye/expiry, failed health checks).
`Browser` feeds it from python-zeroconf's asyncio API and announces the coordinator's API.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import socket
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

from coordinator.cluster.cluster import Worker
from protos import API_SERVICE_TYPE, WIRE_VERSION, WORKER_SERVICE_TYPE, inference_pb2, worker_pb2
from protos.discovery import (
    ApiAd,
    TxtError,
    WorkerAd,
    close_zeroconf,
    decode_worker_txt,
    encode_api_txt,
    instance_label,
    instance_name,
)
from protos.netif import Interface, list_interfaces, select_interfaces, zeroconf_interfaces

log = logging.getLogger("shardline.discovery")

# Membership states (set by coordinator.cluster.membership; shown by GetCluster, counted by
# metrics).
# A worker seen but not in the plan is `joining` (announced, not dialled yet), `standby`
# (usable, waiting for the next re-plan), `excluded` (left out, with a reason), or gone: `left`
# (mDNS goodbye or expiry) or `unreachable` (failed health checks). A plan worker gone is `left`
# or `unreachable` too, and `restarted` when it came back without its shard; otherwise it has
# one of coordinator.cluster.cluster.WORKER_STATES.
JOINING, STANDBY, EXCLUDED = "joining", "standby", "excluded"
LEFT, UNREACHABLE, RESTARTED = "left", "unreachable", "restarted"
# why a worker is left out after a re-plan could not load its shard (its goodbye clears it)
LOAD_FAILED = "could not load its shard"
GONE_STATES = (LEFT, UNREACHABLE)
MEMBER_STATES = (JOINING, STANDBY, EXCLUDED, LEFT, UNREACHABLE)


def split_address(address: str) -> tuple[str, int]:
    """`host:port` or `[v6]:port` -> (host, port); ValueError if there is no port."""
    host, sep, port = address.rpartition(":")
    if not sep or not port.isdigit():
        raise ValueError(f"worker address {address!r} needs a port (HOST:PORT)")
    return host.strip("[]"), int(port)


def join_address(ip: str, port: int) -> str:
    """`10.0.0.2:50061`, or `[fe80::1%eth0]:50061` for IPv6."""
    return f"[{ip}]:{port}" if ":" in ip else f"{ip}:{port}"


def order_addresses(addresses: Iterable[str]) -> list[str]:
    """Dial order: IPv4, then global IPv6, then link-local IPv6 (which needs its %scope)."""
    def rank(a: str) -> int:
        try:
            ip = ipaddress.ip_address(a.split("%")[0])
        except ValueError:
            return 3
        return 0 if ip.version == 4 else 2 if ip.is_link_local else 1
    return sorted(dict.fromkeys(addresses), key=rank)


def exclusion(cluster: str, api: int, want_cluster: str, want_api: int = WIRE_VERSION) -> str:
    """Why a worker of `cluster`/`api` is left out by a coordinator of `want_*`; '' if kept."""
    if cluster != want_cluster:
        return f"other cluster {cluster!r}"
    if api != want_api:
        return f"other wire version {api} (ours {want_api})"
    return ""


@dataclass
class Member:
    """One worker as seen: from mDNS (`key` = instance name) or static (`key` = `static:ADDR`)."""

    key: str  # instance name, plus `@server` for mDNS (unique per worker process)
    name: str
    address: str  # host:port dialled (the first of `addresses` that answered)
    source: str  # "mdns" | "static"
    addresses: tuple[str, ...] = ()  # every host:port it may be reached at
    ips: tuple[str, ...] = ()
    port: int = 0
    ad: WorkerAd | None = None
    worker: Worker | None = None
    reason: str = ""  # why it is left out; "" = may be used
    gone: str = ""  # LEFT (goodbye or expiry) | UNREACHABLE | "" (present)
    gone_since: float = 0.0
    instance: str = ""  # mDNS instance name (two processes may claim the same one)
    alias_of: str = ""  # key of the member that is the same worker seen another way
    dup_of: str = ""  # key of the member whose node id this one repeats
    failures: int = 0

    @property
    def node_id(self) -> str:
        return self.worker.info.id if self.worker else self.ad.id if self.ad else ""

    @property
    def usable(self) -> bool:
        return self.worker is not None and not (self.reason or self.gone or self.alias_of)

    @property
    def label(self) -> str:
        return f"{self.name} at {self.address}"

    @property
    def state_name(self) -> str:
        """One of MEMBER_STATES (`status()` without the reason)."""
        if self.reason:
            return EXCLUDED
        if self.gone:
            return self.gone
        return STANDBY if self.worker else JOINING

    def status(self) -> str:
        return f"{EXCLUDED}: {self.reason}" if self.reason else self.state_name

    def state(self) -> inference_pb2.WorkerState:
        """A row for GetCluster (layers empty: it is not in the plan)."""
        info = self.worker.info if self.worker else None
        return inference_pb2.WorkerState(
            id=self.node_id, name=info.name if info else self.name, address=self.address,
            memory_bytes=info.memory_bytes if info else self.ad.memory_bytes if self.ad else 0,
            backend=info.backend if info else self.ad.backend if self.ad else "",
            status=self.status(),
        )


class MemberTable:
    """Everyone seen, merged across mDNS and static lists, with duplicates refused."""

    def __init__(self, cluster: str, wire: int = WIRE_VERSION,
                 local_ips: Iterable[str] = ()) -> None:
        self.cluster = cluster
        self.wire = wire
        self.local_ips = tuple(local_ips)  # this machine's addresses: what 127.0.0.1 also is
        self.members: dict[str, Member] = {}

    def _ips(self, ips: Iterable[str]) -> tuple[str, ...]:
        out = [ip.split("%")[0] for ip in ips]
        if any(_is_loopback(ip) for ip in out):
            out += self.local_ips
        return tuple(dict.fromkeys(out))

    def add_static(self, address: str, ips: Iterable[str] = ()) -> Member:
        """A `--workers` entry; `ips` are what its host name resolves to."""
        host, port = split_address(address)
        member = Member(key=f"static:{address}", name=address, address=address,
                        source="static", addresses=(address,), port=port,
                        ips=self._ips(list(ips) or [host]))
        return self.members.setdefault(member.key, member)

    def saw(self, key: str, ad: WorkerAd | None, ips: Iterable[str], port: int,
            error: str = "", instance: str = "") -> tuple[Member, bool]:
        """An mDNS announcement (new or updated); returns (member, whether to dial it).

        `key` tells worker processes apart (instance name and SRV host); `instance` is the
        instance name alone (default: `key`)."""
        ordered = order_addresses(ips)
        addresses = tuple(join_address(ip, port) for ip in ordered)
        old = self.members.get(key)
        member = Member(key=key, name=instance_label(instance or key), address=addresses[0]
                        if addresses else "?", source="mdns", addresses=addresses, port=port,
                        ips=self._ips(ordered), ad=ad, instance=instance or key)
        if old is not None and not old.gone and old.worker is not None and \
                old.port == port and old.address in addresses and old.ad == ad:
            return old, False  # a repeat announcement of what we already use
        self.members[key] = member
        if error:
            member.reason = error
        elif ad is not None:
            member.reason = exclusion(ad.cluster, ad.api, self.cluster, self.wire)
        if not member.reason and ad is not None:
            self._check_id(member, ad.id)
        return member, not (member.reason or member.alias_of or not addresses)

    def identified(self, member: Member, worker: Worker) -> Member:
        """The worker answered Info: check what it says (authoritative over TXT)."""
        member.worker = worker
        member.name = worker.info.name or member.name
        member.address = worker.address
        member.gone, member.failures = "", 0
        member.reason = exclusion(worker.info.cluster, worker.info.api, self.cluster, self.wire)
        if not member.reason:
            self._check_id(member, worker.info.id)
        return member

    def _check_id(self, member: Member, node_id: str) -> None:
        """Same id elsewhere: the same worker seen twice (alias), or a duplicate (refused)."""
        member.alias_of = member.dup_of = ""
        for other in self.members.values():
            if other is member or other.gone or other.reason or other.alias_of or \
                    other.node_id != node_id:
                continue
            if other.port == member.port and set(other.ips) & set(member.ips):
                member.alias_of = other.key
                return
            member.dup_of = other.key
            member.reason = f"duplicate node id {node_id} (already used by {other.label})"
            log.warning("refusing worker %s: its node id %s is already used by %s; was a cache "
                        "dir copied? delete the id file on one of them and restart it",
                        member.label, node_id, other.label)
            return

    def left(self, key: str, why: str = LEFT) -> Member | None:
        """mDNS goodbye or expiry (`why`=LEFT), or failed health checks (UNREACHABLE).

        A goodbye after failed checks says more (a stopping worker's streams often break
        before its goodbye arrives): the member becomes LEFT, gone since the first sign."""
        member = self.members.get(key)
        if member is None:
            return None
        since = member.gone_since if member.gone else time.monotonic()
        for m in (member, *(a for a in self.members.values() if a.alias_of == key)):
            if not m.gone or (why == LEFT and m.gone == UNREACHABLE):
                m.gone, m.gone_since = why, since
            if why == LEFT and m.reason == LOAD_FAILED:
                m.reason = ""  # it was stopping: the load failed because it left
        return member

    def recheck_duplicates(self) -> list[Member]:
        """Duplicates and aliases whose original has gone (a worker restarted at the same
        address without a goodbye, say): judged again; returned if they may be dialled now."""
        freed = []
        for member in self.members.values():
            original = self.members.get(member.dup_of or member.alias_of)
            if (member.dup_of or member.alias_of) and not member.gone and \
                    (original is None or original.gone):
                member.reason = member.dup_of = member.alias_of = ""
                self._check_id(member, member.node_id)
                if not (member.reason or member.alias_of or member.worker):
                    freed.append(member)
        return freed

    def claiming(self, instance: str) -> list[Member]:
        """Members announced under this mDNS instance name that have not said goodbye
        (normally one): present, or unreachable since (a stopping worker's streams often
        break, and a check fails, before its goodbye arrives)."""
        return [m for m in self.members.values() if m.instance == instance and m.gone != LEFT]

    def forget(self, older_than: float, keep: Callable[[Member], bool] = lambda m: False
               ) -> list[Member]:
        """Drop members gone for `older_than` seconds (except those `keep` says); returns them."""
        now = time.monotonic()
        dropped = [m for m in self.members.values()
                   if m.gone and now - m.gone_since > older_than and not keep(m)]
        for m in dropped:
            del self.members[m.key]
        return dropped

    def usable(self) -> list[Member]:
        return [m for m in self.members.values() if m.usable]

    def member_of(self, worker: Worker) -> Member | None:
        return next((m for m in self.members.values() if m.worker is worker), None)

    def others(self, exclude: Iterable[Worker] = ()) -> list[Member]:
        """Everyone seen except the plan's workers (`exclude`), aliases, and older runs of a
        live worker."""
        skip = {id(w) for w in exclude}
        present = {m.node_id for m in self.members.values() if not m.gone}
        return [m for m in self.members.values()
                if not m.alias_of and (m.worker is None or id(m.worker) not in skip)
                and not (m.gone and m.node_id in present)]

    def rows(self, exclude: Iterable[Worker] = ()) -> list[inference_pb2.WorkerState]:
        """GetCluster rows of everyone seen except the plan's workers and aliases."""
        return [m.state() for m in self.others(exclude)]


def _is_loopback(ip: str) -> bool:
    try:
        return ipaddress.ip_address(ip).is_loopback
    except ValueError:
        return ip == "localhost"


async def resolve_ips(address: str) -> list[str]:
    """The IP addresses a `host:port` names (empty when it does not resolve)."""
    host, port = split_address(address)
    try:
        return [str(ipaddress.ip_address(host))]
    except ValueError:
        pass
    try:
        infos = await asyncio.get_running_loop().getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except OSError:
        return []
    return list(dict.fromkeys(str(i[4][0]) for i in infos))


# (instance name, TXT or None, addresses, port, TXT error, SRV host) of one announcement
Seen = Callable[[str, WorkerAd | None, list[str], int, str, str], None]


class Browser:
    """Browses `_shardline._tcp.local.` on the chosen interfaces and registers the API."""

    def __init__(self, on_seen: Seen, on_gone: Callable[[str], None],
                 interface: str | None = None) -> None:
        self.on_seen = on_seen
        self.on_gone = on_gone
        self.interface = interface
        self.interfaces: list[Interface] = []
        self.zc: Any = None
        self._browser: Any = None
        self._api: Any = None
        self._tasks: set[asyncio.Task] = set()
        self._removed: dict[str, float] = {}  # instance name -> when its goodbye came

    async def start(self) -> list[Interface]:
        """Start browsing; returns the interfaces used (empty: no LAN here, nothing started).

        InterfaceError when `interface` names none of this machine's interfaces.
        """
        from zeroconf.asyncio import AsyncServiceBrowser, AsyncZeroconf

        self.interfaces = select_interfaces(list_interfaces(), self.interface)
        if not self.interfaces:
            return []
        self.zc = AsyncZeroconf(interfaces=zeroconf_interfaces(self.interfaces))
        self._browser = AsyncServiceBrowser(self.zc.zeroconf, [WORKER_SERVICE_TYPE],
                                            handlers=[self._on_change])
        return self.interfaces

    def _on_change(self, zeroconf: Any, service_type: str, name: str, state_change: Any) -> None:
        if state_change.name == "Removed":
            self._removed[name] = time.monotonic()
            self.on_gone(name)
            return
        task = asyncio.get_running_loop().create_task(self._resolve(name, time.monotonic()))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _resolve(self, name: str, asked: float) -> None:
        """Resolve an announcement seen at `asked`; one whose goodbye came while it was
        resolved is dropped (its records were read before the goodbye: taking them would
        bring a stopping worker back)."""
        from zeroconf.asyncio import AsyncServiceInfo

        info = AsyncServiceInfo(WORKER_SERVICE_TYPE, name)
        if not await info.async_request(self.zc.zeroconf, 3000) or not info.port:
            log.info("could not resolve %s", name)
            return
        if self._removed.get(name, -1.0) >= asked:
            log.info("%s said goodbye while it was resolved: not taken back", name)
            return
        ad, error = None, ""
        try:
            ad = decode_worker_txt(info.properties or {})
        except TxtError as e:
            error = f"unreadable TXT record ({e})"
        self.on_seen(name, ad, info.parsed_scoped_addresses(), int(info.port), error,
                     info.server or "")

    async def register_api(self, port: int, ad: ApiAd) -> None:
        """Announce `_shardline-api._tcp.local.` (best effort: a failure is only logged)."""
        from zeroconf.asyncio import AsyncServiceInfo

        from protos.netif import advertised_addresses

        if self.zc is None:
            return
        host = socket.gethostname().split(".")[0] or "coordinator"
        self._api = AsyncServiceInfo(
            API_SERVICE_TYPE, instance_name(f"{host}-{ad.cluster}", API_SERVICE_TYPE), port=port,
            properties=encode_api_txt(ad), server=f"{instance_label(host)}-api-{port}.local.",
            parsed_addresses=advertised_addresses(self.interfaces), host_ttl=120, other_ttl=120,
        )
        try:
            await (await self.zc.async_register_service(self._api, allow_name_change=True))
        except Exception as e:  # noqa: BLE001 - clients can still be given the address
            log.warning("could not announce the API on mDNS: %s", e)
            self._api = None

    async def close(self) -> None:
        zc, self.zc = self.zc, None
        if zc is None:
            return
        await close_zeroconf(zc, self._tasks, self._browser, self._api, log)


async def ask_info(worker: Worker, timeout: float) -> worker_pb2.WorkerInfo:
    """One health check: the worker's Info, or grpc.aio.AioRpcError."""
    return await worker.stub.Info(worker_pb2.InfoRequest(), timeout=timeout)
