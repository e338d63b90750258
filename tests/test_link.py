"""Direct links between stages (worker/link.py): steps on a plain socket, read and written by
the MLX threads, with the Forward stream beside them; who may connect, and what ends them."""

from __future__ import annotations

import asyncio
import socket

import grpc
from conftest import GiB, counter_by, loaded_cluster, reference_tokens, run

import protos
from coordinator.demo import ModelSpec
from coordinator.serving.pipeline import PLAN_METADATA_KEY
from protos import auth, worker_pb2, worker_pb2_grpc
from worker import link

SPEC = ModelSpec(family="llama")
PROMPT = [(5 * i + 11) % 480 + 10 for i in range(9)]
SECRET = b"a-link-test-secret-of-32-bytes!!"


def first_step(seq_id: str, step_id: int = 1) -> worker_pb2.StageMessage:
    return worker_pb2.StageMessage(step_id=step_id, seqs=[
        worker_pb2.SeqInput(seq_id=seq_id, token_ids=PROMPT, start=True, sample=True)])


async def offer(stub: worker_pb2_grpc.WorkerStub, plan: str):
    """A Forward call asking for a link, and the port and token its stage offered."""
    call = stub.Forward(metadata=((PLAN_METADATA_KEY, plan), (link.LINK_KEY, "1")))
    answer = dict(await call.initial_metadata())[link.LINK_KEY]
    port, token = answer.split()
    return call, int(port), token


async def hello(port: int, data: bytes) -> bytes:
    """Connect to a link port, send `data`, and return what comes back before it closes."""
    loop = asyncio.get_running_loop()
    sock = socket.create_connection(("127.0.0.1", port))
    sock.setblocking(False)
    got = b""
    try:
        await loop.sock_sendall(sock, data)
        async with asyncio.timeout(10):
            while chunk := await loop.sock_recv(sock, 64):
                got += chunk
                if got == b"OK":
                    break
    except ConnectionResetError:  # closed with bytes unread: a reset, not an answer
        pass
    finally:
        sock.close()
    return got


def link_steps(port: int) -> dict[str, float]:
    """A worker's shardline_link_steps_total by direction, from its metrics port."""
    return counter_by(port, "shardline_link_steps", "direction")


def moved(before: dict[str, float], after: dict[str, float]) -> dict[str, float]:
    return {d: after.get(d, 0) - before.get(d, 0) for d in ("in", "out", "follow")
            if after.get(d, 0) != before.get(d, 0)}


def test_a_pipeline_moves_its_steps_and_tokens_on_direct_links(model_dir, workers):
    path = model_dir(SPEC)

    async def scenario():
        cluster = await loaded_cluster(path, workers)
        try:
            ports = [w.info.metrics_port for w in cluster.workers]
            start = link_steps(ports[-1]).get("follow", 0)
            for i in range(100):  # until stage 0's link for the tokens is up (set up beside
                await cluster.pipeline.send(first_step(f"warm{i}").seqs)  # the stream)
                if link_steps(ports[-1]).get("follow", 0) > start:
                    break
            before = [link_steps(p) for p in ports]
            out = await cluster.pipeline.send(first_step("linked").seqs)
            return before, [link_steps(p) for p in ports], [o.token for o in out.outputs]
        finally:
            await cluster.close()

    before, after, tokens = run(scenario())
    assert tokens == reference_tokens(path, PROMPT, 1)
    # stage 0 got the step from the coordinator (gRPC) and sent it on a link; the middle
    # stage both ways; the last stage wrote the token to stage 0, which follows it
    assert [moved(b, a) for b, a in zip(before, after, strict=True)] == [
        {"out": 1}, {"in": 1, "out": 1}, {"in": 1, "follow": 1}]


def test_a_step_sent_on_a_direct_link_runs_through_every_stage_exactly(model_dir, workers):
    path = model_dir(SPEC)

    async def scenario():
        cluster = await loaded_cluster(path, workers)
        try:
            results = cluster.workers[-1].stub.Results(
                worker_pb2.ResultsRequest(plan_id=cluster.plan_id))
            await results.read()  # attached
            call, port, token = await offer(cluster.workers[0].stub, cluster.plan_id)
            loop = asyncio.get_running_loop()
            sock = socket.create_connection(("127.0.0.1", port))
            sock.setblocking(False)
            await loop.sock_sendall(sock, link.HELLO + token.encode() + b"0" * 64)
            assert await loop.sock_recv(sock, 2) == b"OK"
            # two steps in one write: the stage reads both frames from one read
            await loop.sock_sendall(sock, link.frame(first_step("a", 1))
                                    + link.frame(first_step("b", 2)))
            answers = [await asyncio.wait_for(results.read(), 30) for _ in range(2)]
            sock.shutdown(socket.SHUT_WR)  # the link's end, then the stream's
            await call.done_writing()
            back = [m async for m in call]
            sock.close()
            results.cancel()
            return answers, back
        finally:
            await cluster.close()

    answers, back = run(scenario())
    expected = reference_tokens(path, PROMPT, 1)
    assert [a.step_id for a in answers] == [1, 2]
    assert all([o.token for o in a.outputs] == expected and not a.error for a in answers)
    assert back == []


