"""Weight shipping (docs/weights.md): workers without the model get exactly their shard from the
coordinator, keep it in their cache, resume an interrupted transfer, refuse a corrupted chunk
and a disk too small, and a repo id in the local Hugging Face cache needs no network."""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import urllib.request
from pathlib import Path

import grpc
import pytest
from conftest import GiB, Serving, need, reference_tokens, run

from coordinator.cluster.cluster import ClusterError
from coordinator.cluster.modelinfo import read_model_info
from coordinator.cluster.shipping import Shipper, Transfer
from coordinator.demo import ModelSpec
from coordinator.local import LocalWorkers
from protos import inference_pb2, worker_pb2, worker_pb2_grpc

SPEC = ModelSpec(family="llama")
PROMPT = [1, 5, 9, 200, 33, 4, 77, 12]
MAX_TOKENS = 24

@pytest.fixture
def needs_root() -> None:
    """Root and unshare (mount namespaces, tmpfs), else skip (fail under CI)."""
    need(os.geteuid() == 0 and shutil.which("unshare"),
         "needs root and unshare (mount namespaces, tmpfs)")


def hidden_from(path: Path) -> list[str]:
    """A command prefix: run in a mount namespace where `path` is an empty tmpfs."""
    return ["unshare", "--mount", "--propagation", "private", "sh", "-c",
            'mount -t tmpfs -o size=1m hidden "$0" && exec "$@"', str(path)]


def received_bytes(metrics_port: int) -> float:
    with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=10) as r:
        text = r.read().decode()
    line = next(ln for ln in text.splitlines()
                if ln.startswith("shardline_shard_received_bytes_total"))
    return float(line.split()[-1])


def stage_sizes(s: Serving) -> dict[str, tuple[int, int]]:
    """worker name -> (bytes the coordinator sent it, its shard's weight bytes)."""
    info = read_model_info(s.coordinator.model.path)
    out = {}
    for w in s.coordinator.cluster.workers:
        spec = w.shard.spec
        out[w.info.name] = (w.transfer.total, info.stage_bytes(spec.layer_start, spec.layer_end))
    return out


@pytest.mark.usefixtures("needs_root")
def test_workers_without_the_model_get_exactly_their_shards_and_keep_them(model_dir, tmp_path):
    """Three workers that cannot see the model directory: exact output, each sent about its
    shard (not the model), and after a restart of every worker nothing is sent again."""
    only_here = tmp_path / "only-here"
    model = only_here / "tiny"
    shutil.copytree(model_dir(SPEC), model)
    expected = reference_tokens(model, PROMPT, MAX_TOKENS)
    cache = tmp_path / "workers"
    names = ["s1", "s2", "s3"]

    async def serve_once():
        async with Serving(model, addresses, context=256) as s:
            tokens, _, _ = await s.generate(PROMPT, MAX_TOKENS)
            ports = {w.info.name: w.info.metrics_port for w in s.coordinator.cluster.workers}
            state = await s.stub.GetCluster(inference_pb2.GetClusterRequest())
            shown = {w.name: (w.shard_bytes, w.shard_bytes_sent) for w in state.workers}
            sizes = stage_sizes(s)
            assert shown == {n: (sent, sent) for n, (sent, _) in sizes.items()}
            return tokens, sizes, ports

    local = LocalWorkers(3, memory=[1 * GiB, 2 * GiB, 3 * GiB], cache_dir=cache, names=names,
                         wrap=hidden_from(only_here))
    addresses = local.start()
    try:
        tokens, sizes, ports = run(serve_once())
        received = {n: received_bytes(p) for n, p in ports.items()}
    finally:
        local.stop()
    assert tokens == expected
    total = read_model_info(model).weight_bytes
    for name, (sent, shard) in sizes.items():
        assert shard < total  # a real split
        assert abs(sent - shard) <= 0.1 * shard, (name, sent, shard)
        assert received[name] == sent

    local = LocalWorkers(3, memory=[1 * GiB, 2 * GiB, 3 * GiB], cache_dir=cache, names=names,
                         wrap=hidden_from(only_here))
    addresses = local.start()
    try:
        tokens, sizes, ports = run(serve_once())
        received = {n: received_bytes(p) for n, p in ports.items()}
    finally:
        local.stop()
    assert tokens == expected
    assert {n: sent for n, (sent, _) in sizes.items()} == {n: 0 for n in names}
    assert set(received.values()) == {0.0}

    listed = subprocess.run(
        [sys.executable, "-m", "worker", "cache", "list", "--cache-dir", str(cache)],
        capture_output=True, text=True, check=True).stdout
    assert all(f"{n}:" in listed for n in names) and "layers [0," in listed
    subprocess.run([sys.executable, "-m", "worker", "cache", "prune", "--all", "--cache-dir",
                    str(cache), "--name", "s1"], check=True, capture_output=True)
    assert not list((cache / "weights" / "s1").glob("blobs/*/*"))
    assert list((cache / "weights" / "s2").glob("blobs/*/*"))


