"""Tiny random demo models: every family builds, loads with mlx_lm and generates varied text."""

from __future__ import annotations

import json
import multiprocessing
import os
import sys
import threading
from pathlib import Path

import mlx.core as mx
import pytest
from mlx_lm import load
from mlx_lm.models.cache import make_prompt_cache
from mlx_lm.tokenizer_utils import BPEStreamingDetokenizer, TokenizerWrapper
from mlx_lm.utils import get_total_parameters
from safetensors import safe_open

from coordinator import demo
from coordinator.demo import DEMO_SPEC, FAMILIES, ModelSpec, cached_model, default_cache_dir

# About 40 tokens, so that with 32 new tokens the window-8 sliding layers are crossed.
PROMPT = "The engineers measured every hop, wrote the numbers down and kept one stream open."


@pytest.fixture(scope="module")
def cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("shardline-cache")


def greedy(model, ids: list[int], n: int = 32) -> list[int]:
    caches = make_prompt_cache(model)
    x = mx.array([ids])
    out = []
    for _ in range(n):
        token = mx.argmax(model(x, cache=caches)[:, -1], axis=-1)
        out.append(token.item())
        x = token[None]
    return out


def weight_names(path: Path) -> set[str]:
    with safe_open(str(path / "model.safetensors"), framework="numpy") as f:
        return set(f.keys())


@pytest.mark.parametrize("family", FAMILIES)
def test_family_builds_loads_and_varies(family: str, cache: Path) -> None:
    path = cached_model(ModelSpec(family=family), cache)
    for name in (
        "config.json",
        "model.safetensors",
        "model.safetensors.index.json",
        "tokenizer.json",
        "tokenizer_config.json",
    ):
        assert (path / name).is_file(), name
    model, tokenizer = load(str(path))
    ids = tokenizer.encode(PROMPT)
    assert 30 <= len(ids) <= 50, len(ids)
    out = greedy(model, ids)
    assert len(set(out)) >= 8, (family, out)
    assert not set(out) & set(tokenizer.eos_token_ids)
    assert len(model.layers) == 6


def test_sliding_window_configs(cache: Path) -> None:
    cfg = json.loads(
        (cached_model(ModelSpec(family="gemma3_text"), cache) / "config.json").read_text()
    )
    assert cfg["sliding_window"] == 8 and cfg["sliding_window_pattern"] == 3
    cfg = json.loads((cached_model(ModelSpec(family="mistral"), cache) / "config.json").read_text())
    assert cfg["sliding_window"] == 8
    assert {"sliding_attention", "full_attention"} == set(cfg["layer_types"])
    cfg = demo.model_config(
        ModelSpec(family="gemma3_text", num_layers=2), {t: 0 for t in demo.SPECIAL_TOKENS}
    )
    assert cfg["sliding_window_pattern"] == 2


@pytest.mark.parametrize("bits", [4, 8])
def test_quantized_variants_load(bits: int, cache: Path) -> None:
    path = cached_model(ModelSpec(family="llama", bits=bits), cache)
    cfg = json.loads((path / "config.json").read_text())
    assert cfg["quantization"]["bits"] == bits
    assert cfg["quantization"]["group_size"] in (32, 64)
    assert any(name.endswith(".scales") for name in weight_names(path))
    model, tokenizer = load(str(path))
    assert len(set(greedy(model, tokenizer.encode(PROMPT)))) >= 8


def test_tied_and_untied(cache: Path) -> None:
    untied = cached_model(ModelSpec(tied=False), cache)
    tied = cached_model(ModelSpec(tied=True), cache)
    assert "lm_head.weight" in weight_names(untied)
    assert "lm_head.weight" not in weight_names(tied)
    assert json.loads((tied / "config.json").read_text())["tie_word_embeddings"] is True
    assert json.loads((untied / "config.json").read_text())["tie_word_embeddings"] is False
    model, tokenizer = load(str(tied))
    assert "lm_head" not in model
    assert len(set(greedy(model, tokenizer.encode(PROMPT)))) >= 8
    # The gemma families always tie their head; the spec says so.
    assert ModelSpec(family="gemma2").tied is True
    assert ModelSpec(family="gemma2") == ModelSpec(family="gemma2", tied=True)


