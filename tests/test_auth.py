"""The cluster secret and the API key: nobody without them drives a worker or the coordinator."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys

import grpc
import openai
import pytest
from conftest import ROOT, GiB, Serving, reference_tokens, run
from serving_thread import ServingThread, http

from coordinator.client import Client, Unauthenticated
from coordinator.cluster.cluster import ClusterError, WorkerRefused, connect
from coordinator.demo import ModelSpec
from coordinator.local import LocalWorkers
from protos import auth, inference_pb2, inference_pb2_grpc, worker_pb2, worker_pb2_grpc

SPEC = ModelSpec(family="llama")
SECRET = b"0123456789abcdef-a-test-secret"
KEY = "sk-test-key"
PROMPT = [1, 5, 9, 200, 33, 4, 77, 12]
INFO = "/shardline.v1.Worker/Info"


# -- the wire format -----------------------------------------------------------------------
def test_signed_calls_verify_once_within_the_clock_window():
    v = auth.Verifier(SECRET, max_skew=300)
    now = 1_800_000_000.0
    good = auth.sign(SECRET, INFO, now)
    assert v.check(INFO, good, now + 10) is None
    assert "replayed" in v.check(INFO, good, now + 11)
    assert "wrong cluster secret" in v.check(INFO, auth.sign(b"x" * 16, INFO, now), now)
    # bound to its method: a signed Info is no LoadShard
    assert "wrong cluster secret" in v.check("/shardline.v1.Worker/LoadShard",
                                             auth.sign(SECRET, INFO, now), now)
    assert "clock is +400 s" in v.check(INFO, auth.sign(SECRET, INFO, now - 400), now)
    assert "needs the cluster secret" in v.check(INFO, None, now)
    assert "malformed" in v.check(INFO, "v1:zzz", now)
    # nonces are forgotten only after they could no longer pass the clock check
    fresh = auth.sign(SECRET, INFO, now + 700)
    assert v.check(INFO, fresh, now + 700) is None and len(v._seen) == 1


def test_a_worker_proof_needs_the_secret_and_the_challenge():
    proof = auth.prove(SECRET, b"challenge-1")
    assert auth.proves(SECRET, b"challenge-1", proof)
    assert not auth.proves(SECRET, b"challenge-2", proof)
    assert not auth.proves(b"another-secret-16", b"challenge-1", proof)


def test_secrets_come_from_files_or_the_environment(tmp_path, monkeypatch):
    monkeypatch.delenv(auth.SECRET_ENV, raising=False)
    assert auth.read_secret(None) is None
    (tmp_path / "s").write_text(SECRET.decode() + "\n")
    assert auth.read_secret(tmp_path / "s") == SECRET
    monkeypatch.setenv(auth.SECRET_ENV, "from-the-environment-1")
    assert auth.read_secret(None) == b"from-the-environment-1"
    (tmp_path / "short").write_text("s3cret")
    with pytest.raises(auth.AuthError, match="6 bytes; use at least 16"):
        auth.read_secret(tmp_path / "short")
    with pytest.raises(auth.AuthError, match="cannot read the cluster secret file"):
        auth.read_secret(tmp_path / "missing")


@pytest.mark.parametrize("command", [("coordinator", "serve", "--demo"),
                                     ("worker", "serve", "--no-advertise")])
def test_unusable_secret_files_are_one_line_errors(command, tmp_path):
    (tmp_path / "short").write_text("s3cret\n")
    for path, words in ((tmp_path / "short", "at least 16"), (tmp_path / "none", "cannot read")):
        proc = subprocess.run([sys.executable, "-m", *command, "--secret-file", str(path)],
                              cwd=ROOT, capture_output=True, text=True, timeout=60)
        last = proc.stderr.strip().splitlines()[-1]
        assert proc.returncode == 2 and "Traceback" not in proc.stderr
        assert last.startswith("error: ") and words in last, proc.stderr


# -- workers with a secret ---------------------------------------------------------------------
@pytest.fixture(scope="module")
def secured(cache_dir):
    """Two workers started with the cluster secret (given through the environment)."""
    local = LocalWorkers(2, memory=[1 * GiB, 2 * GiB], cache_dir=cache_dir, names=["a1", "a2"],
                         secret=SECRET)
    try:
        yield local.start()
    finally:
        local.stop()


async def raw_call(address: str, method: str, request, metadata=()) -> grpc.StatusCode:
    """Call a worker without the coordinator's help; the status code it ends with."""
    async with grpc.aio.insecure_channel(address) as channel:
        stub = worker_pb2_grpc.WorkerStub(channel)
        try:
            if method == "Forward":
                # no write first: a message racing the refusal can end the call as INTERNAL
                # on the client (grpc core), which hides the status the worker sent
                call = stub.Forward(metadata=metadata)
                await call.read()
            elif method == "LoadShard":
                async for _ in stub.LoadShard(request, metadata=metadata):
                    pass
            else:
                await stub.Info(request, metadata=metadata, timeout=5)
        except grpc.aio.AioRpcError as e:
            return e.code(), e.details()
    return grpc.StatusCode.OK, ""


