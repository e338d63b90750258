"""Announce this worker on mDNS (`_shardline._tcp.local.`) and withdraw it with a goodbye."""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import secrets
import signal
import socket
from collections.abc import Callable
from typing import Any

from protos import WORKER_SERVICE_TYPE
from protos.discovery import (
    WorkerAd,
    close_zeroconf,
    decode_worker_txt,
    encode_worker_txt,
    instance_name,
)
from protos.health import Health
from protos.netif import (
    Interface,
    advertised_addresses,
    describe,
    list_interfaces,
    select_interfaces,
    zeroconf_interfaces,
)
from worker.server import WORKER_SERVICE, WorkerConfig, serve

log = logging.getLogger("shardline.advertise")

# TTL of SRV/TXT/PTR: a worker that vanishes without a goodbye expires from every browser's
# cache after this (python-zeroconf's default is 4500 s). Coordinators notice sooner through
# health checks; this is the backstop.
RECORD_TTL = 120
_WILDCARD = ("", "0.0.0.0", "::", "[::]")


def worker_ad(config: WorkerConfig) -> WorkerAd:
    """The TXT content of this worker (SPEC keys; no secrets)."""
    hw = config.hardware
    return WorkerAd(id=config.node_id, cluster=config.cluster, memory_bytes=hw.memory_bytes,
                    bandwidth_gbps=hw.bandwidth_gbps, chip=hw.chip, backend=hw.backend,
                    metrics_port=config.metrics_port)


def _server_name() -> str:
    # Unique per process: several workers (or lab hosts) may share a host name, and mDNS host
    # records with the cache-flush bit would otherwise overwrite each other's addresses.
    host = socket.gethostname().split(".")[0] or "shardline"
    safe = "".join(c if c.isalnum() or c == "-" else "-" for c in host)[:40].strip("-")
    return f"{safe or 'shardline'}-{secrets.token_hex(3)}.local."


def _interfaces_for(host: str, interface: str | None,
                    interfaces: list[Interface] | None = None) -> tuple[list[Interface], list[str]]:
    """(interfaces to announce on, addresses to announce) for a server bound to `host`."""
    interfaces = list_interfaces() if interfaces is None else interfaces
    try:
        bound = None if host in _WILDCARD else str(ipaddress.ip_address(host.strip("[]")))
    except ValueError:
        bound = None
    selected = select_interfaces(interfaces, interface or bound)
    addresses = [bound] if bound else advertised_addresses(selected)
    return selected, addresses


def _txt_pairs(text: bytes) -> dict[bytes, bytes | None]:
    """A TXT record's wire form (length-prefixed `key=value` strings) as a mapping."""
    pairs: dict[bytes, bytes | None] = {}
    i = 0
    while i < len(text):
        item = text[i + 1 : i + 1 + text[i]]
        i += 1 + text[i]
        key, eq, value = item.partition(b"=")
        if key:
            pairs.setdefault(key, value if eq else None)
    return pairs