async def _one_worker_stub(address: str):
    channel = grpc.aio.insecure_channel(address)
    return channel, worker_pb2_grpc.WorkerStub(channel)


def test_an_interrupted_transfer_resumes_and_a_corrupted_chunk_is_sent_again(model_dir,
                                                                               tmp_path):
    info = read_model_info(model_dir(SPEC))

    async def scenario(address: str):
        channel, stub = await _one_worker_stub(address)
        shipper = Shipper(info, tmp_path / "hashes")
        shipper.chunk_bytes = 4096
        files = await shipper.files(0, info.num_layers)
        big = max(files, key=lambda f: f.size)
        rest = [f for f in files if f is not big]
        assert big.size > 8 * 4096
        # interrupted: the first 3 chunks of the biggest file go, then the stream is cut
        call = stub.Put()
        for offset, data in list(big.chunks(0, 4096))[:3]:
            await call.write(worker_pb2.FileChunk(
                sha256=big.sha256, size=big.size, offset=offset, data=data,
                chunk_sha256=hashlib.sha256(data).hexdigest()))
            assert (await call.read()).ok
        call.cancel()
        wanted = worker_pb2.ShardFiles(model_id=info.model_id, files=[
            worker_pb2.ShardFile(name=f.name, sha256=f.sha256, size=f.size) for f in files])
        needs = {n.sha256: n.held for n in (await stub.Want(wanted)).needs}
        assert needs[big.sha256] == 3 * 4096

        # a chunk whose bytes differ from its checksum is refused and the worker keeps its place
        call = stub.Put()
        bad = bytearray(big.read(3 * 4096, 4096))
        bad[0] ^= 0xFF
        await call.write(worker_pb2.FileChunk(
            sha256=big.sha256, size=big.size, offset=3 * 4096, data=bytes(bad),
            chunk_sha256=hashlib.sha256(big.read(3 * 4096, 4096)).hexdigest()))
        ack = await call.read()
        assert not ack.ok and "sha256" in ack.error and ack.held == 3 * 4096
        call.cancel()

        # the shipper resumes there; one chunk of another file is corrupted on its way
        corrupted = []

        def tamper(sha: str, offset: int, data: bytes) -> bytes:
            if sha == rest[-1].sha256 and offset == 0 and not corrupted:
                corrupted.append(offset)
                return bytes([data[0] ^ 1]) + data[1:]
            return data

        shipper.tamper = tamper
        transfer = Transfer("one")
        await shipper.ship(stub, "one", 0, info.num_layers, files, transfer)
        again = await stub.Want(wanted)
        await channel.close()
        return transfer, again

    with LocalWorkers(1, memory=[1 * GiB], cache_dir=tmp_path / "w", names=["one"]) as addrs:
        transfer, again = run(scenario(addrs[0]))
    total = sum(f.size for f in run(Shipper(info, tmp_path / "hashes").files(0, info.num_layers)))
    assert transfer.total == total - 3 * 4096  # the finished chunks were not sent again
    assert transfer.resent > 0 and transfer.sent == transfer.total
    assert list(again.needs) == []  # every file complete and checked