def test_a_secured_cluster_serves_and_strangers_are_refused(model_dir, secured, workers):
    path = model_dir(SPEC)
    expected = reference_tokens(path, PROMPT, 24)
    load = worker_pb2.LoadShardRequest(spec=worker_pb2.ShardSpec(model_path=str(path)))

    async def scenario():
        out = {}
        async with Serving(path, secured, secret=SECRET) as s:
            # through both workers: stage 0 signs its own calls to stage 1
            out["tokens"], _, _ = await s.generate(PROMPT, 24)
            # a stranger on the LAN, at each worker and at each kind of call
            for i, address in enumerate(secured):
                for method, request in (("Info", worker_pb2.InfoRequest()),
                                        ("LoadShard", load), ("Forward", None)):
                    out[f"{i}-{method}"] = await raw_call(address, method, request)
            wrong = (auth.AUTH_KEY, auth.sign(b"not-the-secret-16", INFO))
            out["wrong"] = await raw_call(secured[0], "Info", worker_pb2.InfoRequest(), (wrong,))
            signed = (auth.AUTH_KEY, auth.sign(SECRET, INFO))
            out["signed"] = await raw_call(secured[0], "Info", worker_pb2.InfoRequest(),
                                           (signed,))
            out["replay"] = await raw_call(secured[0], "Info", worker_pb2.InfoRequest(),
                                           (signed,))
            # the cluster still serves after all that
            out["again"], _, _ = await s.generate(PROMPT, 24)
            # a worker that does not know the secret, announced on mDNS: left out, with why
            host, port = workers[0].rsplit(":", 1)
            m = s.coordinator.membership
            m._on_seen("impostor._shardline._tcp.local.", None, [host], int(port), "")
            member = m.table.members["impostor._shardline._tcp.local."]
            while not member.reason:
                await asyncio.sleep(0.01)
            out["impostor"] = member.status()
        return out

    out = run(scenario())
    assert out["tokens"] == expected and out["again"] == expected
    for i in (0, 1):
        for method in ("Info", "LoadShard", "Forward"):
            code, details = out[f"{i}-{method}"]
            assert code == grpc.StatusCode.UNAUTHENTICATED, (method, code, details)
            assert "needs the cluster secret" in details
    assert out["wrong"][0] == grpc.StatusCode.UNAUTHENTICATED
    assert "wrong cluster secret" in out["wrong"][1]
    assert out["signed"] == (grpc.StatusCode.OK, "")
    assert out["replay"][0] == grpc.StatusCode.UNAUTHENTICATED and "replayed" in out["replay"][1]
    assert out["impostor"].startswith("excluded: worker") and "cannot prove the cluster " \
        "secret" in out["impostor"], out["impostor"]


