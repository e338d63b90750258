"""grpc.health.v1 on workers and the coordinator, `worker/coordinator health`, the HEALTHCHECK."""

from __future__ import annotations

import asyncio
import importlib.util
import json
import signal
import subprocess
import sys
import time

import grpc
import pytest
from conftest import ROOT, run
from grpc_health.v1 import health_pb2, health_pb2_grpc

from coordinator.local import LocalWorkers
from protos import auth, inference_pb2, inference_pb2_grpc, worker_pb2, worker_pb2_grpc

SECRET = b"a cluster secret of more than sixteen bytes"
WORKER_SERVICE = "shardline.v1.Worker"
SERVING, NOT_SERVING = (health_pb2.HealthCheckResponse.SERVING,
                        health_pb2.HealthCheckResponse.NOT_SERVING)


def cli(program: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", program, *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=60)


def status(channel: grpc.Channel, service: str = "") -> int:
    return health_pb2_grpc.HealthStub(channel).Check(
        health_pb2.HealthCheckRequest(service=service), timeout=10).status


@pytest.fixture(scope="module")
def certs(tmp_path_factory):
    d = tmp_path_factory.mktemp("certs")
    proc = cli("coordinator", "certs", "--dir", str(d), "--hosts", "mini1.local,127.0.0.1")
    assert proc.returncode == 0, proc.stderr
    return d


def tls_args(d, name: str) -> list[str]:
    return ["--tls-cert", str(d / f"{name}.crt"), "--tls-key", str(d / f"{name}.key"),
            "--tls-ca", str(d / "ca.crt")]


@pytest.fixture(scope="module")
def secret_worker(tmp_path_factory):
    with LocalWorkers(1, memory=[1 << 30], secret=SECRET, names=["h1"],
                      cache_dir=tmp_path_factory.mktemp("cache")) as addresses:
        yield addresses[0]


def test_worker_health_answers_without_the_secret_and_nothing_else_does(secret_worker):
    with grpc.insecure_channel(secret_worker) as channel:
        assert status(channel) == SERVING
        assert status(channel, WORKER_SERVICE) == SERVING
        watch = health_pb2_grpc.HealthStub(channel).Watch(health_pb2.HealthCheckRequest(),
                                                          timeout=10)
        assert next(watch).status == SERVING
        watch.cancel()
        stub = worker_pb2_grpc.WorkerStub(channel)
        for call in (lambda: stub.Info(worker_pb2.InfoRequest(), timeout=10),
                     lambda: stub.Want(worker_pb2.ShardFiles(), timeout=10),
                     lambda: next(stub.LoadShard(worker_pb2.LoadShardRequest(), timeout=10)),
                     lambda: next(stub.Results(worker_pb2.ResultsRequest(), timeout=10)),
                     lambda: next(stub.Put(iter(()), timeout=10)),
                     lambda: next(stub.Forward(iter(()), timeout=10))):
            with pytest.raises(grpc.RpcError) as e:
                call()
            assert e.value.code() == grpc.StatusCode.UNAUTHENTICATED, e.value
    # a signed call still works: the secret guards what it guarded
    async def signed_info() -> str:
        async with auth.worker_channel(secret_worker, SECRET, []) as channel:
            return (await worker_pb2_grpc.WorkerStub(channel).Info(
                worker_pb2.InfoRequest(), timeout=10)).name
    assert run(signed_info()) == "h1"

    proc = cli("worker", "health", "--address", secret_worker)
    assert (proc.returncode, proc.stdout.strip()) == (0, "SERVING"), proc.stderr
    proc = cli("worker", "health", "--address", secret_worker, "--service", "no.such.Service")
    assert (proc.returncode, proc.stdout.strip()) == (1, "SERVICE_UNKNOWN")


def test_worker_health_goes_not_serving_on_sigterm_before_the_port_closes(tmp_path):
    ready = tmp_path / "ready.json"
    proc = subprocess.Popen(
        [sys.executable, "-m", "worker", "serve", "--host", "127.0.0.1", "--port", "0",
         "--no-advertise", "--memory", "1GiB", "--name", "stopping", "--cache-dir",
         str(tmp_path), "--ready-file", str(ready)],
        cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 60
        while not ready.exists():
            assert proc.poll() is None and time.monotonic() < deadline, proc.stderr.read()
            time.sleep(0.05)
        address = f"127.0.0.1:{json.loads(ready.read_text())['port']}"
        with grpc.insecure_channel(address) as channel:
            watch = health_pb2_grpc.HealthStub(channel).Watch(
                health_pb2.HealthCheckRequest(), timeout=30)
            assert next(watch).status == SERVING
            proc.send_signal(signal.SIGTERM)
            assert next(watch).status == NOT_SERVING
        assert proc.wait(30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert cli("worker", "health", "--address", address, "--timeout", "2").returncode == 1


def test_worker_health_over_mutual_tls(certs, tmp_path):
    # the worker's certificate names mini1.local, not the address it is reached at
    with LocalWorkers(1, memory=[1 << 30], secret=SECRET, names=["tls"], cache_dir=tmp_path,
                      extra_args=tls_args(certs, "mini1.local")) as (address,):
        # its own certificate will do as the client's (what the container HEALTHCHECK does);
        # the name it expects is the first in --tls-cert
        proc = cli("worker", "health", "--address", address, *tls_args(certs, "mini1.local"))
        assert (proc.returncode, proc.stdout.strip()) == (0, "SERVING"), proc.stderr
        proc = cli("worker", "health", "--address", address, *tls_args(certs, "127.0.0.1"),
                   "--tls-server-name", "mini1.local")
        assert proc.returncode == 0, proc.stderr
        # no client certificate, plain text, a name the certificate lacks: no answer
        for args in (["--tls-ca", str(certs / "ca.crt"), "--tls-server-name", "mini1.local"],
                     [], [*tls_args(certs, "127.0.0.1")]):
            proc = cli("worker", "health", "--address", address, "--timeout", "3", *args)
            assert proc.returncode == 1 and proc.stderr.startswith("error: "), args
        proc = cli("worker", "health", "--tls-cert", str(certs / "ca.crt"))
        assert proc.returncode == 2 and "--tls-key" in proc.stderr

        # the image's HEALTHCHECK reads the worker's own command line and asks the same way
        healthcheck = _healthcheck()
        port = address.rpartition(":")[2]
        argv = healthcheck.probe_argv("worker", ["serve", "--port", port,
                                                 *tls_args(certs, "mini1.local")])
        proc = cli("worker", *argv)
        assert (proc.returncode, proc.stdout.strip()) == (0, "SERVING"), proc.stderr


def _healthcheck():
    spec = importlib.util.spec_from_file_location("healthcheck",
                                                  ROOT / "deploy/docker/healthcheck.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_coordinator_liveness_serves_while_the_cluster_cannot(certs):
    """The API server as a coordinator starts it before its shards load, over TLS with an API
    key: the whole server NOT_SERVING, `liveness` SERVING, both open without the key."""
    from coordinator.api.service import InferenceService, start_server
    from coordinator.app import OPEN_GRPC
    from protos.tls import TLS

    tls = TLS.load(*(certs / n for n in ("mini1.local.crt", "mini1.local.key", "ca.crt")))
    healthcheck = _healthcheck()

    async def scenario() -> dict:
        server, _, port = await start_server(
            InferenceService(None, None), "127.0.0.1", 0,
            interceptors=[auth.api_key_auth("k" * 24, OPEN_GRPC)],
            credentials=tls.server_credentials(require_client_cert=False))
        try:
            argv = healthcheck.probe_argv("coordinator", [
                "serve", "--demo", "--host", "127.0.0.1", "--grpc-port", str(port),
                *tls_args(certs, "mini1.local")])
            seen = {"image": await asyncio.to_thread(cli, "coordinator", *argv),
                    "liveness": await asyncio.to_thread(cli, "coordinator", *argv,
                                                        "--service", "liveness")}
            creds = grpc.ssl_channel_credentials((certs / "ca.crt").read_bytes())
            options = [("grpc.ssl_target_name_override", "mini1.local")]
            async with grpc.aio.secure_channel(f"127.0.0.1:{port}", creds,
                                               options=options) as channel:
                try:
                    await inference_pb2_grpc.InferenceStub(channel).ListModels(
                        inference_pb2.ListModelsRequest(), timeout=10)
                except grpc.aio.AioRpcError as e:
                    seen["api"] = e.code()
            return seen
        finally:
            await server.stop(None)

    seen = run(scenario())
    assert (seen["image"].returncode, seen["image"].stdout.strip()) == (1, "NOT_SERVING"), \
        seen["image"].stderr
    assert (seen["liveness"].returncode, seen["liveness"].stdout.strip()) == (0, "SERVING")
    assert seen["api"] == grpc.StatusCode.UNAUTHENTICATED


def test_a_stopping_worker_says_so_in_info_and_no_coordinator_takes_it(tmp_path):
    # in its shutdown grace a worker still answers: a coordinator that dialled it then took it
    # back into a plan, and excluded it when its load failed
    import contextlib

    from coordinator.cluster.cluster import dial
    from protos.health import Health
    from worker.backend import detect
    from worker.server import WORKER_SERVICE, WorkerConfig, serve

    async def scenario():
        health = Health((WORKER_SERVICE,))
        port = asyncio.get_running_loop().create_future()
        config = WorkerConfig(node_id="n1", name="leaving", hardware=detect(),
                              cache_dir=tmp_path)
        task = asyncio.create_task(serve(config, "127.0.0.1", 0, port.set_result,
                                         health=health))
        address = f"127.0.0.1:{await port}"
        try:
            before = await dial(address)
            assert before is not None and not before.info.stopping
            await before.channel.close()
            await health.stopping()  # what SIGTERM does first (worker/advertise.py)
            assert await dial(address) is None
            async with grpc.aio.insecure_channel(address) as channel:
                info = await worker_pb2_grpc.WorkerStub(channel).Info(worker_pb2.InfoRequest())
            assert info.stopping and info.name == "leaving"
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    run(scenario())