class Advertiser:
    """Registers one worker instance; `close()` sends the goodbye."""

    def __init__(self, config: WorkerConfig, port: int, *, host: str = "0.0.0.0",
                 interface: str | None = None) -> None:
        self.config = config
        self.port = port
        self.host = host
        self.interface = interface
        self.zc: Any = None
        self.info: Any = None
        self._browser: Any = None
        self._tasks: set[asyncio.Task] = set()
        self._warned: set[str] = set()

    def service_info(self, addresses: list[str]) -> Any:
        from zeroconf.asyncio import AsyncServiceInfo

        return AsyncServiceInfo(
            WORKER_SERVICE_TYPE, instance_name(self.config.name), port=self.port,
            properties=encode_worker_txt(worker_ad(self.config)), server=_server_name(),
            parsed_addresses=addresses, host_ttl=RECORD_TTL, other_ttl=RECORD_TTL,
        )

    async def start(self) -> bool:
        """Register on the LAN; False (with a warning) where that is not possible."""
        from zeroconf.asyncio import AsyncServiceBrowser, AsyncZeroconf

        try:
            selected, addresses = _interfaces_for(self.host, self.interface)
            if not selected or not addresses:
                log.warning("not advertising on mDNS: no LAN interface found (pick one with "
                            "--interface, or give coordinators this worker with --workers)")
                return False
            self.zc = AsyncZeroconf(interfaces=zeroconf_interfaces(selected))
            self.info = self.service_info(addresses)
            await (await self.zc.async_register_service(self.info, allow_name_change=True))
        except Exception as e:  # noqa: BLE001 - advertising is best effort; serving goes on
            log.warning("not advertising on mDNS (%s); coordinators can still use --workers", e)
            await self.close()
            return False
        log.info("advertising %s on %s", self.info.name, describe(selected))
        self._browser = AsyncServiceBrowser(self.zc.zeroconf, [WORKER_SERVICE_TYPE],
                                            handlers=[self._on_change])
        return True

    def _on_change(self, zeroconf: Any, service_type: str, name: str, state_change: Any) -> None:
        if self.info is not None and state_change.name != "Removed":
            task = asyncio.get_running_loop().create_task(self._check_duplicate(name))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _check_duplicate(self, name: str) -> None:
        """Warn when another worker announces this worker's node id (a copied cache dir) or its
        instance name."""
        from zeroconf.asyncio import AsyncServiceInfo

        info = AsyncServiceInfo(WORKER_SERVICE_TYPE, name)
        resolved = await info.async_request(self.zc.zeroconf, 3000)
        if name.lower() == self.info.name.lower():
            # Our own name: resolving it may give our own records, so read every SRV and TXT
            # record of the name that the LAN sent, and look for a host other than ours.
            for _ in range(5):
                self._ask_for(name)
                await asyncio.sleep(0.5)
                found = self._others_under_our_name(name)
                if found is not None:
                    self._warn(name, *found)
                    return
                await asyncio.sleep(1.0)
            return
        if not resolved or (info.server or "").lower() == self.info.server.lower():
            return  # not resolved, or ourselves (each process has its own SRV host)
        try:
            other = decode_worker_txt(info.properties or {})
        except ValueError:
            return
        self._warn(name, info.server or "", other.id,
                   ", ".join(info.parsed_scoped_addresses()) or "?")

    def _ask_for(self, name: str) -> None:
        """Multicast a query for the SRV and TXT records of `name` (everyone who holds it
        answers; ServiceInfo would settle for our own records)."""
        from zeroconf import DNSOutgoing, DNSQuestion
        from zeroconf.const import _CLASS_IN, _FLAGS_QR_QUERY, _TYPE_SRV, _TYPE_TXT

        out = DNSOutgoing(_FLAGS_QR_QUERY)
        out.add_question(DNSQuestion(name, _TYPE_SRV, _CLASS_IN))
        out.add_question(DNSQuestion(name, _TYPE_TXT, _CLASS_IN))
        self.zc.zeroconf.async_send(out)

    def _others_under_our_name(self, name: str) -> tuple[str, str, str] | None:
        """(server, node id, where) of another process announcing `name`, from the cache."""
        from zeroconf.const import _CLASS_IN, _TYPE_SRV, _TYPE_TXT

        cache = self.zc.zeroconf.cache
        ours = self.info.server.lower()
        servers = [r.server for r in cache.get_all_by_details(name, _TYPE_SRV, _CLASS_IN)
                   if r.server.lower() != ours]
        if not servers:
            return None
        ids = set()
        for record in cache.get_all_by_details(name, _TYPE_TXT, _CLASS_IN):
            try:
                ids.add(decode_worker_txt(_txt_pairs(record.text)).id)
            except ValueError:
                continue
        other_ids = ids - {self.config.node_id}
        other_id = next(iter(other_ids)) if other_ids else self.config.node_id
        return servers[0], other_id, servers[0].rstrip(".")

    def _warn(self, name: str, server: str, other_id: str, where: str) -> None:
        if server in self._warned:
            return
        if other_id == self.config.node_id or name.lower() == self.info.name.lower():
            self._warned.add(server)
        if other_id != self.config.node_id and name.lower() == self.info.name.lower():
            log.warning("another worker (node id %s at %s) announces the same name %r; give "
                        "one of them another --name", other_id, where, self.config.name)
        elif other_id == self.config.node_id:
            log.warning(
                "another worker (%s at %s) uses this worker's node id %s; coordinators will "
                "refuse one of them. Was the cache dir copied? Delete the id file of one "
                "(<cache dir>/%s.id) and restart it.", name, where, other_id, self.config.name)


    async def close(self) -> None:
        """Send the goodbye and close the sockets (safe to call twice)."""
        zc, self.zc = self.zc, None
        if zc is None:
            return
        await close_zeroconf(zc, self._tasks, self._browser, self.info, log)


async def serve_advertised(config: WorkerConfig, host: str, port: int,
                           ready: Callable[[int], None] | None = None, *, advertise: bool = True,
                           interface: str | None = None, **serve_kwargs: Any) -> None:
    """`worker.server.serve`, announced on mDNS once it listens; SIGTERM/SIGINT turn gRPC
    health NOT_SERVING and say goodbye first, then stop the server."""
    loop = asyncio.get_running_loop()
    main = asyncio.current_task()
    advertiser: Advertiser | None = None
    started: asyncio.Task | None = None
    health = serve_kwargs.setdefault("health", Health((WORKER_SERVICE,)))

    def on_ready(bound: int) -> None:
        nonlocal advertiser, started
        if ready is not None:
            ready(bound)
        if advertise:
            advertiser = Advertiser(config, bound, host=host, interface=interface)
            started = loop.create_task(advertiser.start())

    async def shutdown() -> None:
        await health.stopping()  # probes and load balancers hear it before the port closes
        if started is not None and not started.done():
            started.cancel()
        if advertiser is not None:
            await advertiser.close()  # goodbye before the port closes
        main.cancel()

    stopping: list[asyncio.Task] = []
    for sig in (signal.SIGTERM, signal.SIGINT):
        try:
            loop.add_signal_handler(sig, lambda: stopping or stopping.append(
                loop.create_task(shutdown())))
        except (NotImplementedError, RuntimeError):  # not the main thread, or Windows
            pass
    try:
        await serve(config, host, port, on_ready, **serve_kwargs)
    except asyncio.CancelledError:
        if not stopping:
            raise
    finally:
        if advertiser is not None:
            await advertiser.close()


def check_args(cluster: str, interface: str | None) -> str | None:
    """A one-line reason why `--cluster`/`--interface` cannot work here, or None."""
    from protos.discovery import check_cluster_name
    from protos.netif import find_interface

    try:
        check_cluster_name(cluster)
        if interface:
            find_interface(list_interfaces(), interface)
    except ValueError as e:
        return str(e)
    return None
