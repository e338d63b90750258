"""`coordinator.client`: the blocking and asyncio Python clients against a live cluster."""

from __future__ import annotations

import pytest
from conftest import Serving, reference_tokens, run
from serving_thread import ServingThread

from coordinator.client import (
    AsyncClient,
    Client,
    ClusterInfo,
    Completion,
    InvalidRequest,
    ModelCard,
    ModelNotFound,
    Unavailable,
)
from coordinator.demo import ModelSpec

SPEC = ModelSpec(family="qwen3")
CHAT = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello!"}]


@pytest.fixture(scope="module")
def server(model_dir, workers):
    with ServingThread(model_dir(SPEC), workers) as s:
        s.path = model_dir(SPEC)
        yield s


def test_blocking_client_generates_chats_streams_and_reads_the_cluster(server):
    tok = server.coordinator.engine.tokenizer
    ids = tok.encode("Once upon a time")
    want = reference_tokens(server.path, ids, 10)
    with Client(server.grpc_address, timeout=60) as c:
        assert c.ready() is True
        done = c.generate("Once upon a time", max_tokens=10)
        assert isinstance(done, Completion)
        assert done.token_ids == want and done.text == tok.decode(want)
        assert done.finish_reason == "length" and len(done.logprobs) == 10
        assert (done.usage.prompt_tokens, done.usage.completion_tokens) == (len(ids), 10)
        assert c.generate(ids, max_tokens=10).token_ids == want
        pieces = list(c.stream("Once upon a time", max_tokens=10))
        assert "".join(p.text for p in pieces) == done.text
        assert pieces[-1].finish_reason == "length" and pieces[-1].usage.completion_tokens == 10
        assert all(p.finish_reason is None for p in pieces[:-1])
        stop = done.text[4:7]
        cut = c.generate("Once upon a time", max_tokens=10, stop=stop)
        assert (cut.text, cut.finish_reason) == (done.text[: done.text.find(stop)], "stop")
        chat = c.chat(CHAT, max_tokens=6)
        assert chat.token_ids == c.chat([(m["role"], m["content"]) for m in CHAT],
                                        max_tokens=6).token_ids
        chat_ids = tok.apply_chat_template(CHAT, add_generation_prompt=True, tokenize=True)
        assert chat.token_ids == reference_tokens(server.path, chat_ids, 6)
        seeded = [c.generate("Once", max_tokens=8, temperature=0.9, seed=4).token_ids
                  for _ in range(2)]
        assert seeded[0] == seeded[1]
        cluster = c.cluster()
        assert isinstance(cluster, ClusterInfo) and len(cluster.workers) == 3
        assert cluster.workers[0].layer_start == 0
        assert cluster.workers[-1].layer_end == SPEC.num_layers
        assert all(w.status == "serving" for w in cluster.workers)
        model_id = server.coordinator.model.model_id
        assert c.models() == [ModelCard(model_id, SPEC.num_layers,
                                        server.coordinator.model.weight_bytes)]
        with pytest.raises(InvalidRequest, match="sampling.temperature") as e:
            c.generate("x", temperature=-1.0)
        assert e.value.code == "INVALID_ARGUMENT"
        with pytest.raises(ModelNotFound, match="'nope'"):
            c.chat(CHAT, model="nope")
        with pytest.raises(InvalidRequest, match=r"messages\[0\].role"):
            c.chat([("wizard", "hi")])
        for _ in c.stream("Once upon a time", max_tokens=200):
            break  # leaving early cancels the call and frees the slot
        assert c.generate("Once upon a time", max_tokens=10).token_ids == want
    with Client("127.0.0.1:9", timeout=3) as nobody, pytest.raises(Unavailable):
        nobody.models()


def test_asyncio_client_does_the_same(model_dir, workers):
    path = model_dir(SPEC)

    async def scenario():
        async with Serving(path, workers[:2]) as s:
            tok = s.coordinator.engine.tokenizer
            address = f"127.0.0.1:{s.coordinator.grpc_port}"
            async with AsyncClient(address, timeout=60) as c:
                out = {"ready": await c.ready(), "tok": tok}
                out["done"] = await c.generate("Once upon a time", max_tokens=10)
                out["pieces"] = [p async for p in c.stream("Once upon a time", max_tokens=10)]
                out["chat"] = await c.chat(CHAT, max_tokens=6)
                out["cluster"] = await c.cluster()
                out["models"] = await c.models()
                try:
                    await c.generate("x", max_tokens=-1)
                except InvalidRequest as e:
                    out["error"] = e.message
                async for _ in c.stream("Once upon a time", max_tokens=200):
                    break
                out["after"] = await c.generate("Once upon a time", max_tokens=10)
            return out

    out = run(scenario())
    tok = out["tok"]
    want = reference_tokens(path, tok.encode("Once upon a time"), 10)
    assert out["ready"] is True
    assert out["done"].token_ids == want == out["after"].token_ids
    assert "".join(p.text for p in out["pieces"]) == out["done"].text
    assert out["pieces"][-1].usage.completion_tokens == 10
    chat_ids = tok.apply_chat_template(CHAT, add_generation_prompt=True, tokenize=True)
    assert out["chat"].token_ids == reference_tokens(path, chat_ids, 6)
    assert len(out["cluster"].workers) == 2 and out["models"][0].num_layers == SPEC.num_layers
    assert out["error"].startswith("sampling.max_tokens")
