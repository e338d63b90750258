"""Hostile input on every listening port (Hypothesis): each gets a clear error or is dropped,
nothing crashes or leaks, and valid requests still come out token for token exact.

One cluster of processes for the module (tests/hostile.py): two workers and a coordinator
sharing a cluster secret. Its RSS and open file descriptors are taken after a warm-up and
checked again at the end. Examples are derandomized (the same inputs on every run)."""

from __future__ import annotations

import json
import socket
import time

import grpc
import pytest
from conftest import reference_tokens
from hostile import MAX_TOKENS, PROMPT, Cluster, host_port, post, raw_http, settle, signed
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from coordinator.demo import ModelSpec
from protos import inference_pb2, worker_pb2

pytestmark = pytest.mark.slow


def budget(n: int) -> settings:
    return settings(max_examples=n, deadline=None, derandomize=True, database=None,
                    suppress_health_check=list(HealthCheck))


# A refusal names the problem; these are the codes a hostile call may end with (never
# UNKNOWN or INTERNAL: those mean an unhandled error).
REFUSALS = {grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND,
            grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.FAILED_PRECONDITION,
            grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.UNIMPLEMENTED,
            grpc.StatusCode.OUT_OF_RANGE, grpc.StatusCode.UNAVAILABLE}
HTTP_REFUSALS = {400, 401, 404, 405, 413, 415, 422, 429, 431}
API = "/shardline.v1.Inference/"
POSTS = ["/v1/chat/completions", "/v1/completions", "/v1/messages", "/v1/responses",
         "/api/chat", "/api/generate"]

CLUSTER: Cluster | None = None
COUNT = {"inputs": 0}


