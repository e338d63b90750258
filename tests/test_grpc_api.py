"""The public gRPC API as outsiders see it: stubs built from protos/ alone, reflection, health."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import textwrap

import grpc
import pytest
from conftest import ROOT, GiB, Serving, run
from grpc_health.v1 import health_pb2, health_pb2_grpc
from serving_thread import ServingThread, http

from coordinator.demo import ModelSpec
from protos import inference_pb2, inference_pb2_grpc

SPEC = ModelSpec(family="llama")
SERVICE = "shardline.v1.Inference"

OUTSIDER = textwrap.dedent("""
    import json, sys
    import grpc
    assert "protos" not in sys.modules
    import inference_pb2 as pb, inference_pb2_grpc as rpc
    stub = rpc.InferenceStub(grpc.insecure_channel(sys.argv[1]))
    out = {"models": [m.id for m in stub.ListModels(pb.ListModelsRequest()).models],
           "workers": len(stub.GetCluster(pb.GetClusterRequest()).workers)}
    sampling = pb.SamplingParams(max_tokens=6, temperature=0.8, seed=3, logprobs=0)
    msgs = list(stub.Generate(pb.GenerateRequest(prompt="Hello there", sampling=sampling)))
    out["text"] = "".join(m.text for m in msgs)
    out["tokens"] = sum(len(m.token_ids) for m in msgs)
    out["logprobs"] = sum(len(m.logprobs) for m in msgs)
    out["finish"] = pb.FinishReason.Name(msgs[-1].finish_reason)
    out["usage"] = msgs[-1].usage.completion_tokens
    chat = pb.ChatRequest(messages=[pb.ChatMessage(role="user", content="Hi")],
                          sampling=pb.SamplingParams(max_tokens=4))
    out["chat_tokens"] = sum(len(m.token_ids) for m in stub.Chat(chat))
    try:
        list(stub.Generate(pb.GenerateRequest(prompt="x", sampling=pb.SamplingParams(top_p=2))))
    except grpc.RpcError as e:
        out["error"] = [e.code().name, e.details()]
    print(json.dumps(out))
