"""TLS (docs/security.md): `coordinator certs`, mutual TLS between coordinator and workers, the
public APIs over TLS, and plain-text or foreign-CA peers refused."""

from __future__ import annotations

import ssl
import stat
import subprocess
import sys
import urllib.request

import grpc
import openai
import pytest
from conftest import ROOT, reference_tokens
from serving_thread import ServingThread

from coordinator.client import Client
from coordinator.demo import ModelSpec
from coordinator.local import LocalWorkers
from protos import inference_pb2, inference_pb2_grpc, worker_pb2, worker_pb2_grpc
from protos.tls import TLS

SPEC = ModelSpec(family="llama")
SECRET = b"a cluster secret of more than sixteen bytes"


def certs(directory, hosts: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "coordinator", "certs", "--dir",
                           str(directory), "--hosts", hosts], cwd=ROOT, capture_output=True,
                          text=True, timeout=60)


@pytest.fixture(scope="module")
def ca_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("certs")
    proc = certs(d, "127.0.0.1,mini1.local")
    assert proc.returncode == 0, proc.stderr
    return d


def tls_args(d, name="127.0.0.1") -> list[str]:
    return ["--tls-cert", str(d / f"{name}.crt"), "--tls-key", str(d / f"{name}.key"),
            "--tls-ca", str(d / "ca.crt")]


@pytest.fixture(scope="module")
def cluster(ca_dir, model_dir, cache_dir):
    """Two workers and a coordinator, all with mutual TLS and the cluster secret."""
    local = LocalWorkers(2, memory=[2 << 30] * 2, cache_dir=cache_dir, secret=SECRET,
                         extra_args=tls_args(ca_dir), names=["t1", "t2"])
    addresses = local.start()
    tls = TLS.load(*(ca_dir / n for n in ("127.0.0.1.crt", "127.0.0.1.key", "ca.crt")))
    try:
        with ServingThread(model_dir(SPEC), addresses, tls=tls, secret=SECRET) as s:
            s.path, s.workers = model_dir(SPEC), addresses
            yield s
    finally:
        local.stop()


def test_certs_makes_a_ca_and_a_certificate_per_name(ca_dir):
    from cryptography import x509

    for name in ("ca", "127.0.0.1", "mini1.local"):
        assert (ca_dir / f"{name}.crt").is_file()
        assert stat.S_IMODE((ca_dir / f"{name}.key").stat().st_mode) == 0o600
    cert = x509.load_pem_x509_certificate((ca_dir / "mini1.local.crt").read_bytes())
    names = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert names.get_values_for_type(x509.DNSName) == ["mini1.local"]
    ca = (ca_dir / "ca.crt").read_bytes()
    proc = certs(ca_dir, "mini2.local")  # a new member: the same CA signs it
    assert proc.returncode == 0 and (ca_dir / "ca.crt").read_bytes() == ca
    bad = certs(ca_dir, "no/slashes")
    assert bad.returncode == 2 and "--hosts" in bad.stderr


def test_mutual_tls_round_trip_is_token_exact(cluster, ca_dir):
    ids = [5, 17, 33, 2, 9, 41]
    with Client(cluster.grpc_address, tls_ca=ca_dir / "ca.crt") as c:
        got = c.generate(ids, max_tokens=12)
    assert got.token_ids == reference_tokens(cluster.path, ids, 12)


def test_https_with_the_openai_client_and_the_ca_file(cluster, ca_dir):
    url = cluster.http_url.replace("http://", "https://") + "/v1"
    http = openai.DefaultHttpxClient(verify=ssl.create_default_context(
        cafile=str(ca_dir / "ca.crt")))
    with openai.OpenAI(base_url=url, api_key="unused", http_client=http, max_retries=0) as c:
        r = c.completions.create(model=cluster.coordinator.model.model_id, prompt="Hello",
                                 max_tokens=5)
    assert r.usage.completion_tokens == 5


def test_plain_text_clients_are_refused(cluster):
    with grpc.insecure_channel(cluster.grpc_address) as channel:
        with pytest.raises(grpc.RpcError) as e:
            inference_pb2_grpc.InferenceStub(channel).ListModels(
                inference_pb2.ListModelsRequest(), timeout=5)
    assert e.value.code() == grpc.StatusCode.UNAVAILABLE
    with pytest.raises(OSError):  # plain HTTP to the HTTPS port: no answer it can read
        urllib.request.urlopen(cluster.http_url + "/health", timeout=5).read()
    with grpc.insecure_channel(cluster.workers[0]) as channel:
        with pytest.raises(grpc.RpcError) as e:
            worker_pb2_grpc.WorkerStub(channel).Info(worker_pb2.InfoRequest(), timeout=5)
    assert e.value.code() == grpc.StatusCode.UNAVAILABLE


def test_a_worker_refuses_a_certificate_its_ca_did_not_sign(cluster, ca_dir, tmp_path):
    assert certs(tmp_path, "127.0.0.1").returncode == 0  # another cluster's CA
    ca = (ca_dir / "ca.crt").read_bytes()
    for key, cert in ((tmp_path / "127.0.0.1.key", tmp_path / "127.0.0.1.crt"), (None, None)):
        creds = grpc.ssl_channel_credentials(
            ca, key.read_bytes() if key else None, cert.read_bytes() if cert else None)
        with grpc.secure_channel(cluster.workers[0], creds) as channel:
            with pytest.raises(grpc.RpcError) as e:
                worker_pb2_grpc.WorkerStub(channel).Info(worker_pb2.InfoRequest(), timeout=5)
        assert e.value.code() == grpc.StatusCode.UNAVAILABLE, key
    # with this cluster's certificate the handshake passes (the secret then decides)
    mine = TLS.load(*(ca_dir / n for n in ("127.0.0.1.crt", "127.0.0.1.key", "ca.crt")))
    with grpc.secure_channel(cluster.workers[0], mine.channel_credentials()) as channel:
        with pytest.raises(grpc.RpcError) as e:
            worker_pb2_grpc.WorkerStub(channel).LoadShard(
                worker_pb2.LoadShardRequest(), timeout=5).next()
    assert e.value.code() == grpc.StatusCode.UNAUTHENTICATED


def test_tls_flags_come_in_threes(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "worker", "serve", "--tls-cert",
                           str(tmp_path / "x.crt")], cwd=ROOT, capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode == 2 and "--tls-key" in proc.stderr and "--tls-ca" in proc.stderr