@pytest.fixture(scope="module")
def cluster(model_dir, cache_dir, tmp_path_factory):
    global CLUSTER
    model = model_dir(ModelSpec(family="llama"))
    c = Cluster(model, cache_dir, tmp_path_factory.mktemp("hostile")).start()
    c.expected = reference_tokens(model, PROMPT, MAX_TOKENS)
    assert c.generate() == c.expected
    # warm-up: one of each kind of call, so that lazily built things are in the baseline
    post(c.http, "/v1/completions", json.dumps({"prompt": "hi", "max_tokens": 2}).encode())
    raw_http(c.http, b"GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    for address in c.metrics:
        raw_http(address, b"GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    c.baseline = c.usage()
    CLUSTER = c
    try:
        yield c
    finally:
        c.stop()


def counted(_answer: object = None) -> None:
    """One more hostile input answered; every 50, check that no process died."""
    COUNT["inputs"] += 1
    assert CLUSTER is not None
    if COUNT["inputs"] % 50 == 0:
        CLUSTER.alive()


def outcome(call) -> grpc.StatusCode:
    """Run a call, reading at most its first answer (then cancelling): its status code."""
    try:
        if hasattr(call, "__next__"):
            next(call, None)
            call.cancel()
            code = call.code()
            return grpc.StatusCode.OK if code == grpc.StatusCode.CANCELLED else code
        return grpc.StatusCode.OK
    except grpc.RpcError as e:
        return e.code()


def check_code(code: grpc.StatusCode, what: object) -> None:
    assert code == grpc.StatusCode.OK or code in REFUSALS, (code, what)
    counted(code)


# -- the public gRPC API ------------------------------------------------------------------------
@budget(200)
@given(data=st.binary(max_size=400),
       method=st.sampled_from(["Generate", "Chat", "ListModels", "GetCluster", "Nope"]))
def test_public_grpc_takes_malformed_protobuf(cluster, data, method):
    path = API + method
    if method in ("Generate", "Chat", "Nope"):
        call = cluster.channel.unary_stream(path)(data, timeout=10)
    else:
        call = None
        try:
            cluster.channel.unary_unary(path)(data, timeout=10)
        except grpc.RpcError as e:
            check_code(e.code(), (method, data))
            return
    check_code(outcome(call) if call is not None else grpc.StatusCode.OK, (method, data))


ABSURD_FLOAT = st.floats(width=32) | st.sampled_from(
    [0.0, -0.0, 1e-45, -1.0, 3.4e38, -3.4e38, float("inf"), float("-inf"), float("nan")])
ABSURD_INT = st.integers(-2**31, 2**31 - 1) | st.sampled_from([-1, 0, 1, 2**31 - 1, -2**31])
SMALL_TEXT = st.text(max_size=12)


@budget(200)
@given(fields=st.fixed_dictionaries({}, optional={
    "temperature": ABSURD_FLOAT, "top_p": ABSURD_FLOAT, "top_k": ABSURD_INT,
    "min_p": ABSURD_FLOAT, "repetition_penalty": ABSURD_FLOAT,
    "seed": st.integers(0, 2**64 - 1), "logprobs": ABSURD_INT,
    "max_tokens": ABSURD_INT | st.integers(1, 3),
    "stop": st.lists(SMALL_TEXT, max_size=6), "regex": SMALL_TEXT,
    "json_schema": SMALL_TEXT, "choice": st.lists(SMALL_TEXT, max_size=4),
    "json_object": st.booleans()}),
    prompt=st.lists(ABSURD_INT | st.integers(0, 511), min_size=0, max_size=8))
def test_public_grpc_takes_absurd_sampling_params(cluster, fields, prompt):
    req = inference_pb2.GenerateRequest(prompt_token_ids=prompt,
                                        sampling=inference_pb2.SamplingParams(**fields))
    check_code(outcome(cluster.stub.Generate(req, timeout=20)), req)


# -- the HTTP API and the metrics endpoints ------------------------------------------------------
INF = "@@inf@@"  # written as the bare number 1e999 (which Python's json reads as infinity)
JSON_LEAF = (st.none() | st.booleans() | SMALL_TEXT
             | st.integers(-2**70, 2**70) | st.floats(allow_nan=False, allow_infinity=False)
             | st.sampled_from([1e308, -1e308, 10**400, "1e999", -1, 0, INF]))
FIELDS = ["model", "messages", "prompt", "max_tokens", "temperature", "top_p", "top_k", "stream",
          "stop", "seed", "logprobs", "top_logprobs", "n", "tools", "tool_choice", "input",
          "system", "options", "response_format", "stream_options", "role", "content"]
JSON_VALUE = st.recursive(JSON_LEAF, lambda inner: st.lists(inner, max_size=4) | st.dictionaries(
    st.sampled_from(FIELDS) | SMALL_TEXT, inner, max_size=5), max_leaves=20)
BODY = st.dictionaries(st.sampled_from(FIELDS), JSON_VALUE, max_size=6) | JSON_VALUE


def http_ok(status: int, what: object) -> None:
    """A refusal (4xx) or an answer (200); never a crash (500) or no answer."""
    assert status == 200 or status in HTTP_REFUSALS or status == 503, (status, what)
    counted(status)


@budget(250)
@given(path=st.sampled_from(POSTS), body=BODY)
def test_http_takes_wrong_types_and_absurd_numbers(cluster, path, body):
    if isinstance(body, dict) and body.get("stream") is True:
        body["stream"] = False  # a streamed answer is read to its end below anyway
    data = json.dumps(body).replace(f'"{INF}"', "1e999").encode()
    status, _ = post(cluster.http, path, data)
    http_ok(status, (path, body))


@budget(100)
@given(path=st.sampled_from(POSTS), data=st.binary(max_size=300),
       kind=st.sampled_from(["application/json", "text/plain", "application/json; charset=x"]))
def test_http_takes_bytes_that_are_not_json_or_not_utf8(cluster, path, data, kind):
    status, _ = post(cluster.http, path, b'{"prompt": "' + data + b'"}' if data[:1] == b"a"
                     else data, content_type=kind)
    http_ok(status, (path, data, kind))


@budget(100)
@given(method=st.sampled_from(["GET", "POST", "PUT", "DELETE", "OPTIONS", "HEAD", "BREW"]),
       path=st.sampled_from(["/metrics", "/health", "/sd/workers", "/v1/models", "/", "/api/tags"])
       | st.text(alphabet="/abc%?=&.~", max_size=30).map(lambda s: "/" + s),
       query=st.text(alphabet="abc=&%;\x7f", max_size=40),
       target=st.integers(0, 2))
def test_metrics_and_routes_take_any_method_path_and_query(cluster, method, path, query, target):
    address = [cluster.http, *cluster.metrics][target]
    status, _ = raw_http(address, f"{method} {path}?{query} HTTP/1.1\r\nHost: x\r\n"
                         f"Content-Length: 0\r\nConnection: close\r\n\r\n".encode())
    assert status in (200, 501) or 400 <= status < 500 or status == 503, (status, method, path)
    counted(status)


def test_http_takes_huge_and_deeply_nested_json(cluster):
    cases = {
        "nested": b"[" * 200_000 + b"]" * 200_000,
        "nested objects": b'{"a":' * 100_000 + b"1" + b"}" * 100_000,
        "huge prompt": json.dumps({"prompt": "the dog " * 1_000_000, "max_tokens": 1}).encode(),
        "many keys": json.dumps({f"k{i}": i for i in range(200_000)}).encode(),
    }
    for name, body in cases.items():
        status, answer = post(cluster.http, "/v1/completions", body, timeout=120)
        assert status in (400, 413), (name, status, answer[:200])
        counted(status)
    # a body over the limit is refused as soon as its length is known: from the header
    with socket.create_connection(host_port(cluster.http), timeout=30) as s:
        s.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: "
                  b"application/json\r\nContent-Length: 73400320\r\n\r\n{\"prompt\": \"")
        answer = b""
        while b"bytes" not in answer and (chunk := s.recv(65536)):
            answer += chunk
    assert answer.startswith(b"HTTP/1.1 413") and b"73400320 bytes" in answer, answer
    counted(413)
    cluster.alive()


# -- the workers' gRPC port ----------------------------------------------------------------------
WORKER = "/shardline.v1.Worker/"
# (method, request streams, response streams); LoadShard is left out when signed: a caller
# holding the cluster secret may replace the shard, by design
WORKER_METHODS = [("Info", False, False), ("Want", False, False), ("Put", True, True),
                  ("Forward", True, True), ("Results", False, True), ("LoadShard", False, True),
                  ("Nope", False, False)]


def worker_call(channel, method: str, streams_in: bool, streams_out: bool, data: list[bytes],
                metadata):
    path = WORKER + method
    kind = {(False, False): channel.unary_unary, (False, True): channel.unary_stream,
            (True, False): channel.stream_unary, (True, True): channel.stream_stream}
    call = kind[streams_in, streams_out](path)
    request = iter(data) if streams_in else (data[0] if data else b"")
    try:
        result = call(request, metadata=metadata, timeout=10)
    except grpc.RpcError as e:
        return e.code()
    return outcome(result) if streams_out else grpc.StatusCode.OK


@budget(150)
@given(spec=st.sampled_from(WORKER_METHODS), data=st.lists(st.binary(max_size=200), max_size=3),
       keyed=st.booleans(), which=st.integers(0, 1))
def test_worker_port_takes_malformed_protobuf(cluster, spec, data, keyed, which):
    method, streams_in, streams_out = spec
    if keyed and method == "LoadShard":
        keyed = False
    metadata = signed(WORKER + method) if keyed else None
    if keyed and method == "Forward":  # on the stream of the plan it serves: parsed, then run
        plan = cluster.infos[which].shard.spec.plan_id
        metadata = (("x-shardline-plan", plan), *metadata)
    code = worker_call(cluster.worker_channels[which], method, streams_in, streams_out, data,
                       metadata)
    if not keyed and method != "Nope":
        assert code == grpc.StatusCode.UNAUTHENTICATED, (method, code)
    check_code(code, (method, data, keyed))


BYTES_PER = {"bfloat16": 2, "float16": 2, "float32": 4, "int32": 4, "uint32": 4}
DTYPE = st.sampled_from([*BYTES_PER, "int8", "", "complex64", "bfloat16\x00"])
HIDDEN = 64  # the demo llama's hidden size
# a hidden state of the right shape with random bits (NaN, inf) or of a wrong shape, dtype
# or byte length
TENSOR = st.one_of(
    st.integers(1, 4).flatmap(lambda n: st.binary(min_size=2 * n * HIDDEN,
                                                  max_size=2 * n * HIDDEN).map(
        lambda b, n=n: worker_pb2.Tensor(data=b, shape=[1, n, HIDDEN], dtype="bfloat16"))),
    st.builds(lambda shape, dtype, extra: worker_pb2.Tensor(
        data=bytes(max(0, min(1 << 16, _count(shape)) * BYTES_PER.get(dtype, 1) + extra)),
        shape=shape, dtype=dtype),
        st.lists(st.integers(-3, 70_000) | st.sampled_from([0, 1, 2**31, -2**62]),
                 max_size=4), DTYPE, st.integers(-3, 3)),
    st.builds(worker_pb2.Tensor, data=st.binary(max_size=64),
              shape=st.lists(ABSURD_INT, max_size=5), dtype=DTYPE))


def _count(shape: list[int]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


SEQ = st.builds(
    worker_pb2.SeqInput,
    seq_id=st.sampled_from(["", "s1", "unknown", "x" * 300]) | SMALL_TEXT,
    token_ids=st.lists(ABSURD_INT | st.integers(0, 511), max_size=6),
    hidden=st.none() | TENSOR, start=st.booleans(), sample=st.booleans(),
    sampling=st.none() | st.builds(
        inference_pb2.SamplingParams, temperature=ABSURD_FLOAT, top_p=ABSURD_FLOAT,
        top_k=ABSURD_INT, min_p=ABSURD_FLOAT, repetition_penalty=ABSURD_FLOAT,
        logprobs=ABSURD_INT, seed=st.integers(0, 2**64 - 1)),
    offset=ABSURD_INT | st.integers(0, 4), fork_from=st.sampled_from(["", "s1"]) | SMALL_TEXT,
    fork_length=ABSURD_INT, draft=ABSURD_INT | st.integers(0, 2),
    grammar=st.sampled_from(["", "start: \"a\"", "%%%"]) | SMALL_TEXT,
    output_offset=ABSURD_INT)
# a sequence started properly on the first stage (and then never released by its sender)
STARTED = st.builds(lambda sid, ids: worker_pb2.SeqInput(seq_id=f"v{sid}", token_ids=ids,
                                                          start=True, offset=0, sample=True),
                    st.integers(0, 10**9), st.lists(st.integers(0, 511), min_size=1, max_size=4))
STEPS = st.lists(st.builds(
    lambda seqs, release, error: worker_pb2.StageMessage(seqs=seqs, release=release,
                                                          error=error),
    st.lists(SEQ | STARTED, max_size=3), st.lists(st.sampled_from(["s1", "unknown"]) | SMALL_TEXT,
                                        max_size=2), st.sampled_from(["", "", "", "junk"])),
    min_size=1, max_size=4)
SESSIONS: list[int] = []
STEP_IDS = iter(range(2**50, 2**51))  # far above any step id the coordinator uses


@budget(200)
@given(steps=STEPS, which=st.integers(0, 1))
def test_worker_forward_takes_hostile_steps(cluster, steps, which):
    """Signed steps on a stage's Forward stream (of the plan it serves): unknown sequences,
    token ids outside the vocabulary, hidden states of wrong shapes, dtypes or lengths,
    absurd sampling. Each fails as a step error; the stream and the worker go on."""
    if not SESSIONS:  # what the stages hold before the first hostile step (the prefix cache)
        SESSIONS.extend(cluster.info(i).sessions for i in range(2))
    plan = cluster.infos[which].shard.spec.plan_id
    for msg in steps:
        msg.step_id = next(STEP_IDS)
    method = WORKER + "Forward"
    call = cluster.worker_channels[which].stream_stream(
        method, request_serializer=worker_pb2.StageMessage.SerializeToString,
        response_deserializer=worker_pb2.StageResult.FromString)
    try:
        answers = list(call(iter(steps), metadata=(("x-shardline-plan", plan),
                                                   *signed(method)), timeout=30))
        code = grpc.StatusCode.OK
    except grpc.RpcError as e:
        code, answers = e.code(), []
    check_code(code, steps)
    assert all(a.error or a.outputs or not a.step_id for a in answers)


def test_a_hostile_stream_leaves_no_sessions_behind(cluster):
    """Sequences a Forward stream started are freed when it ends (the hostile steps above
    started many): the stages hold what they held before."""
    counts = {}

    def same() -> bool:
        counts.update({i: cluster.info(i).sessions for i in range(2)})
        return all(counts[i] <= SESSIONS[i] for i in range(2))

    assert SESSIONS and settle(same, timeout=30), (counts, SESSIONS)


def test_slowloris_and_a_connection_flood_are_let_go(cluster):
    """Clients that open HTTP and never finish a request, and a flood of connections that
    open and close at once, on every port: valid requests are served meanwhile, and the
    servers let the slow ones go (their descriptors come back) without the clients closing."""
    ports = [cluster.http, *cluster.metrics]
    slow = []
    for address in ports:
        for _ in range(40):
            s = socket.create_connection(host_port(address), timeout=30)
            s.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Le")
            slow.append(s)
    for address in [cluster.grpc, *cluster.worker_addresses, *ports]:
        for _ in range(150):
            with socket.create_connection(host_port(address), timeout=30):
                pass
    t0 = time.monotonic()
    assert cluster.generate() == cluster.expected  # served while they hang
    status, _ = post(cluster.http, "/v1/completions",
                     json.dumps({"prompt": "hi", "max_tokens": 2}).encode())
    assert status == 200
    for address in cluster.metrics:
        assert raw_http(address, b"GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close"
                        b"\r\n\r\n")[0] == 200
    COUNT["inputs"] += len(slow) + 150 * 6

    try:
        held = lambda: not any(map(_pending, slow))  # noqa: E731
        assert settle(held, timeout=60), "slow clients are still held"
        print(f"\nslow clients let go after {time.monotonic() - t0:.1f}s")
    finally:
        for s in slow:
            s.close()


def _pending(s: socket.socket) -> bool:
    """True while the server neither answered nor closed this connection."""
    s.setblocking(False)
    try:
        s.recv(1, socket.MSG_PEEK)
        return False
    except BlockingIOError:
        return True
    except OSError:
        return False


def test_afterwards_valid_requests_are_exact_and_nothing_leaked(cluster):
    """Runs last: every process alive, exact output, memory and descriptors near where they
    were after the warm-up (RSS within 64 MiB or 25%; descriptors within 16)."""
    cluster.alive()
    for _ in range(3):
        assert cluster.generate() == cluster.expected
    status, body = post(cluster.http, "/v1/completions", json.dumps(
        {"prompt": PROMPT, "max_tokens": MAX_TOKENS}).encode())
    assert status == 200, body
    before = cluster.baseline
    after = {}

    def back() -> bool:
        after.update(cluster.usage())
        return all(after[n].fds <= before[n].fds + 16 and
                   after[n].rss_kib <= max(before[n].rss_kib * 1.25,
                                           before[n].rss_kib + (64 << 10))
                   for n in before)

    ok = settle(back, timeout=60)
    print(f"\n{COUNT['inputs']} hostile inputs; before {before}; after {after}")
    assert ok, (before, after)
    assert COUNT["inputs"] >= 1000