""")


@pytest.fixture(scope="module")
def server(model_dir, workers):
    with ServingThread(model_dir(SPEC), workers[:2]) as s:
        yield s


def test_a_client_built_from_the_proto_file_alone(server, tmp_path):
    subprocess.run([sys.executable, "-m", "grpc_tools.protoc", f"-I{ROOT / 'protos'}",
                    f"--python_out={tmp_path}", f"--grpc_python_out={tmp_path}",
                    "inference.proto"], check=True, cwd=tmp_path)
    (tmp_path / "outsider.py").write_text(OUTSIDER)
    proc = subprocess.run([sys.executable, "outsider.py", server.grpc_address],
                          cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    assert out["models"] == [server.coordinator.model.model_id] and out["workers"] == 2
    assert out["tokens"] == out["logprobs"] == out["usage"] == 6
    assert out["finish"] == "FINISH_REASON_LENGTH" and out["chat_tokens"] == 4
    assert out["error"][0] == "INVALID_ARGUMENT" and "sampling.top_p" in out["error"][1]


def test_reflection_lists_and_describes_the_services(server):
    from google.protobuf import descriptor_pool, message_factory
    from grpc_reflection.v1alpha.proto_reflection_descriptor_database import (
        ProtoReflectionDescriptorDatabase,
    )

    with grpc.insecure_channel(server.grpc_address) as channel:
        db = ProtoReflectionDescriptorDatabase(channel)
        assert {SERVICE, "grpc.health.v1.Health",
                "grpc.reflection.v1alpha.ServerReflection"} <= set(db.get_services())
        pool = descriptor_pool.DescriptorPool(db)
        methods = {m.name for m in pool.FindServiceByName(SERVICE).methods}
        assert methods == {"Generate", "Chat", "ListModels", "GetCluster"}
        # a call made only from what reflection said
        req_cls = message_factory.GetMessageClass(
            pool.FindMessageTypeByName("shardline.v1.ListModelsRequest"))
        resp_cls = message_factory.GetMessageClass(
            pool.FindMessageTypeByName("shardline.v1.ListModelsResponse"))
        call = channel.unary_unary(f"/{SERVICE}/ListModels",
                                   request_serializer=req_cls.SerializeToString,
                                   response_deserializer=resp_cls.FromString)
        assert call(req_cls()).models[0].id == server.coordinator.model.model_id


def test_sampling_through_grpc_is_checked_seeded_and_logged(server):
    from coordinator.client import Client, InvalidRequest

    with Client(server.grpc_address) as c:
        a = c.generate("Once upon", max_tokens=12, temperature=1.2, seed=11, top_k=50,
                       min_p=0.01, top_p=0.95, repetition_penalty=1.1)
        b = c.generate("Once upon", max_tokens=12, temperature=1.2, seed=11, top_k=50,
                       min_p=0.01, top_p=0.95, repetition_penalty=1.1)
        assert a.token_ids == b.token_ids and len(a.logprobs) == 12
        assert all(lp <= 0 for lp in a.logprobs)
        cases = {"temperature": -1.0, "top_p": 0.0, "top_k": -5, "min_p": 2.0,
                 "repetition_penalty": 0.0, "max_tokens": 10**9, "logprobs": 99}
        for name, value in cases.items():
            with pytest.raises(InvalidRequest, match=f"sampling.{name}"):
                c.generate("x", **{name: value})
        with pytest.raises(InvalidRequest, match=r"sampling.stop\[1\]"):
            c.generate("x", stop=["a", ""])
        with pytest.raises(InvalidRequest, match="messages"):
            c.chat([])
        assert len(c.generate("Once upon", max_tokens=3).token_ids) == 3


def test_health_is_not_serving_while_loading_and_after_a_worker_dies(model_dir, cache_dir,
                                                                    monkeypatch):
    from coordinator.cluster.cluster import Cluster
    from coordinator.local import LocalWorkers

    path = model_dir(SPEC)
    local = LocalWorkers(1, memory=[1 * GiB], cache_dir=cache_dir, names=["lone"])
    addresses = local.start()
    real_load = Cluster.load

    async def scenario():
        gate = asyncio.Event()

        async def gated_load(self, *args, **kwargs):
            await gate.wait()
            return await real_load(self, *args, **kwargs)

        monkeypatch.setattr(Cluster, "load", gated_load)
        s = Serving(path, addresses)
        c = s.coordinator
        start = asyncio.create_task(c.start())
        while not (c.grpc_port and c.http_port):
            assert not start.done(), start.exception()
            await asyncio.sleep(0.01)
        url = f"http://127.0.0.1:{c.http_port}/health"
        chat_url = f"http://127.0.0.1:{c.http_port}/v1/chat/completions"
        chat = json.dumps({"messages": [{"role": "user", "content": "hi"}]}).encode()
        channel = grpc.aio.insecure_channel(f"127.0.0.1:{c.grpc_port}")
        stub = inference_pb2_grpc.InferenceStub(channel)
        watch = health_pb2_grpc.HealthStub(channel).Watch(
            health_pb2.HealthCheckRequest(service=SERVICE))
        seen = {"loading": (await watch.read()).status,
                "loading_http": await asyncio.to_thread(http, "GET", url),
                "loading_chat": await asyncio.to_thread(http, "POST", chat_url, chat)}
        try:
            async for _ in stub.Generate(inference_pb2.GenerateRequest(prompt="hi")):
                pass
        except grpc.aio.AioRpcError as e:
            seen["loading_generate"] = e.code().name
        gate.set()
        await start
        seen["loaded"] = (await asyncio.wait_for(watch.read(), 10)).status
        seen["loaded_http"] = await asyncio.to_thread(http, "GET", url)
        await asyncio.to_thread(local.stop)
        seen["lost"] = (await asyncio.wait_for(watch.read(), 15)).status
        seen["lost_http"] = await asyncio.to_thread(http, "GET", url)
        seen["lost_chat"] = await asyncio.to_thread(http, "POST", chat_url, chat)
        try:
            async for _ in stub.Generate(inference_pb2.GenerateRequest(prompt="hi")):
                pass
        except grpc.aio.AioRpcError as e:
            seen["lost_generate"] = e.code().name
            seen["lost_details"] = e.details()
        seen["models"] = len((await stub.ListModels(inference_pb2.ListModelsRequest())).models)
        watch.cancel()
        await channel.close()
        await c.stop()
        return seen

    try:
        seen = run(scenario())
    finally:
        local.stop()
    NOT_SERVING, SERVING = (health_pb2.HealthCheckResponse.NOT_SERVING,
                            health_pb2.HealthCheckResponse.SERVING)
    assert seen["loading"] == NOT_SERVING and seen["loading_http"][0] == 503
    assert seen["loading_generate"] == "UNAVAILABLE"
    assert seen["loaded"] == SERVING and seen["loaded_http"] == (200, {"status": "ok"})
    assert seen["lost"] == NOT_SERVING and seen["lost_http"][0] == 503
    assert seen["lost_http"][1]["reason"], seen["lost_http"]
    assert seen["lost_generate"] == "UNAVAILABLE" and seen["models"] == 1
    # /v1/* says 503 in OpenAI's shape while the cluster cannot serve
    for state in ("loading_chat", "lost_chat"):
        code, body = seen[state]
        assert code == 503, (state, body)
        assert set(body["error"]) == {"message", "type", "param", "code"}, body
        assert body["error"]["type"] == "server_error" and body["error"]["code"] == "unavailable"
        assert body["error"]["message"].startswith("the cluster cannot serve now: "), body
    assert "shards are not loaded" in seen["loading_chat"][1]["error"]["message"]
    # the reason is said once, not as "pipeline broken: pipeline broken: ..."
    for message in (seen["lost_details"], seen["lost_chat"][1]["error"]["message"],
                    seen["lost_http"][1]["reason"]):
        assert message.count("pipeline broken") <= 1 and "AioRpcError" not in message, message


@pytest.mark.parametrize("reader_broke_first", [False, True])
def test_a_failed_write_to_stage_0_says_why_once(reader_broke_first):
    from coordinator.serving.pipeline import Pipeline, PipelineError
    from protos import worker_pb2

    first = "pipeline broken: Socket closed"

    class DeadCall:
        """A Forward call whose write fails, the reader having seen the break or not."""

        def __init__(self, pipeline: Pipeline) -> None:
            self.pipeline = pipeline

        async def write(self, msg) -> None:
            if reader_broke_first:
                self.pipeline.fail(first)
            raise grpc.aio.AioRpcError(grpc.StatusCode.UNAVAILABLE, grpc.aio.Metadata(),
                                       grpc.aio.Metadata(), details="Socket closed")

    async def scenario():
        p = Pipeline("127.0.0.1:9", "plan")
        p._call = DeadCall(p)
        p._writer = asyncio.create_task(p._write())
        step = p.send([worker_pb2.SeqInput(seq_id="s", token_ids=[1])])
        with pytest.raises(PipelineError) as e:
            await step
        await p.close()
        return str(e.value), p.broken

    error, broken = run(scenario())
    assert error == broken == first  # not "pipeline broken: <AioRpcError of RPC ...>"


def test_a_request_that_does_not_parse_is_invalid_argument(server):
    # protobuf strings must be UTF-8; a client that sends other bytes gets INVALID_ARGUMENT
    # (not UNKNOWN from a failing deserializer), and serving goes on
    bad_prompt = b"\x12\x03\xed\xa0\x80"  # GenerateRequest.prompt = a UTF-16 surrogate
    message = b"\x0a\x04user\x12\x03\xed\xa0\x80"  # ChatMessage, content not UTF-8
    bad_chat = b"\x12" + bytes([len(message)]) + message
    with grpc.insecure_channel(server.grpc_address) as channel:
        for method, body in (("Generate", bad_prompt), ("Chat", bad_chat),
                             ("ListModels", b"\xff")):
            call = channel.unary_stream if method != "ListModels" else channel.unary_unary
            rpc = call(f"/{SERVICE}/{method}", request_serializer=lambda b: b,
                       response_deserializer=lambda b: b)
            with pytest.raises(grpc.RpcError) as e:
                result = rpc(body)
                if method != "ListModels":
                    list(result)
            assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT, (method, e.value)
            assert "UTF-8" in e.value.details() or "parse" in e.value.details()
        stub = inference_pb2_grpc.InferenceStub(channel)
        msgs = list(stub.Generate(inference_pb2.GenerateRequest(
            prompt="Hello", sampling=inference_pb2.SamplingParams(max_tokens=3))))
        assert sum(len(m.token_ids) for m in msgs) == 3
