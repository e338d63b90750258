"""Which network interfaces mDNS uses: real LAN interfaces by default, or the one named.

By default Shardline advertises and browses on every interface that has an address other than
loopback and is not a container, VM or VPN interface (docker0, br-*, veth*, virbr*, vmnet*,
utun*, awdl0, tailscale0, ...). On Linux a bridge counts as virtual unless a physical port is
in it (so `br0` holding `eth0` is used, `docker0` is not). `--interface NAME_OR_ADDRESS` picks
one interface explicitly, whatever it is.
"""

from __future__ import annotations

import ipaddress
import sys
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

# Name prefixes of interfaces that are never a LAN between machines.
VIRTUAL_PREFIXES = (
    "docker", "br-", "veth", "virbr", "vnet", "vmnet", "vboxnet", "lxcbr", "lxdbr", "cni",
    "flannel", "cali", "weave", "podman", "kube", "tun", "tap", "utun", "awdl", "llw", "anpi",
    "gif", "stf", "ipsec", "zt", "tailscale", "wg", "vmenet", "ap1",
)
_IFF_LOOPBACK = 0x8
_IFF_MULTICAST = 0x1000


class InterfaceError(ValueError):
    """`--interface` names no interface with an address on this machine."""


@dataclass(frozen=True)
class Interface:
    """A network interface and its addresses (IPv6 without the `%scope`)."""

    name: str
    index: int
    ipv4: tuple[str, ...] = ()
    ipv6: tuple[str, ...] = ()

    @property
    def addresses(self) -> tuple[str, ...]:
        return self.ipv4 + self.ipv6

    @property
    def loopback_only(self) -> bool:
        return all(ipaddress.ip_address(a).is_loopback for a in self.addresses)


def list_interfaces() -> list[Interface]:
    """Every interface with at least one address, from `ifaddr` (macOS, Linux, Windows)."""
    import ifaddr

    out = []
    for adapter in ifaddr.get_adapters():
        v4 = tuple(ip.ip for ip in adapter.ips if isinstance(ip.ip, str))
        v6 = tuple(ip.ip[0] for ip in adapter.ips if isinstance(ip.ip, tuple))
        if v4 or v6:
            out.append(Interface(adapter.name, int(adapter.index or 0), v4, v6))
    return out


def _linux_virtual(name: str, sysfs: Path = Path("/sys/class/net")) -> bool:
    """Linux only: a bridge without a physical port, a tun/tap, or no multicast (from sysfs)."""
    if not sys.platform.startswith("linux"):
        return False
    dev = sysfs / name
    try:
        flags = int((dev / "flags").read_text().strip(), 16)
    except (OSError, ValueError):
        flags = _IFF_MULTICAST
    if flags & _IFF_LOOPBACK or not flags & _IFF_MULTICAST:
        return True
    if (dev / "tun_flags").exists():
        return True
    if (dev / "bridge").is_dir():
        ports = list((dev / "brif").iterdir()) if (dev / "brif").is_dir() else []
        return not any((sysfs / p.name / "device").exists() for p in ports)
    return False


def is_virtual(name: str, platform: str = sys.platform,
               probe: Callable[[str], bool] = _linux_virtual) -> bool:
    """True for container, VM, VPN and Apple peer-to-peer interfaces (see module docstring)."""
    lower = name.lower()
    if lower.startswith(VIRTUAL_PREFIXES) or lower.startswith(("lo", "dummy")):
        return True
    # macOS: bridge0 is the Thunderbolt bridge between Macs (real); bridge100+ belong to VMs.
    if platform == "darwin" and lower.startswith("bridge") and lower[6:].isdigit():
        return int(lower[6:]) >= 100
    return probe(name)


def find_interface(interfaces: Iterable[Interface], choice: str) -> Interface:
    """The interface named `choice`, or holding the address `choice`; InterfaceError if none."""
    interfaces = list(interfaces)
    for iface in interfaces:
        if iface.name == choice or choice in iface.addresses:
            return iface
    names = ", ".join(f"{i.name} ({', '.join(i.addresses)})" for i in interfaces) or "none"
    raise InterfaceError(f"no interface {choice!r} with an address here; interfaces: {names}")


def select_interfaces(interfaces: Iterable[Interface], choice: str | None = None, *,
                      virtual: Callable[[str], bool] = is_virtual) -> list[Interface]:
    """The interfaces to use for mDNS: `choice` alone if given, else every real LAN one.

    The default may be empty (a machine with loopback only); callers then say so and rely on
    static `--workers`.
    """
    if choice:
        return [find_interface(interfaces, choice)]
    return [i for i in interfaces if not i.loopback_only and not virtual(i.name)]


def zeroconf_interfaces(selected: Iterable[Interface]) -> list[str | int]:
    """`Zeroconf(interfaces=...)` for these: IPv4 addresses, and IPv6 as interface indexes."""
    out: list[str | int] = []
    for iface in selected:
        if iface.loopback_only:
            continue
        out += [a for a in iface.ipv4 if not ipaddress.ip_address(a).is_loopback]
        if iface.ipv6 and iface.index and iface.index not in out:
            out.append(iface.index)
    if not out:  # loopback picked explicitly: IPv4 loopback is the one mDNS can use there
        out = [a for iface in selected for a in iface.ipv4][:1]
    return out


def advertised_addresses(selected: Iterable[Interface]) -> list[str]:
    """Addresses to put in A/AAAA records: IPv4 first, then global IPv6, then link-local."""
    v4, v6, link = [], [], []
    for iface in selected:
        v4 += iface.ipv4
        for a in iface.ipv6:
            (link if ipaddress.ip_address(a).is_link_local else v6).append(a)
    return list(dict.fromkeys(v4 + v6 + link))


def describe(selected: Iterable[Interface]) -> str:
    """`eth0 (10.0.0.2, fe80::1)` style, for log lines."""
    return ", ".join(f"{i.name} ({', '.join(i.addresses)})" for i in selected) or "no interface"
