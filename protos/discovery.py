"""DNS-SD wire of Shardline: service names and TXT records with their limits (SPEC: Discovery).

A worker registers `_shardline._tcp.local.` (its gRPC port in SRV) with a TXT record of short
keys; a coordinator registers `_shardline-api._tcp.local.` (its gRPC API port in SRV). Both
TXT records stay under 200 bytes on the wire. No secrets ever go into TXT.

>>> txt = encode_worker_txt(WorkerAd(id="3f2a9c0d1e4b5a6f", cluster="lab", memory_bytes=1 << 30))
>>> decode_worker_txt(txt).memory_bytes == 1 << 30
True
"""

from __future__ import annotations

import asyncio
import logging
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from protos import API_SERVICE_TYPE, WIRE_VERSION, WORKER_SERVICE_TYPE, __version__

TXT_VERSION = "1"
MAX_TXT_BYTES = 200  # SPEC: "short, under 200 bytes in all" (RFC 6763 §6.2 advice)
MAX_LABEL_BYTES = 63  # one DNS label: the service instance name
WORKER_KEYS = ("txtvers", "id", "ver", "api", "cl", "mem", "bw", "chip", "be", "mport")

_CLUSTER = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,39}$")
_NODE_ID = re.compile(r"^[A-Za-z0-9._-]{1,64}$")

__all__ = [
    "API_SERVICE_TYPE", "WORKER_SERVICE_TYPE", "MAX_TXT_BYTES", "TxtError", "WorkerAd", "ApiAd",
    "encode_worker_txt", "decode_worker_txt", "encode_api_txt", "decode_api_txt", "txt_size",
    "check_cluster_name", "instance_name", "instance_label",
]


class TxtError(ValueError):
    """A TXT record that cannot be built within the limits, or read as a Shardline record."""


@dataclass(frozen=True)
class WorkerAd:
    """What a worker says about itself in TXT (host and port live in SRV/A/AAAA, not here)."""

    id: str
    cluster: str = "default"
    api: int = WIRE_VERSION
    version: str = __version__
    memory_bytes: int = 0
    bandwidth_gbps: float | None = None
    chip: str = ""
    backend: str = ""
    metrics_port: int = 0


@dataclass(frozen=True)
class ApiAd:
    """What a coordinator says about its API in TXT (the gRPC port is in SRV)."""

    cluster: str = "default"
    api: int = WIRE_VERSION
    version: str = __version__
    http_port: int = 0
    model: str = ""


def is_node_id(text: str) -> bool:
    """Whether `text` can be a node id in TXT (1-64 letters, digits, '.', '_' or '-')."""
    return bool(_NODE_ID.match(text))


def check_cluster_name(name: str) -> str:
    """`name` if it is a valid cluster name (1-40 of A-Z a-z 0-9 . _ -), else TxtError."""
    if not _CLUSTER.match(name or ""):
        raise TxtError(f"cluster name {name!r} must be 1-40 letters, digits, '.', '_' or '-', "
                       "starting with a letter or digit")
    return name


def txt_size(properties: Mapping[str, str]) -> int:
    """Bytes the TXT record takes on the wire: one length byte plus `key=value` per entry."""
    return sum(1 + len(k.encode()) + 1 + len(v.encode()) for k, v in properties.items())


def _printable(text: str) -> str:
    return "".join(c for c in text if c.isprintable()).strip()


def _truncate(text: str, max_bytes: int) -> str:
    data = text.encode()[: max(max_bytes, 0)]
    return data.decode(errors="ignore").rstrip()


