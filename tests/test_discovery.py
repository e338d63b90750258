"""Discovery without a network: TXT records, filtering, merging, duplicates, interfaces."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from conftest import ROOT, run

from coordinator.cluster.cluster import ClusterError, Worker
from coordinator.cluster.discovery import MemberTable, exclusion, join_address, order_addresses
from protos import WIRE_VERSION, worker_pb2
from protos.discovery import (
    MAX_TXT_BYTES,
    ApiAd,
    TxtError,
    WorkerAd,
    decode_api_txt,
    decode_worker_txt,
    encode_api_txt,
    encode_worker_txt,
    instance_label,
    instance_name,
    txt_size,
)
from protos.netif import (
    Interface,
    InterfaceError,
    _linux_virtual,
    advertised_addresses,
    is_virtual,
    select_interfaces,
    zeroconf_interfaces,
)

AD = WorkerAd(id="0123456789abcdef", cluster="lab", memory_bytes=24 << 30,
              bandwidth_gbps=273.0, chip="Apple M4 Pro", backend="metal", metrics_port=9400)


# -- TXT ------------------------------------------------------------------------------------
def test_worker_txt_has_the_spec_keys_and_round_trips_as_bytes():
    txt = encode_worker_txt(AD)
    assert list(txt) == ["txtvers", "id", "ver", "api", "cl", "mem", "bw", "chip", "be", "mport"]
    assert txt["txtvers"] == "1" and txt["api"] == str(WIRE_VERSION) and txt["bw"] == "273"
    assert txt_size(txt) < MAX_TXT_BYTES
    wire = {k.encode(): v.encode() for k, v in txt.items()}  # what zeroconf hands a browser
    assert decode_worker_txt(wire) == AD


def test_worker_txt_stays_under_200_bytes_by_shortening_only_the_chip():
    ad = WorkerAd(id="f" * 64, cluster="c" * 40, memory_bytes=10**15, bandwidth_gbps=819.5,
                  chip="Apple M3 Ultra (a very long marketing name) " * 5, backend="metal",
                  metrics_port=65535)
    txt = encode_worker_txt(ad)
    assert txt_size(txt) < MAX_TXT_BYTES
    back = decode_worker_txt(txt)
    assert (back.id, back.cluster, back.memory_bytes, back.bandwidth_gbps) == \
        (ad.id, ad.cluster, ad.memory_bytes, 819.5)
    assert ad.chip.startswith(back.chip) and back.chip
    assert "bw" not in encode_worker_txt(WorkerAd(id="a", bandwidth_gbps=None))


@pytest.mark.parametrize("ad", [WorkerAd(id=""), WorkerAd(id="has space"),
                                WorkerAd(id="a", cluster="bad name!"),
                                WorkerAd(id="a", cluster="x" * 41)])
def test_bad_ids_and_cluster_names_are_refused(ad):
    with pytest.raises(TxtError):
        encode_worker_txt(ad)


def test_decoding_is_lenient_about_unknown_keys_case_and_bad_numbers():
    ad = decode_worker_txt({b"TxtVers": b"1", b"ID": b"n1", b"cl": b"lab", b"mem": b"lots",
                            b"bw": b"-3", b"new-key": b"ignored", b"flag": None})
    assert ad == WorkerAd(id="n1", cluster="lab", api=0, version="", memory_bytes=0,
                          bandwidth_gbps=None, chip="", backend="", metrics_port=0)
    with pytest.raises(TxtError, match="no node id"):
        decode_worker_txt({b"txtvers": b"1"})
    with pytest.raises(TxtError, match="TXT version"):
        decode_worker_txt({b"txtvers": b"2", b"id": b"n1"})


def test_api_txt_and_instance_names():
    txt = encode_api_txt(ApiAd(cluster="lab", http_port=8080, model="m" * 300))
    assert txt_size(txt) < MAX_TXT_BYTES and txt["http"] == "8080"
    assert decode_api_txt(txt).cluster == "lab"
    name = instance_name("mini.студия" * 10)
    label = instance_label(name)
    assert len(label.encode()) <= 63 and "." not in label
    assert name == f"{label}._shardline._tcp.local."


# -- filtering, merging, duplicates ---------------------------------------------------------
def worker(address: str, node_id: str, cluster: str = "lab", api: int = WIRE_VERSION) -> Worker:
    info = worker_pb2.WorkerInfo(id=node_id, name=f"n-{node_id}", cluster=cluster, api=api,
                                 memory_bytes=1 << 30, backend="cpu")
    return Worker(address=address, info=info, channel=None)


def test_exclusion_by_cluster_then_version():
    assert exclusion("lab", WIRE_VERSION, "lab") == ""
    assert exclusion("other", WIRE_VERSION, "lab") == "other cluster 'other'"
    assert exclusion("lab", WIRE_VERSION + 1, "lab").startswith("other wire version")


def test_table_keeps_its_cluster_and_version_and_says_why_not():
    table = MemberTable("lab")
    _, dial = table.saw("a._shardline._tcp.local.", AD, ["10.0.0.1"], 50061)
    assert dial
    other, dial = table.saw("b._shardline._tcp.local.",
                            WorkerAd(id="b", cluster="prod"), ["10.0.0.2"], 50061)
    assert not dial and other.status() == "excluded: other cluster 'prod'"
    old, dial = table.saw("c._shardline._tcp.local.",
                          WorkerAd(id="c", cluster="lab", api=0), ["10.0.0.3"], 50061)
    assert not dial and old.reason.startswith("other wire version 0")
    bad, dial = table.saw("d._shardline._tcp.local.", None, ["10.0.0.4"], 50061,
                          error="unreadable TXT record")
    assert not dial and bad.status() == "excluded: unreadable TXT record"
    # Info is authoritative: a TXT that claimed "lab" but a worker that says "prod" is left out
    member = table.members["a._shardline._tcp.local."]
    table.identified(member, worker("10.0.0.1:50061", AD.id, cluster="prod"))
    assert not member.usable and member.reason == "other cluster 'prod'"
    assert {r.name: r.status for r in table.rows()}["n-" + AD.id].startswith("excluded")


def test_static_and_mdns_views_of_one_worker_merge():
    table = MemberTable("lab", local_ips=["192.168.1.5"])
    static = table.add_static("mini.local:50061", ["192.168.1.7"])
    table.identified(static, worker("mini.local:50061", "n7"))
    local = table.add_static("127.0.0.1:50062")
    table.identified(local, worker("127.0.0.1:50062", "n5"))
    # the same two workers announced on mDNS (n5 by its LAN address: 127.0.0.1 is this host)
    seen7, dial7 = table.saw("mini._shardline._tcp.local.", WorkerAd(id="n7", cluster="lab"),
                             ["fe80::1%en0", "192.168.1.7"], 50061)
    seen5, dial5 = table.saw("me._shardline._tcp.local.", WorkerAd(id="n5", cluster="lab"),
                             ["192.168.1.5"], 50062)
    assert not dial7 and not dial5 and seen7.alias_of == static.key and seen5.alias_of == local.key
    assert seen7.address == "192.168.1.7:50061"  # IPv4 first
    # a third, new worker merges in beside them
    new, dial = table.saw("m2._shardline._tcp.local.", WorkerAd(id="n9", cluster="lab"),
                          ["192.168.1.9"], 50061)
    assert dial
    table.identified(new, worker("192.168.1.9:50061", "n9"))
    assert sorted(m.node_id for m in table.usable()) == ["n5", "n7", "n9"]
    assert len(table.rows()) == 3
    # the worker leaves on mDNS: its static view goes with it
    table.left(seen7.key)
    assert static.usable and seen7.gone == "left"
    table.left(static.key)
    assert sorted(m.node_id for m in table.usable()) == ["n5", "n9"]


def test_duplicate_node_id_is_refused_until_the_original_goes():
    table = MemberTable("lab")
    first, _ = table.saw("w1._shardline._tcp.local.", WorkerAd(id="same", cluster="lab"),
                         ["10.0.0.1"], 50061)
    table.identified(first, worker("10.0.0.1:50061", "same"))
    copy, dial = table.saw("w1-2._shardline._tcp.local.", WorkerAd(id="same", cluster="lab"),
                           ["10.0.0.2"], 50061)
    assert not dial and not copy.usable
    assert copy.status() == "excluded: duplicate node id same (already used by n-same at " \
        "10.0.0.1:50061)"
    assert table.recheck_duplicates() == []
    table.left(first.key, "unreachable")
    assert table.recheck_duplicates() == [copy] and copy.reason == ""
    # a duplicate only found out after dialling (static list) is refused too
    table.identified(first, worker("10.0.0.1:50061", "same"))
    late = table.add_static("10.0.0.3:50061")
    table.identified(late, worker("10.0.0.3:50061", "same"))
    assert late.reason.startswith("duplicate node id same")


def test_a_goodbye_after_failed_health_checks_makes_the_worker_left():
    # a stopping worker's streams break first (health checks: unreachable), then its goodbye
    table = MemberTable("lab")
    name = "w2._shardline._tcp.local."
    member, _ = table.saw(name, WorkerAd(id="n2", cluster="lab"), ["10.0.0.2"], 50061,
                          instance=name)
    table.identified(member, worker("10.0.0.2:50061", "n2"))
    table.left(member.key, "unreachable")
    since = member.gone_since
    assert table.claiming(name) == [member]  # the goodbye that comes next is its own
    table.left(member.key)
    assert table.claiming(name) == []
    assert member.status() == "left" and member.gone_since == since
    table.left(member.key, "unreachable")  # a failed check never hides a goodbye
    assert member.status() == "left"


def test_an_announcement_resolved_across_its_goodbye_is_not_taken(monkeypatch):
    # a stopping worker: its records were being resolved when its goodbye came; taking them
    # after the goodbye would dial it in its grace period and bring it back into a plan
    import asyncio
    import types

    import zeroconf.asyncio

    from coordinator.cluster.discovery import Browser

    release = asyncio.Event()

    class SlowInfo:
        def __init__(self, service_type, name):
            self.port, self.properties, self.server = 50061, {}, "w2-host.local."

        async def async_request(self, zc, timeout):
            await release.wait()
            return True

        def parsed_scoped_addresses(self):
            return ["10.0.0.2"]

    monkeypatch.setattr(zeroconf.asyncio, "AsyncServiceInfo", SlowInfo)
    events = []
    name = "w2._shardline._tcp.local."

    async def scenario():
        browser = Browser(lambda n, *rest: events.append(("seen", n)),
                          lambda n: events.append(("gone", n)))
        browser.zc = types.SimpleNamespace(zeroconf=None)
        change = types.SimpleNamespace
        browser._on_change(None, "", name, change(name="Updated"))  # resolving...
        browser._on_change(None, "", name, change(name="Removed"))  # ...its goodbye
        release.set()
        await asyncio.gather(*browser._tasks)
        browser._on_change(None, "", name, change(name="Added"))  # back for real, later
        await asyncio.gather(*browser._tasks)

    run(scenario())
    assert events == [("gone", name), ("seen", name)]


def test_addresses_are_dialled_ipv4_first():
    assert order_addresses(["fe80::1%eth0", "2001:db8::1", "10.0.0.1"]) == \
        ["10.0.0.1", "2001:db8::1", "fe80::1%eth0"]
    assert join_address("2001:db8::1", 5) == "[2001:db8::1]:5"


def test_min_workers_without_discovery_fails_naming_who_was_seen(workers):
    from coordinator.cluster.membership import Membership

    async def gather():
        m = Membership(cluster="default", discover=False, min_workers=3, progress=lambda s: None)
        try:
            return await m.gather(workers[:2])
        finally:
            await m.close()

    with pytest.raises(ClusterError, match="2 usable worker.*--min-workers 3.*w1 at"):
        run(gather())


# -- interfaces -----------------------------------------------------------------------------
IFACES = [
    Interface("lo", 1, ("127.0.0.1",), ("::1",)),
    Interface("eth0", 2, ("192.168.1.5",), ("fe80::5",)),
    Interface("docker0", 3, ("172.17.0.1",)),
    Interface("br-1a2b", 4, ("172.18.0.1",)),
    Interface("veth12ab", 5, (), ("fe80::9",)),
    Interface("tailscale0", 6, ("100.64.0.1",)),
    Interface("wlan0", 7, (), ("2001:db8::5", "fe80::7")),
]


def test_default_selection_is_real_lan_interfaces_only():
    picked = select_interfaces(IFACES, virtual=lambda n: is_virtual(n, "linux", lambda _: False))
    assert [i.name for i in picked] == ["eth0", "wlan0"]
    assert zeroconf_interfaces(picked) == ["192.168.1.5", 2, 7]
    assert advertised_addresses(picked) == ["192.168.1.5", "2001:db8::5", "fe80::5", "fe80::7"]
    assert select_interfaces(IFACES[:1]) == []  # loopback only: nothing (callers say so)


def test_explicit_interface_by_name_or_address_even_if_virtual():
    assert select_interfaces(IFACES, "docker0") == [IFACES[2]]
    assert select_interfaces(IFACES, "192.168.1.5") == [IFACES[1]]
    assert zeroconf_interfaces(select_interfaces(IFACES, "lo")) == ["127.0.0.1"]
    with pytest.raises(InterfaceError, match="no interface 'eth9'.*eth0 \\(192.168.1.5"):
        select_interfaces(IFACES, "eth9")


def test_macos_names():
    def mac(name: str) -> bool:
        return is_virtual(name, "darwin", lambda _: False)

    assert not mac("en0") and not mac("bridge0")  # Thunderbolt bridge between Macs is real
    assert mac("bridge100") and mac("utun3") and mac("awdl0") and mac("llw0") and mac("lo0")


def test_linux_bridges_count_only_with_a_physical_port(tmp_path: Path, monkeypatch):
    monkeypatch.setattr(sys, "platform", "linux")

    def dev(name: str, flags: int = 0x1003, physical: bool = False, ports=(), tun=False):
        d = tmp_path / name
        d.mkdir()
        (d / "flags").write_text(hex(flags))
        if physical:
            (d / "device").mkdir()
        if tun:
            (d / "tun_flags").write_text("0x1002")
        if ports:
            (d / "bridge").mkdir()
            (d / "brif").mkdir()
            for p in ports:
                (d / "brif" / p).mkdir()

    dev("eno1", physical=True)
    dev("vethA")
    dev("br0", ports=["eno1"])
    dev("mybr", ports=["vethA"])
    dev("vpn0", tun=True)
    dev("nomc", flags=0x3)
    assert not _linux_virtual("eno1", tmp_path) and not _linux_virtual("br0", tmp_path)
    assert _linux_virtual("mybr", tmp_path) and _linux_virtual("vpn0", tmp_path)
    assert _linux_virtual("nomc", tmp_path)
    assert not _linux_virtual("vethA", tmp_path)  # a namespace's eth0 is a veth: keep it


# -- the worker's side ----------------------------------------------------------------------
def test_worker_advertisement_content(cache_dir):
    from worker.advertise import Advertiser, _interfaces_for, worker_ad
    from worker.backend import Hardware
    from worker.server import WorkerConfig

    hw = Hardware("metal", "Apple M2 Max", 48 << 30, 400.0, 64 << 30)
    config = WorkerConfig(node_id="abc123", name="studio", hardware=hw, cluster="lab",
                          metrics_port=9400)
    assert worker_ad(config) == WorkerAd(id="abc123", cluster="lab", memory_bytes=48 << 30,
                                         bandwidth_gbps=400.0, chip="Apple M2 Max",
                                         backend="metal", metrics_port=9400)
    info = Advertiser(config, 50061).service_info(["192.168.1.5"])
    assert info.name == "studio._shardline._tcp.local." and info.port == 50061
    assert info.server.endswith(".local.") and info.server != "studio.local."
    assert decode_worker_txt(info.properties) == worker_ad(config)
    # a worker bound to one address announces that address, on its interface
    assert _interfaces_for("192.168.1.5", None, IFACES) == ([IFACES[1]], ["192.168.1.5"])
    assert _interfaces_for("0.0.0.0", "eth0", IFACES)[1] == ["192.168.1.5", "fe80::5"]


def test_node_id_is_generated_once_persisted_per_name_and_replaced_when_corrupt(tmp_path):
    from protos.discovery import is_node_id
    from worker.identity import node_id

    cache = tmp_path / "cache"  # not there yet: created on the first call
    first = node_id(cache, "studio")
    assert is_node_id(first) and len(first) == 16
    assert (cache / "studio.id").read_text().strip() == first
    assert node_id(cache, "studio") == first  # a second call (a restart) reads it back
    assert sorted(p.name for p in cache.iterdir()) == ["studio.id"]  # no temp file left
    other = node_id(cache, "mini")
    assert other != first and (cache / "mini.id").read_text().strip() == other
    assert node_id(cache, "studio") == first  # each name keeps its own
    encode_worker_txt(WorkerAd(id=first))  # what the worker advertises
    for corrupt in (b"", b"  \n", b"\xff\xfe\x00garbage", b"has spaces in it\n", b"x" * 65):
        (cache / "studio.id").write_bytes(corrupt)
        fresh = node_id(cache, "studio")
        assert is_node_id(fresh) and fresh != first, corrupt
        assert (cache / "studio.id").read_text().strip() == fresh
        assert node_id(cache, "studio") == fresh
        first = fresh


@pytest.mark.parametrize("args, words", [
    (["worker", "serve", "--cluster", "no spaces"], "cluster name 'no spaces'"),
    (["worker", "serve", "--interface", "nonexistent9"], "no interface 'nonexistent9'"),
])
def test_bad_discovery_flags_are_one_line_errors(args, words):
    proc = subprocess.run([sys.executable, "-m", *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode == 2 and proc.stderr.strip().splitlines()[-1].startswith("error: ")
    assert words in proc.stderr and "Traceback" not in proc.stderr


def test_coordinator_refuses_an_unknown_interface(model_dir):
    from coordinator.demo import ModelSpec

    proc = subprocess.run(
        [sys.executable, "-m", "coordinator", "serve", "--model",
         str(model_dir(ModelSpec(family="llama"))), "--interface", "nonexistent9",
         "--grpc-port", "0", "--http-port", "0"],
        cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines()[-1].startswith("error: no interface 'nonexistent9'")