def test_coordinators_without_the_secret_and_workers_without_it_are_refused(secured, workers):
    async def scenario():
        errors = {}
        for name, address, secret in (("no secret", secured[0], None),
                                      ("wrong secret", secured[0], b"another-secret-16"),
                                      ("impostor", workers[0], SECRET)):
            with pytest.raises(WorkerRefused) as e:
                await connect(address, secret=secret)
            errors[name] = str(e.value)
        ok = await connect(secured[0], secret=SECRET)
        await ok.channel.close()
        return errors

    errors = run(scenario())
    assert "refused this coordinator: this worker needs the cluster secret" in errors["no secret"]
    assert "wrong cluster secret" in errors["wrong secret"]
    assert "cannot prove the cluster secret" in errors["impostor"]
    assert issubclass(WorkerRefused, ClusterError)


def test_serve_without_the_secret_exits_with_one_line(secured, model_dir, monkeypatch):
    env = {k: v for k, v in os.environ.items() if k != auth.SECRET_ENV}
    proc = subprocess.run(
        [sys.executable, "-m", "coordinator", "serve", "--model", str(model_dir(SPEC)),
         "--workers", secured[0], "--no-discover", "--grpc-port", "0", "--http-port", "0"],
        cwd=ROOT, capture_output=True, text=True, timeout=60, env=env)
    last = proc.stderr.strip().splitlines()[-1]
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
    assert last.startswith("error: worker at") and "needs the cluster secret" in last


# -- the API key -------------------------------------------------------------------------------
def test_the_api_key_guards_both_apis_and_leaves_health_and_metrics_open(model_dir, workers):
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    with ServingThread(model_dir(SPEC), workers[:1], api_key=KEY) as s:
        url = s.http_url
        # HTTP: OpenAI's 401 shape without the key, served with it
        status, body = http("GET", url + "/v1/models")
        assert status == 401 and body["error"]["code"] == "invalid_api_key"
        status, _ = http("POST", url + "/v1/completions", b'{"prompt": "hi", "max_tokens": 2}')
        assert status == 401
        with openai.OpenAI(base_url=url + "/v1", api_key="wrong", max_retries=0) as c, \
                pytest.raises(openai.AuthenticationError):
            c.models.list()
        with openai.OpenAI(base_url=url + "/v1", api_key=KEY, max_retries=0) as c:
            out = c.completions.create(model=s.coordinator.model.model_id, prompt="Once",
                                       max_tokens=3)
            assert out.usage.completion_tokens == 3
        assert http("GET", url + "/health")[0] == 200
        import urllib.request
        with urllib.request.urlopen(url + "/metrics", timeout=10) as r:
            assert r.status == 200 and b"shardline_requests_running" in r.read()

        # gRPC: UNAUTHENTICATED without the key; health and reflection stay open
        with Client(s.grpc_address) as c, pytest.raises(Unauthenticated, match="API key"):
            c.generate("Once", max_tokens=2)
        with Client(s.grpc_address, api_key=KEY) as c:
            assert len(c.generate("Once", max_tokens=2).token_ids) == 2
        with grpc.insecure_channel(s.grpc_address) as channel:
            health = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest())
            assert health.status == health_pb2.HealthCheckResponse.SERVING
            stub = inference_pb2_grpc.InferenceStub(channel)
            with pytest.raises(grpc.RpcError) as e:
                stub.GetCluster(inference_pb2.GetClusterRequest())
            assert e.value.code() == grpc.StatusCode.UNAUTHENTICATED

        # the CLI reads the key from the environment
        env = {**os.environ, auth.API_KEY_ENV: KEY}
        ok = subprocess.run([sys.executable, "-m", "coordinator", "status", "--address",
                             s.grpc_address], cwd=ROOT, capture_output=True, text=True,
                            timeout=60, env=env)
        env.pop(auth.API_KEY_ENV)
        refused = subprocess.run([sys.executable, "-m", "coordinator", "status", "--address",
                                  s.grpc_address], cwd=ROOT, capture_output=True, text=True,
                                 timeout=60, env=env)
    assert ok.returncode == 0 and "serving" in ok.stdout, ok.stderr
    assert refused.returncode == 2 and "SHARDLINE_API_KEY" in refused.stderr