@pytest.mark.usefixtures("needs_root")
def test_a_disk_too_small_for_the_shard_is_refused_before_any_transfer(model_dir, tmp_path):
    model = model_dir(SPEC)
    small = tmp_path / "small"
    small.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=128k", "tiny", str(small)], check=True)
    try:
        with LocalWorkers(2, memory=[1 * GiB, 1 * GiB], cache_dir=small, names=["d1", "d2"]
                          ) as addresses:
            async def scenario():
                s = Serving(model, addresses, context=256)
                try:
                    await s.__aenter__()
                finally:
                    await s.coordinator.stop()

            with pytest.raises(ClusterError) as err:
                run(scenario())
            held = list(small.glob("weights/*/partial/*")) + list(small.glob("weights/*/blobs"))
    finally:
        subprocess.run(["umount", str(small)], check=False)
    message = str(err.value)
    assert "more on disk" in message and "free" in message
    assert "d1:" in message or "d2:" in message
    assert held == []  # refused up front: not one byte written


def test_a_repo_id_in_the_local_hugging_face_cache_is_served_offline(model_dir, workers,
                                                                     tmp_path):
    src = model_dir(SPEC)
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = tmp_path / "hf" / "models--shardline-test--tiny-llama"
    shutil.copytree(src, repo / "snapshots" / commit)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    expected = reference_tokens(src, PROMPT, MAX_TOKENS)

    async def scenario():
        async with Serving("shardline-test/tiny-llama", workers[:2], context=256,
                           cache_dir=tmp_path / "hf") as s:
            tokens, _, _ = await s.generate(PROMPT, MAX_TOKENS)
            return tokens, s.coordinator.model.model_id

    tokens, model_id = run(scenario())
    assert tokens == expected and model_id == "shardline-test/tiny-llama"


def test_bad_names_and_hashes_are_refused_and_nothing_is_written_outside_the_cache(
        model_dir, tmp_path):
    info = read_model_info(model_dir(SPEC))
    outside = tmp_path / "outside"

    async def scenario(address: str):
        channel, stub = await _one_worker_stub(address)
        codes = []
        for name, sha in ((f"../../{outside.name}/x", "a" * 64), ("config.json", "../" * 20),
                          ("model-.safetensors", "b" * 64)):
            try:
                await stub.Want(worker_pb2.ShardFiles(model_id=info.model_id, files=[
                    worker_pb2.ShardFile(name=name, sha256=sha, size=10)]))
            except grpc.aio.AioRpcError as e:
                codes.append(e.code())
        call = stub.Put()
        await call.write(worker_pb2.FileChunk(sha256=f"../../{outside.name}/y", size=3,
                                              offset=0, data=b"abc", chunk_sha256="0"))
        try:
            await call.read()
        except grpc.aio.AioRpcError as e:
            codes.append(e.code())
        await channel.close()
        return codes

    with LocalWorkers(1, memory=[1 * GiB], cache_dir=tmp_path / "w", names=["one"]) as addrs:
        codes = run(scenario(addrs[0]))
    assert codes == [grpc.StatusCode.INVALID_ARGUMENT] * 4
    assert not outside.exists() and not list(tmp_path.glob("**/y"))


def test_a_shard_that_lacks_a_tensor_is_refused_and_a_second_model_shares_files(model_dir,
                                                                               tmp_path):
    """Loading is strict (a tensor left out is named, not left random); a second model with
    the same tensors and another config needs only its config."""
    path = model_dir(SPEC)
    info = read_model_info(path)
    other = tmp_path / "other"
    shutil.copytree(path, other)
    config = (other / "config.json").read_text()
    (other / "config.json").write_text(config.replace("{", '{"shardline_note": "copy", ', 1))

    async def scenario(address: str):
        channel, stub = await _one_worker_stub(address)
        shipper = Shipper(info, tmp_path / "hashes")
        files = await shipper.files(0, info.num_layers)
        await shipper.ship(stub, "one", 0, info.num_layers, files, Transfer("one"))
        dropped = next(f for f in files if ".layers.1.mlp.down_proj" in f.tensor)
        spec = worker_pb2.ShardSpec(
            model_id=info.model_id, layer_start=0, layer_end=info.num_layers,
            num_layers=info.num_layers, stage_index=0, num_stages=1, plan_id="strict",
            files=[worker_pb2.ShardFile(name=f.name, sha256=f.sha256, size=f.size,
                                        tensor=f.tensor) for f in files if f is not dropped])
        try:
            async for _ in stub.LoadShard(worker_pb2.LoadShardRequest(spec=spec)):
                pass
            refused = None
        except grpc.aio.AioRpcError as e:
            refused = (e.code(), e.details())
        second = Shipper(read_model_info(other), tmp_path / "hashes")
        files2 = await second.files(0, info.num_layers)
        needs = await stub.Want(worker_pb2.ShardFiles(model_id="other", files=[
            worker_pb2.ShardFile(name=f.name, sha256=f.sha256, size=f.size) for f in files2]))
        await channel.close()
        return refused, [n.sha256 for n in needs.needs], files2

    with LocalWorkers(1, memory=[1 * GiB], cache_dir=tmp_path / "w", names=["one"]) as addrs:
        refused, needed, files2 = run(scenario(addrs[0]))
    assert refused is not None and refused[0] == grpc.StatusCode.FAILED_PRECONDITION
    assert "lack 1 tensor" in refused[1] and "layers.1.mlp.down_proj" in refused[1]
    config_sha = next(f.sha256 for f in files2 if f.name == "config.json")
    assert needed == [config_sha]  # every tensor file is shared with the first model