def test_gemma3_tied_checkpoint_has_no_head(cache: Path) -> None:
    path = cached_model(ModelSpec(family="gemma3_text"), cache)
    assert "lm_head.weight" not in weight_names(path)


def test_building_holds_no_memory_afterwards(tmp_path: Path) -> None:
    """What a build allocated is given back, not kept in MLX's cache for the process."""
    demo.build_model(tmp_path / "m", ModelSpec(num_layers=2))
    assert mx.get_cache_memory() == 0


def test_cached_model_reuses_directory(tmp_path: Path) -> None:
    spec = ModelSpec(num_layers=2)
    first = cached_model(spec, tmp_path)
    stamp = (first / "model.safetensors").stat().st_mtime_ns
    second = cached_model(spec, tmp_path)
    assert first == second == tmp_path / "models" / spec.key()
    assert (second / "model.safetensors").stat().st_mtime_ns == stamp
    assert [p.name for p in (tmp_path / "models").iterdir()] == [spec.key()]


def test_cached_model_removes_stale_temp_dirs(tmp_path: Path) -> None:
    stale = tmp_path / "models" / ".llama-crashed.abc"
    stale.mkdir(parents=True)
    os.utime(stale, (0, 0))
    fresh = tmp_path / "models" / ".llama-building.def"
    fresh.mkdir()
    path = cached_model(ModelSpec(num_layers=2), tmp_path)
    assert not stale.exists() and fresh.exists() and path.is_dir()


def test_cached_model_loser_of_a_race_keeps_the_winner(tmp_path: Path, monkeypatch) -> None:
    spec = ModelSpec(num_layers=2)
    real_build = demo.build_model
    final = tmp_path / "models" / spec.key()

    def build_while_another_process_finishes(out_dir: Path, s: ModelSpec) -> Path:
        real_build(final, s)  # the other process renames its copy into place first
        (final / "winner").write_text("yes")
        return real_build(out_dir, s)

    monkeypatch.setattr(demo, "build_model", build_while_another_process_finishes)
    assert cached_model(spec, tmp_path) == final
    assert (final / "winner").exists()
    assert [p.name for p in (tmp_path / "models").iterdir()] == [spec.key()]  # no temp dirs left


def test_cached_model_threads_race(tmp_path: Path) -> None:
    spec = ModelSpec(num_layers=2, seed=7)
    barrier = threading.Barrier(3)
    results: list[Path] = []

    def worker() -> None:
        barrier.wait()
        results.append(cached_model(spec, tmp_path))

    threads = [threading.Thread(target=worker) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(results) == 3 and len(set(results)) == 1
    assert [p.name for p in (tmp_path / "models").iterdir()] == [spec.key()]
    load(str(results[0]))


def _build_in_child(cache_dir: str) -> str:
    return str(cached_model(ModelSpec(num_layers=2, seed=11), Path(cache_dir)))


def test_cached_model_processes_race(tmp_path: Path) -> None:
    ctx = multiprocessing.get_context("spawn")
    with ctx.Pool(2) as pool:
        paths = pool.map(_build_in_child, [str(tmp_path)] * 2)
    assert len(set(paths)) == 1
    assert [p.name for p in (tmp_path / "models").iterdir()] == [Path(paths[0]).name]
    load(paths[0])


def test_builds_are_deterministic(tmp_path: Path) -> None:
    spec = ModelSpec(num_layers=2)
    a, b = demo.build_model(tmp_path / "a", spec), demo.build_model(tmp_path / "b", spec)
    for name in ("model.safetensors", "tokenizer.json", "config.json"):
        assert (a / name).read_bytes() == (b / name).read_bytes(), name


def test_tokenizer_round_trips_and_chats(cache: Path) -> None:
    _, tokenizer = load(str(cached_model(ModelSpec(num_layers=2), cache)))
    assert isinstance(tokenizer, TokenizerWrapper)
    assert isinstance(tokenizer.detokenizer, BPEStreamingDetokenizer)
    for text in (PROMPT, "Hello, world!\n  Indented code: x = 1 + 2", "café, naïve, 日本語 ☕"):
        ids = tokenizer.encode(text)
        assert tokenizer.decode(ids) == text
        detok = tokenizer.detokenizer
        for i in ids:
            detok.add_token(i)
        detok.finalize()
        assert detok.text == text
    assert tokenizer.vocab_size == 512
    specials = {t: tokenizer.convert_tokens_to_ids(t) for t in demo.SPECIAL_TOKENS}
    assert len(set(specials.values())) == 5
    assert tokenizer.eos_token_ids == {specials["<|eos|>"], specials["<|im_end|>"]}
    assert tokenizer.has_chat_template
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi!"}]
    ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True)
    assert tokenizer.decode(ids) == (
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi!<|im_end|>\n"
        "<|im_start|>assistant\n"
    )
    assert specials["<|im_start|>"] in ids


