"""Model sizes from safetensors headers: exact bytes per layer, tied/quantized/sharded layouts."""

from __future__ import annotations

import argparse
import json
import math
import struct
from pathlib import Path

import pytest
from conftest import need_module

from coordinator.cluster.modelinfo import (
    ModelError,
    ModelInfo,
    check_family,
    read_model_info,
    resolve_model,
)
from coordinator.plan_cli import add_plan_parser, run_plan

DTYPE_BYTES = {"BF16": 2, "F16": 2, "F32": 4, "U32": 4}
HIDDEN, HEADS, KV_HEADS, INTER, VOCAB, LAYERS = 16, 4, 2, 24, 32, 3
HEAD_DIM = HIDDEN // HEADS

# Hand-counted sizes of the bf16 layout below.
BF16_LAYER = 2 * (2 * 16 * 16 + 2 * 8 * 16 + 3 * 24 * 16 + 2 * 16)  # q,o + k,v + mlp + 2 norms
BF16_EMBED = 2 * VOCAB * HIDDEN
BF16_NORM = 2 * HIDDEN
# 4-bit with group size 8: weight is U32 (out, in/8); scales and biases bf16 (out, in/8).
Q4_LAYER = (4 + 2 + 2) * (2 * 16 * 2 + 2 * 8 * 2 + 2 * 24 * 2 + 16 * 3) + 2 * 2 * 16
Q4_EMBED = (4 + 2 + 2) * VOCAB * 2


def write_safetensors(file: Path, tensors: dict[str, tuple[str, tuple[int, ...]]]) -> int:
    """A real safetensors file (zero data) with the given dtypes and shapes; returns data bytes."""
    header: dict = {"__metadata__": {"format": "mlx"}}
    offset = 0
    for name, (dtype, shape) in tensors.items():
        size = DTYPE_BYTES[dtype] * math.prod(shape)
        header[name] = {"dtype": dtype, "shape": shape, "data_offsets": [offset, offset + size]}
        offset += size
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    file.write_bytes(struct.pack("<Q", len(raw)) + raw + bytes(offset))
    return offset