def test_a_worker_with_the_same_model_in_its_models_dir_gets_nothing(model_dir, tmp_path):
    path = model_dir(SPEC)
    expected = reference_tokens(path, PROMPT, MAX_TOKENS)
    stale = tmp_path / "stale"  # w2's copy differs in one tensor file: it is sent its shard
    shutil.copytree(path, stale / path.name)
    weights = stale / path.name / "model.safetensors"
    raw = bytearray(weights.read_bytes())
    raw[-1] ^= 0x01
    weights.write_bytes(bytes(raw))

    async def scenario():
        async with Serving(path, addresses, context=256) as s:
            tokens, _, _ = await s.generate(PROMPT, MAX_TOKENS)
            return tokens, {w.info.name: (w.transfer.local, w.transfer.total)
                            for w in s.coordinator.cluster.workers}

    local = LocalWorkers(1, memory=[1 * GiB], cache_dir=tmp_path / "a", names=["m1"],
                         extra_args=["--models-dir", str(path.parent)])
    other = LocalWorkers(1, memory=[2 * GiB], cache_dir=tmp_path / "b", names=["m2"],
                         extra_args=["--models-dir", str(stale)])
    addresses = local.start() + other.start()
    try:
        tokens, shipped = run(scenario())
    finally:
        local.stop()
        other.stop()
    assert tokens == expected
    assert shipped["m1"] == (True, 0)
    assert shipped["m2"][0] is False and shipped["m2"][1] > 0


def test_files_are_split_over_streams_by_bytes_in_their_order(tmp_path):
    from coordinator.cluster.shipping import split
    from protos.tensorfiles import FileSource

    files = [FileSource(name=f"f{i}", sha256=f"{i:064x}", size=size, path=tmp_path)
             for i, size in enumerate([100, 10, 60, 50, 40, 30])]
    todo = [(f, 20 if f.name == "f0" else 0) for f in files]  # f0: 20 bytes already there
    parts = split(todo, 3)
    assert sorted(id(t) for p in parts for t in p) == sorted(id(t) for t in todo)
    loads = [sum(f.size - held for f, held in p) for p in parts]
    assert max(loads) - min(loads) <= 40, loads
    for p in parts:
        assert [todo.index(t) for t in p] == sorted(todo.index(t) for t in p)


def test_local_workers_with_a_fresh_cache_receive_the_shard_and_leave_no_bytes_behind(model_dir):
    # benchmarks start many clusters of new-machine workers: each cluster's shipped shards
    # go when it stops, or repeated runs fill the disk
    path = model_dir(ModelSpec(family="llama"))
    local = LocalWorkers(2, memory=[GiB, GiB], fresh_cache=True)
    addresses = local.start()
    try:
        async def scenario():
            async with Serving(path, addresses) as s:
                return await s.generate([11, 12, 13, 14], 3)

        tokens, _, _ = run(scenario())
        assert tokens == reference_tokens(path, [11, 12, 13, 14], 3)
        received = sum(f.stat().st_size for f in local.cache_dir.rglob("*") if f.is_file())
        assert received > 0  # the workers had no model: its shards came into their cache
    finally:
        local.stop()
    assert not local.cache_dir.exists()