def test_a_link_port_set_refuses_wrong_tokens_and_proofs_and_a_broken_frame_ends_the_stream(
        model_dir, cache_dir):
    from coordinator.local import LocalWorkers

    path = model_dir(SPEC)
    local = LocalWorkers(1, memory=[1 * GiB], cache_dir=cache_dir, names=["linked"],
                         secret=SECRET)
    with socket.socket() as s:  # a free port, given to the worker for its links
        s.bind(("127.0.0.1", 0))
        fixed = s.getsockname()[1]
    local.env["SHARDLINE_LINK_PORT"] = str(fixed)
    address = local.start()[0]

    async def scenario():
        cluster = await loaded_cluster(path, [address], secret=SECRET)
        channel = auth.worker_channel(address, SECRET, protos.channel_options())
        try:
            stub = worker_pb2_grpc.WorkerStub(channel)
            call, port, token = await offer(stub, cluster.plan_id)
            refused = [
                await hello(port, b"GET / HTTP/1.1\r\n\r\n" + b"x" * 100),  # not a link
                await hello(port, link.HELLO + b"f" * 32 + link._proof(SECRET, "f" * 32)),
                await hello(port, link.HELLO + token.encode() + b"0" * 64),  # no proof
            ]
            # the token is spent by a wrong proof: a second call gets a fresh one
            call2, port2, token2 = await offer(stub, cluster.plan_id)
            taken = await hello(port2, link.HELLO + token2.encode()
                                + link._proof(SECRET, token2))
            # a stage still serves after all that: a third link, then a frame cut short
            call3, port3, token3 = await offer(stub, cluster.plan_id)
            loop = asyncio.get_running_loop()
            sock = socket.create_connection(("127.0.0.1", port3))
            sock.setblocking(False)
            await loop.sock_sendall(sock, link.HELLO + token3.encode()
                                    + link._proof(SECRET, token3))
            assert await loop.sock_recv(sock, 2) == b"OK"
            await loop.sock_sendall(sock, (1000).to_bytes(4, "big") + b"short")
            sock.close()
            try:
                async for _ in call3:
                    pass
                ended = None
            except grpc.aio.AioRpcError as e:
                ended = e.code()
            for c in (call, call2):
                c.cancel()
            return refused, taken, ended, (await stub.Info(worker_pb2.InfoRequest())).name, \
                [port, port2, port3]
        finally:
            await channel.close()
            await cluster.close()

    try:
        refused, taken, ended, name, ports = run(scenario())
    finally:
        local.stop()
    assert ports == [fixed, fixed, fixed]  # SHARDLINE_LINK_PORT
    assert refused == [b"", b"", b""]  # closed without an answer
    assert taken == b"OK"
    assert ended == grpc.StatusCode.UNAVAILABLE
    assert name == "linked"


def test_with_links_off_a_stage_offers_none_and_the_pipeline_stays_exact(model_dir, cache_dir):
    from coordinator.local import LocalWorkers

    path = model_dir(SPEC)
    local = LocalWorkers(2, memory=[1 * GiB, 1 * GiB], cache_dir=cache_dir, names=["o1", "o2"])
    local.env["SHARDLINE_LINK"] = "0"
    addresses = local.start()

    async def scenario():
        cluster = await loaded_cluster(path, addresses)
        try:
            call = cluster.workers[1].stub.Forward(metadata=(
                (PLAN_METADATA_KEY, cluster.plan_id), (link.LINK_KEY, "1")))
            answer = dict(await call.initial_metadata())[link.LINK_KEY]
            call.cancel()
            out = await cluster.pipeline.send(first_step("off").seqs)
            counted = [link_steps(w.info.metrics_port) for w in cluster.workers]
            return answer, [o.token for o in out.outputs], counted
        finally:
            await cluster.close()

    try:
        answer, tokens, counted = run(scenario())
    finally:
        local.stop()
    assert answer == "none"
    assert counted == [{}, {}]  # every step on gRPC
    assert tokens == reference_tokens(path, PROMPT, 1)


def test_frames_larger_than_the_socket_takes_arrive_whole_and_in_order():
    """A prompt chunk's hidden states are megabytes: what the socket does not take at once
    waits for the event loop, later frames queue behind it, and the reader puts each frame
    back together from partial reads."""
    import threading

    frames = [worker_pb2.StageMessage(step_id=i, seqs=[worker_pb2.SeqInput(
        seq_id=f"s{i}", hidden=worker_pb2.Tensor(data=bytes([i % 251]) * size,
                                                 shape=[1, size // 2], dtype="bfloat16"))])
        for i, size in enumerate([3 << 20, 100, 1 << 20, 7, 2 << 20])]

    async def scenario():
        a, b = socket.socketpair()
        a.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 16384)
        a.setblocking(False)
        writer = link.LinkWriter(a)
        got: list[worker_pb2.StageMessage] = []
        ended: list = []
        reader = link.LinkReader(b, 8 << 20,
                                 lambda data, _: got.append(
                                     worker_pb2.StageMessage.FromString(data)),
                                 ended.append)
        sent = threading.Event()

        def send_all() -> None:  # as the MLX thread does: never blocked by the socket
            for msg in frames:
                writer.send(msg)
            sent.set()

        threading.Thread(target=send_all).start()
        loop = asyncio.get_running_loop()
        while not sent.is_set():
            await asyncio.sleep(0.001)
        closing = loop.create_task(writer.close())
        while not ended:  # read in pieces (one recv each) while the loop writes the rest
            await asyncio.sleep(0.001)
            reader.read()
        await closing
        a.close()
        b.close()
        return got, ended

    got, ended = run(scenario())
    assert ended == [None]  # a clean end, after the last frame
    assert [m.step_id for m in got] == [m.step_id for m in frames]
    assert got == frames