def _number(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else f"{value:.1f}"


def _fit(props: dict[str, str], shrinkable: str) -> dict[str, str]:
    """Shorten `props[shrinkable]` (or drop it) until the record is under MAX_TXT_BYTES."""
    over = txt_size(props) - (MAX_TXT_BYTES - 1)
    if over > 0 and shrinkable in props:
        value = _truncate(props[shrinkable], len(props[shrinkable].encode()) - over)
        if value:
            props[shrinkable] = value
        else:
            del props[shrinkable]
    if (size := txt_size(props)) >= MAX_TXT_BYTES:
        raise TxtError(f"TXT record is {size} bytes; it must stay under {MAX_TXT_BYTES}")
    return props


def encode_worker_txt(ad: WorkerAd) -> dict[str, str]:
    """The worker's TXT properties, `txtvers` first; the chip name is shortened to fit."""
    if not is_node_id(ad.id or ""):
        raise TxtError(f"node id {ad.id!r} must be 1-64 letters, digits, '.', '_' or '-'")
    props = {
        "txtvers": TXT_VERSION,
        "id": ad.id,
        "ver": _truncate(_printable(ad.version), 24) or "0",
        "api": str(int(ad.api)),
        "cl": check_cluster_name(ad.cluster),
        "mem": str(max(int(ad.memory_bytes), 0)),
    }
    if ad.bandwidth_gbps:
        props["bw"] = _number(ad.bandwidth_gbps)
    if chip := _printable(ad.chip):
        props["chip"] = chip
    if ad.backend:
        props["be"] = _truncate(_printable(ad.backend), 8)
    props["mport"] = str(max(int(ad.metrics_port), 0))
    # `chip` is the only free-form key: shorten it, never the keys readers filter on
    return _fit(props, "chip")


def _text(properties: Mapping[bytes | str, bytes | str | None]) -> dict[str, str]:
    """TXT properties as lower-case str keys and str values (a key without `=` maps to '')."""
    out: dict[str, str] = {}
    for key, value in properties.items():
        k = key.decode(errors="replace") if isinstance(key, bytes) else str(key)
        if isinstance(value, bytes):
            v = value.decode(errors="replace")
        else:
            v = "" if value is None else str(value)
        out.setdefault(k.strip().lower(), v.strip())
    return out


def _int(props: Mapping[str, str], key: str) -> int:
    try:
        return max(int(props.get(key, "") or 0), 0)
    except ValueError:
        return 0


def _check_version(props: Mapping[str, str]) -> None:
    txtvers = props.get("txtvers", TXT_VERSION)
    if txtvers != TXT_VERSION:
        raise TxtError(f"TXT version {txtvers!r} is not supported (this reads {TXT_VERSION})")


def decode_worker_txt(properties: Mapping[bytes | str, bytes | str | None]) -> WorkerAd:
    """Read a worker's TXT record; unknown keys are ignored, bad numbers read as 0.

    TxtError when there is no node id or the TXT version is not ours. A missing `api` reads as
    0, so the worker is left out as "other wire version" rather than trusted.
    """
    props = _text(properties)
    _check_version(props)
    node_id = props.get("id", "")
    if not node_id:
        raise TxtError("TXT record has no node id")
    try:
        bw: float | None = float(props["bw"]) if props.get("bw") else None
    except ValueError:
        bw = None
    return WorkerAd(
        id=node_id,
        cluster=props.get("cl", "default") or "default",
        api=_int(props, "api"),
        version=props.get("ver", ""),
        memory_bytes=_int(props, "mem"),
        bandwidth_gbps=bw if bw and bw > 0 else None,
        chip=props.get("chip", ""),
        backend=props.get("be", ""),
        metrics_port=_int(props, "mport"),
    )


def encode_api_txt(ad: ApiAd) -> dict[str, str]:
    """The coordinator's TXT properties; the model id is shortened to fit."""
    props = {"txtvers": TXT_VERSION, "ver": _truncate(_printable(ad.version), 24) or "0",
             "api": str(int(ad.api)), "cl": check_cluster_name(ad.cluster)}
    if ad.http_port:
        props["http"] = str(int(ad.http_port))
    if model := _printable(ad.model):
        props["model"] = model
    return _fit(props, "model")


def decode_api_txt(properties: Mapping[bytes | str, bytes | str | None]) -> ApiAd:
    """Read a coordinator's TXT record (see `encode_api_txt`)."""
    props = _text(properties)
    _check_version(props)
    return ApiAd(cluster=props.get("cl", "default") or "default", api=_int(props, "api"),
                 version=props.get("ver", ""), http_port=_int(props, "http"),
                 model=props.get("model", ""))


def instance_name(label: str, service_type: str = WORKER_SERVICE_TYPE) -> str:
    """`label.service_type` with the label made a valid instance label (<= 63 UTF-8 bytes)."""
    clean = _truncate(_printable(label).replace(".", "-"), MAX_LABEL_BYTES) or "shardline"
    return f"{clean}.{service_type}"


def instance_label(name: str, service_type: str = WORKER_SERVICE_TYPE) -> str:
    """The instance label of a full service name (`w1._shardline._tcp.local.` -> `w1`)."""
    suffix = "." + service_type
    return name[: -len(suffix)] if name.lower().endswith(suffix.lower()) else name


async def close_zeroconf(zc: Any, tasks: Iterable[asyncio.Task], browser: Any, service: Any,
                         log: logging.Logger) -> None:
    """Cancel `tasks` and `browser`, unregister `service` (the goodbye) and close `zc`."""
    for task in list(tasks):
        task.cancel()
    try:
        if browser is not None:
            await browser.async_cancel()
        if service is not None:
            await (await zc.async_unregister_service(service))
    except Exception as e:  # noqa: BLE001 - shutting down anyway
        log.debug("mDNS shutdown: %s", e)
    finally:
        await zc.async_close()
