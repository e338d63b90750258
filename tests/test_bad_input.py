"""Bad input gets a clear refusal (one-line CLI error or a SPEC status code); serving goes on."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import grpc
import pytest
from conftest import ROOT, Serving, run

from coordinator.demo import ModelSpec
from protos import inference_pb2

SPEC = ModelSpec(family="llama")


def coordinator(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "coordinator", *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=timeout)


def assert_one_line_error(proc: subprocess.CompletedProcess, *words: str) -> None:
    assert proc.returncode != 0
    err = proc.stderr.strip()
    assert "Traceback" not in err, err
    last = err.splitlines()[-1]
    assert last.startswith("error: "), err
    for word in words:
        assert word in last, last


@pytest.fixture
def unsupported_model(model_dir, tmp_path):
    path = tmp_path / "mamba-model"
    shutil.copytree(model_dir(SPEC), path)
    config = json.loads((path / "config.json").read_text())
    config["model_type"] = "mamba"
    (path / "config.json").write_text(json.dumps(config))
    return path


def test_unsupported_family_is_refused_at_plan_time(unsupported_model, workers):
    proc = coordinator("plan", "--model", str(unsupported_model), "--memory", "1GiB")
    assert_one_line_error(proc, "'mamba'", "not supported", "llama")
    proc = coordinator("serve", "--model", str(unsupported_model), "--workers", workers[0],
                       "--grpc-port", "0")
    assert_one_line_error(proc, "'mamba'", "not supported")


def test_model_that_does_not_fit_is_refused_with_numbers(model_dir):
    proc = coordinator("plan", "--model", str(model_dir(SPEC)), "--memory", "100KB,200KB")
    assert_one_line_error(proc, "needs 9.55 MiB", "w0 97.66 KiB", "w1 195.31 KiB")
    proc = coordinator("serve", "--model", str(model_dir(SPEC)), "--local-workers", "1",
                       "--local-memory", "100KB", "--grpc-port", "0")
    assert_one_line_error(proc, "needs 9.55 MiB", "97.66 KiB")


@pytest.mark.parametrize("chunk", ["0", "3000000"])
def test_prefill_chunk_over_the_message_limit_is_refused(model_dir, chunk):
    # hidden 64 x 2 bytes a token: 2,088,960 tokens fit 256 MiB less 1 MiB
    proc = coordinator("serve", "--model", str(model_dir(SPEC)), "--local-workers", "1",
                       "--prefill-chunk", chunk, "--grpc-port", "0", "--no-discover")
    assert_one_line_error(proc, f"--prefill-chunk {chunk}", "1 to 2088960", "256.00 MiB")


def test_unreachable_worker_at_start_is_named(model_dir):
    """After --worker-wait (tried again meanwhile, and said so) the error names the worker."""
    proc = coordinator("serve", "--model", str(model_dir(SPEC)), "--workers",
                       "127.0.0.1:9", "--grpc-port", "0", "--worker-wait", "2")
    assert_one_line_error(proc, "cannot reach worker at 127.0.0.1:9")
    assert "waiting up to 2s for workers that do not answer yet" in proc.stdout


def test_generate_against_no_coordinator_is_one_line():
    proc = coordinator("generate", "--address", "127.0.0.1:9", "--prompt", "hi")
    assert_one_line_error(proc, "127.0.0.1:9")


def test_bad_requests_get_status_codes_and_the_server_keeps_serving(model_dir, workers):
    path = model_dir(SPEC)

    async def scenario():
        async with Serving(path, workers[:2], context=256) as s:
            codes = {}
            cases = {
                "empty": inference_pb2.GenerateRequest(prompt=""),
                "too_long": inference_pb2.GenerateRequest(prompt_token_ids=[20] * 260),
                "too_long_set": inference_pb2.GenerateRequest(
                    prompt_token_ids=[20] * 200,
                    sampling=inference_pb2.SamplingParams(max_tokens=100)),
                "too_long_text": inference_pb2.GenerateRequest(prompt="the dog " * 200),
                "both": inference_pb2.GenerateRequest(prompt="a", prompt_token_ids=[20]),
                "vocab": inference_pb2.GenerateRequest(prompt_token_ids=[10**6]),
                "model": inference_pb2.GenerateRequest(model="nope", prompt="hello"),
                "max_tokens": inference_pb2.GenerateRequest(
                    prompt="hello", sampling=inference_pb2.SamplingParams(max_tokens=-3)),
                "chat_empty": None,
                "chat_role": None,
                "chat_long": None,
            }
            chats = {"chat_empty": [],
                     "chat_role": [inference_pb2.ChatMessage(role="wizard", content="hi")],
                     "chat_long": [inference_pb2.ChatMessage(role="user",
                                                             content="the dog " * 200)]}
            for name, req in cases.items():
                try:
                    if name.startswith("chat"):
                        msgs = chats[name]
                        call = s.stub.Chat(inference_pb2.ChatRequest(messages=msgs))
                    else:
                        call = s.stub.Generate(req)
                    async for _ in call:
                        pass
                    codes[name] = ("OK", "")
                except grpc.aio.AioRpcError as e:
                    codes[name] = (e.code().name, e.details())
            tokens, finish, text = await s.generate([20, 30, 40], 5)
            return codes, tokens, finish

    codes, tokens, finish = run(scenario())
    assert codes["empty"] == ("INVALID_ARGUMENT", "prompt is empty")
    assert codes["too_long"][0] == "INVALID_ARGUMENT" and "context of 256" in codes["too_long"][1]
    # the prompt's field is named as sent, and max_tokens says whether the client set it
    assert codes["too_long"][1].startswith("prompt_token_ids is 260 tokens")
    assert "sampling.max_tokens was not set" in codes["too_long"][1]
    assert codes["too_long_set"] == ("INVALID_ARGUMENT", "prompt_token_ids is 200 tokens; with "
                                     "sampling.max_tokens 100 that exceeds the context of 256 "
                                     "tokens")
    assert codes["too_long_text"][1].startswith("prompt is "), codes["too_long_text"]
    assert codes["chat_long"][1].startswith("messages is "), codes["chat_long"]
    assert codes["vocab"][1].startswith("prompt_token_ids[0] is 1000000, outside"), codes["vocab"]
    assert codes["both"][0] == "INVALID_ARGUMENT"
    assert codes["vocab"][0] == "INVALID_ARGUMENT" and "vocabulary" in codes["vocab"][1]
    assert codes["model"][0] == "NOT_FOUND" and "'nope'" in codes["model"][1]
    assert codes["max_tokens"][0] == "INVALID_ARGUMENT" and "max_tokens" in codes["max_tokens"][1]
    assert codes["chat_empty"][0] == "INVALID_ARGUMENT"
    assert codes["chat_role"][0] == "INVALID_ARGUMENT" and "role" in codes["chat_role"][1]
    assert len(tokens) == 5 and finish == inference_pb2.FINISH_REASON_LENGTH


def test_a_busy_port_is_a_one_line_error(model_dir):
    import socket

    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = str(busy.getsockname()[1])
        proc = subprocess.run([sys.executable, "-m", "worker", "serve", "--host", "127.0.0.1",
                               "--port", port, "--no-advertise"], cwd=ROOT,
                              capture_output=True, text=True, timeout=60)
        assert_one_line_error(proc, f"cannot listen on 127.0.0.1:{port}", "in use")
        proc = coordinator("serve", "--model", str(model_dir(SPEC)), "--local-workers", "1",
                           "--no-discover", "--host", "127.0.0.1", "--grpc-port", port,
                           "--http-port", "0")
        assert_one_line_error(proc, f"cannot listen on 127.0.0.1:{port}", "in use")