def linear(name: str, out: int, inp: int, quantized: bool) -> dict:
    if not quantized:
        return {f"{name}.weight": ("BF16", (out, inp))}
    return {
        f"{name}.weight": ("U32", (out, inp // 8)),
        f"{name}.scales": ("BF16", (out, inp // 8)),
        f"{name}.biases": ("BF16", (out, inp // 8)),
    }


def layer_tensors(i: int, quantized: bool = False) -> dict:
    p = f"model.layers.{i}"
    tensors: dict = {}
    for proj, out in (("q", HIDDEN), ("k", KV_HEADS * HEAD_DIM), ("v", KV_HEADS * HEAD_DIM)):
        tensors |= linear(f"{p}.self_attn.{proj}_proj", out, HIDDEN, quantized)
    tensors |= linear(f"{p}.self_attn.o_proj", HIDDEN, HIDDEN, quantized)
    tensors |= linear(f"{p}.mlp.gate_proj", INTER, HIDDEN, quantized)
    tensors |= linear(f"{p}.mlp.up_proj", INTER, HIDDEN, quantized)
    tensors |= linear(f"{p}.mlp.down_proj", HIDDEN, INTER, quantized)
    tensors[f"{p}.input_layernorm.weight"] = ("BF16", (HIDDEN,))
    tensors[f"{p}.post_attention_layernorm.weight"] = ("BF16", (HIDDEN,))
    return tensors


def model_tensors(*, quantized: bool = False, tied: bool = False) -> dict:
    tensors = linear("model.embed_tokens", VOCAB, HIDDEN, quantized)
    for i in range(LAYERS):
        tensors |= layer_tensors(i, quantized)
    tensors["model.norm.weight"] = ("BF16", (HIDDEN,))
    if not tied:
        tensors |= linear("lm_head", VOCAB, HIDDEN, quantized)
    return tensors


def write_config(path: Path, **extra) -> None:
    config = {
        "model_type": "llama", "hidden_size": HIDDEN, "num_hidden_layers": LAYERS,
        "num_attention_heads": HEADS, "num_key_value_heads": KV_HEADS,
        "intermediate_size": INTER, "vocab_size": VOCAB, "rms_norm_eps": 1e-5,
        "max_position_embeddings": 2048,
    } | extra
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(json.dumps(config))


def make_model(path: Path, *, quantized: bool = False, tied: bool = False, **config) -> int:
    write_config(path, **config)
    tensors = model_tensors(quantized=quantized, tied=tied)
    return write_safetensors(path / "model.safetensors", tensors)


def test_bf16_checkpoint_gives_exact_bytes_per_part(tmp_path):
    total = make_model(tmp_path, tie_word_embeddings=False)
    info = read_model_info(tmp_path, model_id="toy")
    assert info.model_id == "toy" and info.model_type == "llama"
    assert info.num_layers == LAYERS and info.hidden_size == HIDDEN
    assert info.layer_bytes == (BF16_LAYER,) * LAYERS
    assert (info.embed_bytes, info.head_bytes) == (BF16_EMBED, BF16_EMBED)
    assert info.norm_bytes == BF16_NORM
    assert not info.tied
    assert info.weight_bytes == total == LAYERS * BF16_LAYER + 2 * BF16_EMBED + BF16_NORM
    assert info.kv_bytes_per_token == (2 * KV_HEADS * HEAD_DIM * 2,) * LAYERS
    assert info.max_context == 2048 and info.quantization is None


def test_stage_bytes_put_embedding_first_and_norm_head_last(tmp_path):
    make_model(tmp_path)
    info = read_model_info(tmp_path)
    assert info.stage_bytes(0, 1) == BF16_EMBED + BF16_LAYER
    assert info.stage_bytes(1, 2) == BF16_LAYER
    assert info.stage_bytes(2, 3) == BF16_LAYER + BF16_NORM + BF16_EMBED
    assert info.stage_bytes(0, 3) == info.weight_bytes
    # num_layers_total moves where "last stage" is
    assert info.stage_bytes(1, 2, num_layers_total=2) == BF16_LAYER + BF16_NORM + BF16_EMBED
    with pytest.raises(ValueError):
        info.stage_bytes(2, 4)


def test_quantized_tied_checkpoint_counts_scales_and_reuses_embedding_as_head(tmp_path):
    quant = {"group_size": 8, "bits": 4}
    total = make_model(tmp_path, quantized=True, tied=True, quantization=quant)
    info = read_model_info(tmp_path)
    assert info.tied and info.quantization == quant
    assert info.layer_bytes == (Q4_LAYER,) * LAYERS
    assert info.embed_bytes == info.head_bytes == Q4_EMBED
    assert info.weight_bytes == total == LAYERS * Q4_LAYER + Q4_EMBED + BF16_NORM
    # The last stage of a split needs the embedding again (as the head); a single stage does not.
    assert info.stage_bytes(1, 3) == 2 * Q4_LAYER + BF16_NORM + Q4_EMBED
    assert info.stage_bytes(0, 3) == info.weight_bytes
    # Activations (and so the KV cache) are in the scales' dtype, bf16.
    assert info.kv_bytes_per_token[0] == 2 * KV_HEADS * HEAD_DIM * 2


def test_layers_of_different_precision_are_counted_separately(tmp_path):
    write_config(tmp_path)
    tensors = model_tensors(quantized=True)
    tensors |= layer_tensors(1, quantized=False)  # one layer left in bf16
    for name in [n for n in tensors if n.startswith("model.layers.1.") and "scales" in n]:
        tensors.pop(name)
        tensors.pop(name.replace("scales", "biases"))
    write_safetensors(tmp_path / "model.safetensors", tensors)
    assert read_model_info(tmp_path).layer_bytes == (Q4_LAYER, BF16_LAYER, Q4_LAYER)


def test_sharded_checkpoint_with_index_sums_all_shards(tmp_path):
    write_config(tmp_path)
    tensors = model_tensors()
    names = list(tensors)
    shards = {"model-00001-of-00002.safetensors": names[:20],
              "model-00002-of-00002.safetensors": names[20:]}
    for file, part in shards.items():
        write_safetensors(tmp_path / file, {n: tensors[n] for n in part})
    weight_map = {n: f for f, part in shards.items() for n in part}
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    info = read_model_info(tmp_path)
    assert info.layer_bytes == (BF16_LAYER,) * LAYERS
    assert info.weight_bytes == LAYERS * BF16_LAYER + 2 * BF16_EMBED + BF16_NORM


def test_several_model_files_without_index_are_all_read(tmp_path):
    write_config(tmp_path)
    tensors = model_tensors()
    layer2 = {n: t for n, t in tensors.items() if n.startswith("model.layers.2.")}
    write_safetensors(tmp_path / "model-a.safetensors", layer2)
    write_safetensors(
        tmp_path / "model-b.safetensors", {n: t for n, t in tensors.items() if n not in layer2}
    )
    assert read_model_info(tmp_path).layer_bytes == (BF16_LAYER,) * LAYERS


def test_shard_named_in_index_but_missing_is_an_error(tmp_path):
    make_model(tmp_path)
    index = {"weight_map": {"model.norm.weight": "model-00002-of-00002.safetensors"}}
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(ModelError, match="model-00002-of-00002"):
        read_model_info(tmp_path)


def test_float32_model_reserves_four_bytes_per_kv_element(tmp_path):
    write_config(tmp_path, torch_dtype="float32")
    tensors = {n: ("F32", shape) for n, (_, shape) in model_tensors().items()}
    write_safetensors(tmp_path / "model.safetensors", tensors)
    info = read_model_info(tmp_path)
    assert info.kv_bytes_per_token == (2 * KV_HEADS * HEAD_DIM * 4,) * LAYERS
    assert info.layer_bytes == (2 * BF16_LAYER,) * LAYERS


@pytest.mark.parametrize(
    "embed_dtype, config_dtype, element_bytes",
    [("BF16", "float32", 2), ("F32", "bfloat16", 4), ("U32", "float32", 4), ("U32", None, 2)],
)
def test_kv_element_size_follows_the_embedding_then_the_config(
    tmp_path, embed_dtype, config_dtype, element_bytes
):
    write_config(tmp_path, torch_dtype=config_dtype)
    tensors = model_tensors()
    tensors["model.embed_tokens.weight"] = (embed_dtype, (VOCAB, HIDDEN))
    write_safetensors(tmp_path / "model.safetensors", tensors)
    info = read_model_info(tmp_path)
    assert info.kv_bytes_per_token == (2 * KV_HEADS * HEAD_DIM * element_bytes,) * LAYERS


def test_head_dim_from_config_and_kv_heads_default_to_attention_heads(tmp_path):
    make_model(tmp_path, head_dim=8, num_key_value_heads=None)
    info = read_model_info(tmp_path)
    assert info.kv_bytes_per_token == (2 * HEADS * 8 * 2,) * LAYERS


def test_max_context_defaults_to_4096(tmp_path):
    make_model(tmp_path, max_position_embeddings=None)
    assert read_model_info(tmp_path).max_context == 4096


@pytest.mark.parametrize(
    "damage, message",
    [
        (lambda p: (p / "config.json").unlink(), "no config.json"),
        (lambda p: (p / "config.json").write_text("{not json"), "cannot read"),
        (lambda p: (p / "model.safetensors").unlink(), "no model"),
        (lambda p: (p / "model.safetensors").write_text("version https://git-lfs"), "LFS"),
        (lambda p: write_config(p, num_hidden_layers=4), r"lack layer\(s\) \[3\]"),
        (lambda p: write_config(p, num_hidden_layers=2), "beyond the 2 layers"),
        (lambda p: write_config(p, hidden_size=None), "hidden_size"),
    ],
)
def test_unreadable_models_raise_model_error(tmp_path, damage, message):
    make_model(tmp_path)
    damage(tmp_path)
    with pytest.raises(ModelError, match=message):
        read_model_info(tmp_path)


def test_truncated_safetensors_file_is_refused(tmp_path):
    make_model(tmp_path)
    file = tmp_path / "model.safetensors"
    file.write_bytes(file.read_bytes()[:-10])
    with pytest.raises(ModelError, match="truncated"):
        read_model_info(tmp_path)


def test_check_family_names_the_family_and_the_supported_ones(tmp_path):
    make_model(tmp_path, model_type="mamba")
    info = read_model_info(tmp_path)
    with pytest.raises(ModelError) as err:
        check_family(info)
    assert "'mamba' is not supported" in str(err.value)
    assert "llama, mistral, qwen2" in str(err.value)
    check_family({"model_type": "gemma3_text"})
    with pytest.raises(ModelError, match="'gpt2'"):
        check_family({"model_type": "gpt2"})


def test_resolve_model_accepts_a_local_directory_with_config(tmp_path):
    make_model(tmp_path / "m")
    assert resolve_model(str(tmp_path / "m")) == tmp_path / "m"
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelError, match="no config.json"):
        resolve_model(str(tmp_path / "empty"))
    with pytest.raises(ModelError, match="no model directory"):
        resolve_model(str(tmp_path / "missing"))


def test_resolve_model_downloads_repo_ids_and_explains_failures(tmp_path, monkeypatch):
    import huggingface_hub

    make_model(tmp_path / "snap")
    calls = []

    def fake_download(repo_id, **kwargs):
        calls.append((repo_id, kwargs))
        if repo_id == "owner/missing":
            raise RuntimeError("404 Client Error: Repository Not Found\nmore detail")
        return str(tmp_path / "snap")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_download)
    assert resolve_model("owner/model", cache_dir=tmp_path / "c") == tmp_path / "snap"
    assert calls[0][1]["cache_dir"] == str(tmp_path / "c")
    assert "model*.safetensors" in calls[0][1]["allow_patterns"]
    with pytest.raises(ModelError) as err:
        resolve_model("owner/missing")
    message = str(err.value)
    assert "neither a local model directory nor a downloadable" in message
    assert "Repository Not Found" in message and "\n" not in message


def test_plan_command_reads_a_real_checkpoint(tmp_path, capsys):
    make_model(tmp_path / "m")
    parser = argparse.ArgumentParser()
    add_plan_parser(parser.add_subparsers())
    args = parser.parse_args(["plan", "--model", str(tmp_path / "m"), "--memory", "1MiB,2MiB"])
    assert run_plan(args) == 0
    out = capsys.readouterr().out
    assert out.startswith("model m: partition memory")
    assert "[0, 1)" in out and "[1, 3)" in out


# Cross-check against checkpoints written by mlx-lm itself (its names, quantization, ties).
@pytest.mark.parametrize("family, tied, bits", [("llama", False, 4), ("qwen3", True, None)])
def test_sizes_match_an_mlx_lm_checkpoint(tmp_path, family, tied, bits):
    mx = need_module("mlx.core")
    nn = need_module("mlx.nn")
    models = need_module(f"mlx_lm.models.{family}")
    from mlx.utils import tree_flatten
    from mlx_lm.utils import save_config, save_model

    config = {
        "model_type": family, "hidden_size": 64, "num_hidden_layers": 4,
        "intermediate_size": 96, "num_attention_heads": 4, "num_key_value_heads": 2,
        "rms_norm_eps": 1e-5, "vocab_size": 128, "tie_word_embeddings": tied, "head_dim": 16,
        "max_position_embeddings": 512, "rope_theta": 10000.0,
    }
    model = models.Model(models.ModelArgs.from_dict(config))
    if bits:
        nn.quantize(model, group_size=32, bits=bits)
        config["quantization"] = {"group_size": 32, "bits": bits}
    mx.eval(model.parameters())
    save_model(tmp_path, model)
    save_config(config, tmp_path / "config.json")

    params = dict(tree_flatten(model.parameters()))
    info = read_model_info(tmp_path)
    for i in range(4):
        expect = sum(v.nbytes for k, v in params.items() if k.startswith(f"model.layers.{i}."))
        assert info.layer_bytes[i] == expect
    assert info.weight_bytes == sum(v.nbytes for v in params.values())
    assert info.tied is tied
    assert info.kv_bytes_per_token == (2 * 2 * 16 * 4,) * 4  # mlx-lm's default float32 weights
    assert info.stage_bytes(0, 4) == info.weight_bytes
    assert isinstance(info, ModelInfo)