def test_demo_spec_is_tiny(cache: Path) -> None:
    assert DEMO_SPEC.family == "llama" and DEMO_SPEC.dtype == "bfloat16"
    assert DEMO_SPEC.num_layers >= 8 and DEMO_SPEC.hidden_size >= 128
    model, tokenizer = load(str(cached_model(DEMO_SPEC, cache)))
    assert get_total_parameters(model) < 1_000_000
    assert model.layers[0].self_attn.q_proj.weight.dtype == mx.bfloat16
    assert len(set(greedy(model, tokenizer.encode(PROMPT)))) >= 8


def test_spec_keys_and_validation() -> None:
    assert ModelSpec().key() == ModelSpec().key()
    keys = {ModelSpec(bits=4).key(), ModelSpec().key(), ModelSpec(seed=1).key(), DEMO_SPEC.key()}
    assert len(keys) == 4
    assert ModelSpec(family="qwen3").weight_scale == demo.FAMILY_WEIGHT_SCALE["qwen3"]
    assert ModelSpec(weight_scale=1.5).weight_scale == 1.5
    for bad in (
        dict(family="gpt2"),
        dict(bits=3),
        dict(vocab_size=100),
        dict(hidden_size=66),
        dict(dtype="int8"),
    ):
        with pytest.raises(ValueError):
            ModelSpec(**bad)


def test_default_cache_dir(monkeypatch, tmp_path: Path) -> None:
    monkeypatch.setenv("SHARDLINE_CACHE_DIR", str(tmp_path / "x"))
    assert default_cache_dir() == tmp_path / "x"
    monkeypatch.delenv("SHARDLINE_CACHE_DIR")
    monkeypatch.setattr(sys, "platform", "linux")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert default_cache_dir() == tmp_path / "xdg" / "shardline"
    monkeypatch.delenv("XDG_CACHE_HOME")
    assert default_cache_dir() == Path.home() / ".cache" / "shardline"
    monkeypatch.setattr(sys, "platform", "darwin")
    assert default_cache_dir() == Path.home() / "Library" / "Caches" / "shardline"


def test_a_cycle_model_continues_its_block_and_never_a_special_token(cache: Path) -> None:
    """ModelSpec.cycle: a model that repeats text its prompt holds (prompt lookup's case)."""
    path = cached_model(ModelSpec(family="llama", cycle=16), cache)
    model, tokenizer = load(str(path))
    prompt = demo.cycle_prompt(40, 16)
    expected, token = [], prompt[-1]
    for _ in range(24):
        token = demo.cycle_next(token, 16)
        expected.append(token)
    assert greedy(model, prompt, 24) == expected
    # a block holding a special token maps to itself, so nothing leads to one
    special = tokenizer.convert_tokens_to_ids(list(demo.SPECIAL_TOKENS))
    block = special[0] - special[0] % 16
    ordinary = next(t for t in range(block, block + 16) if t not in special)
    assert greedy(model, [ordinary] * 3, 4) == [ordinary] * 4
    for bad in ({"tied": True}, {"quiet_after": 2}, {"cycle": 1}):
        with pytest.raises(ValueError, match="cycle"):
            ModelSpec(family="llama", **{"cycle": 16, **bad})
