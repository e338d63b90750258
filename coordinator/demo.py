"""Tiny random-weight MLX models with a real (offline) tokenizer, for `serve --demo` and tests.

Nothing is downloaded: the tokenizer is a byte-level BPE trained on a small English corpus
embedded below, and the weights come from `mx.random` under a fixed seed, drawn on the CPU so
that every host builds the same bytes. Default-init random weights make greedy decoding repeat
one or two tokens, which makes token parity a weak test; so linear weights (and untied
embeddings; never norms or biases) are scaled up by `weight_scale`. The head rows of special
tokens are zeroed so a random model never emits EOS or a chat marker by itself (greedy); a test
that wants EOS can ask for it with a logit bias or a stop string.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import re
import shutil
import tempfile
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from protos import SUPPORTED_FAMILIES, default_cache_dir

FAMILIES = SUPPORTED_FAMILIES
TIED_FAMILIES = ("gemma", "gemma2", "gemma3_text")  # always tied: spec.tied is forced to True
# Default weight_scale per family, tuned (8 seeds, tied/untied, 4/8-bit) so that greedy output
# over 32 tokens has >= 8 distinct tokens. qwen3 normalizes q and k, so it needs a larger scale.
FAMILY_WEIGHT_SCALE: dict[str, float] = {family: 2.5 for family in FAMILIES} | {"qwen3": 4.0}
SPECIAL_TOKENS = ("<|bos|>", "<|eos|>", "<|pad|>", "<|im_start|>", "<|im_end|>")
SLIDING_WINDOW = 8  # small, so a 40-token prompt + 32 new tokens crosses it
SLIDING_PATTERN = 3  # every 3rd layer attends globally, the others through the window
# Bump when the builder changes in a way that changes the files: cached models are rebuilt.
BUILD_VERSION = 2  # 2: the chat template takes tools

# ChatML, with tools in the Hermes / Qwen style (mlx-lm reads its calls with `json_tools`).
CHATML_TEMPLATE = (
    "{% if tools %}{{ '<|im_start|>system\\nYou may call these tools:\\n<tools>' }}"
    "{% for tool in tools %}{{ '\\n' + (tool | tojson) }}{% endfor %}"
    "{{ '\\n</tools>\\nCall one as <tool_call>\\n{\"name\": <name>, \"arguments\": "
    "<object>}\\n</tool_call><|im_end|>\\n' }}{% endif %}"
    "{% for message in messages %}"
    "{% if message['role'] == 'assistant' and message.tool_calls %}"
    "{{ '<|im_start|>assistant\\n' + (message['content'] or '') }}"
    "{% for tool_call in message.tool_calls %}"
    "{% if tool_call.function %}{% set tool_call = tool_call.function %}{% endif %}"
    "{{ '<tool_call>\\n{\"name\": \"' + tool_call.name + '\", \"arguments\": ' "
    "+ (tool_call.arguments | tojson) + '}\\n</tool_call>' }}{% endfor %}"
    "{{ '<|im_end|>\\n' }}"
    "{% elif message['role'] == 'tool' %}"
    "{{ '<|im_start|>user\\n<tool_response>\\n' + message['content'] "
    "+ '\\n</tool_response><|im_end|>\\n' }}"
    "{% else %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)

CORPUS = """\
The quick brown fox jumps over the lazy dog. A small cluster of computers can run one large
language model when each machine holds a slice of its layers. Every token walks the same path:
the first machine embeds it, each stage runs its layers, and the last stage picks the next word.

It was a bright cold day in April, and the clocks were striking thirteen. The rain had stopped
before noon, and the streets smelled of wet stone and fresh bread. Children ran past the market
stalls, where farmers sold apples, pears, onions, potatoes, honey and warm loaves of rye.

To make a simple tomato soup, chop two onions and three cloves of garlic. Cook them slowly in
olive oil until soft, then add a kilogram of ripe tomatoes, a pinch of salt and a cup of water.
Simmer for twenty minutes, blend until smooth, and serve with basil and a slice of toast.

Water boils at one hundred degrees Celsius at sea level. Light from the Sun takes about eight
minutes to reach the Earth. The human heart beats roughly seventy times a minute, and an adult
body holds about five litres of blood. Plants turn sunlight, water and air into sugar.

"Where are you going?" asked the old man. "North, to the mountains," she answered. "The road is
long and the nights are cold." He nodded, handed her a lantern, and said, "Then take this light.
You will need it more than I do." She thanked him, smiled, and walked on into the evening.

def add(a, b):
    return a + b

for i in range(10):
    print(i, add(i, i * 2))

Question: What is the capital of France? Answer: Paris. Question: How many days are in a week?
Answer: Seven. Question: Which planet is known as the red planet? Answer: Mars. Question: Who
wrote the play Hamlet? Answer: William Shakespeare, around the year 1600.

In 1969, astronauts landed on the Moon for the first time. Millions of people watched on
television as the first steps were taken. Later missions brought back rocks, photographs and
new questions about how the Moon was formed, and whether water might be hidden in its craters.

Dear team, thank you for your hard work this quarter. Sales grew by 12% and costs fell by 3%.
Please send your reports by Friday, 5 p.m., and remember that the office will be closed on
Monday. Best regards, Maria.

Music is the art of arranging sounds in time. A melody is a sequence of notes; harmony is what
we hear when notes sound together; rhythm is the pattern of long and short. Some songs are
happy, some are sad, and the best ones make us want to dance, sing, or simply listen quietly.

The network was slow, so the engineers measured every hop: one hundred and fifty microseconds on
a local stream, half a millisecond for a single call. They wrote the numbers down, drew a graph,
and decided to keep one persistent connection open between each pair of neighbouring machines.

Birds fly south in winter because food becomes scarce. Some travel thousands of kilometres,
crossing seas and deserts, guided by the stars, the Sun and the magnetic field of the Earth.
When spring returns, they come back to the same trees, the same roofs and the same gardens.

Mathematics: 2 + 2 = 4, 3 * 7 = 21, 10 / 4 = 2.5, and the square root of 81 is 9. A prime number
has exactly two divisors; the first primes are 2, 3, 5, 7, 11, 13, 17, 19, 23 and 29.

Hello! How are you today? I am fine, thanks. Could you help me write a short poem about the sea?
Of course. The sea is wide, the sea is deep; it sings the sailors off to sleep. Its waves are
grey, its foam is white, it keeps the harbour lamps alight.
"""


QUIET_SCALE = 0.05  # ModelSpec.quiet_scale's default


@dataclass(frozen=True)
class ModelSpec:
    """What to build: family, shape, quantization, dtype and the random seed.

    `tied` is forced to True for the gemma families (their heads are always the embedding).
    `weight_scale=None` resolves to the family's tuned default in FAMILY_WEIGHT_SCALE.
    """

    family: str = "llama"
    num_layers: int = 6
    hidden_size: int = 64
    intermediate_size: int = 128
    num_attention_heads: int = 4
    num_key_value_heads: int = 2
    vocab_size: int = 512
    tied: bool = False
    bits: int | None = None
    dtype: str = "bfloat16"
    seed: int = 0
    weight_scale: float | None = None
    max_position_embeddings: int = 2048
    # layers from this index on add little to the residual (output projections scaled by
    # quiet_scale): a draft of the layers before it (draft_model) agrees with the model mostly
    quiet_after: int = 0
    quiet_scale: float = QUIET_SCALE
    # a model that repeats text (for prompt lookup): every layer quiet and the head mapping each
    # ordinary token to the next id of its block of `cycle` ids (the last back to the first)
    cycle: int = 0

    def __post_init__(self) -> None:
        if self.family not in FAMILIES:
            raise ValueError(f"unknown family {self.family!r}; choose one of {FAMILIES}")
        if self.dtype not in ("bfloat16", "float16", "float32"):
            raise ValueError(f"dtype must be bfloat16, float16 or float32, not {self.dtype!r}")
        if self.bits not in (None, 4, 8):
            raise ValueError(f"bits must be None, 4 or 8, not {self.bits}")
        if self.vocab_size < 512:
            raise ValueError("vocab_size must be >= 512, the tokenizer's size")
        if self.hidden_size % self.num_attention_heads:
            raise ValueError("hidden_size must be a multiple of num_attention_heads")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError("num_attention_heads must be a multiple of num_key_value_heads")
        if self.family in TIED_FAMILIES and not self.tied:
            object.__setattr__(self, "tied", True)
        if self.cycle and (self.tied or self.cycle < 2 or self.quiet_after):
            raise ValueError("cycle needs an untied head, a length of 2 or more and no "
                             "quiet_after (it quiets every layer)")
        if self.weight_scale is None:
            object.__setattr__(self, "weight_scale", FAMILY_WEIGHT_SCALE[self.family])

    def key(self) -> str:
        """Short, stable directory name: family plus a hash of every field and the builder."""
        fields = asdict(self)
        if not self.quiet_after:
            del fields["quiet_after"]  # models built before the field keep their keys
        if self.quiet_scale == QUIET_SCALE:
            del fields["quiet_scale"]
        if not self.cycle:
            del fields["cycle"]
        blob = json.dumps(
            {"spec": fields, "version": BUILD_VERSION, "corpus": CORPUS}, sort_keys=True
        )
        digest = hashlib.sha256(blob.encode()).hexdigest()[:12]
        quant = f"-q{self.bits}" if self.bits else ""
        return f"{self.family}-l{self.num_layers}-h{self.hidden_size}{quant}-{digest}"


# 8 layers of hidden 128: 0.92 M parameters, 1.8 MB in bfloat16.
DEMO_SPEC = ModelSpec(
    family="llama",
    num_layers=8,
    hidden_size=128,
    intermediate_size=128,
    num_attention_heads=4,
    num_key_value_heads=2,
)


def build_tokenizer(out_dir: Path) -> None:
    """Train a 512-token byte-level BPE on CORPUS and save it with a ChatML chat template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()  # mlx_lm then picks BPEStreamingDetokenizer
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=512,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(CORPUS.splitlines(keepends=True), trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<|bos|>",
        eos_token="<|eos|>",
        pad_token="<|pad|>",
        chat_template=CHATML_TEMPLATE,
    )
    fast.save_pretrained(str(out_dir))


def _head_dim(spec: ModelSpec) -> int:
    return spec.hidden_size // spec.num_attention_heads


def model_config(spec: ModelSpec, token_ids: dict[str, int]) -> dict[str, Any]:
    """The config.json (before quantization) for `spec`; its family's ModelArgs accept it."""
    head_dim = _head_dim(spec)
    n = spec.num_layers
    cfg: dict[str, Any] = {
        "model_type": spec.family,
        "hidden_size": spec.hidden_size,
        "num_hidden_layers": n,
        "intermediate_size": spec.intermediate_size,
        "num_attention_heads": spec.num_attention_heads,
        "num_key_value_heads": spec.num_key_value_heads,
        "vocab_size": spec.vocab_size,
        "rms_norm_eps": 1e-5,
        "max_position_embeddings": spec.max_position_embeddings,
        "rope_theta": 10000.0,
        "tie_word_embeddings": spec.tied,
        "bos_token_id": token_ids["<|bos|>"],
        # Like Llama 3 / Qwen chat models: stop at end-of-text and at end-of-turn.
        "eos_token_id": [token_ids["<|eos|>"], token_ids["<|im_end|>"]],
        "pad_token_id": token_ids["<|pad|>"],
    }
    fam = spec.family
    if fam == "mistral":
        # mlx-lm runs mistral as llama; `layer_types` gives it real sliding-window layers
        # (the last layer is always global: llama needs at least one full-attention layer).
        cfg["sliding_window"] = SLIDING_WINDOW
        cfg["layer_types"] = [
            "full_attention"
            if i % SLIDING_PATTERN == SLIDING_PATTERN - 1 or i == n - 1
            else "sliding_attention"
            for i in range(n)
        ]
    elif fam == "qwen3":
        cfg["head_dim"] = head_dim
    elif fam in ("gemma", "gemma2", "gemma3_text"):
        cfg["head_dim"] = head_dim
        cfg["rms_norm_eps"] = 1e-6
        cfg["hidden_activation"] = "gelu_pytorch_tanh"
    if fam == "gemma2":
        cfg["query_pre_attn_scalar"] = head_dim
        cfg["attn_logit_softcapping"] = 50.0
        cfg["final_logit_softcapping"] = 30.0
        # mlx-lm 0.32's gemma2 ignores sliding_window (all layers global); kept for realism.
        cfg["sliding_window"] = SLIDING_WINDOW
    elif fam == "gemma3_text":
        cfg["query_pre_attn_scalar"] = head_dim
        cfg["rope_local_base_freq"] = 10000.0
        cfg["sliding_window"] = SLIDING_WINDOW
        # gemma3_text indexes cache[pattern - 1], so the pattern may not exceed the layers.
        cfg["sliding_window_pattern"] = max(1, min(SLIDING_PATTERN, n))
    elif fam == "phi3":
        cfg["partial_rotary_factor"] = 1.0
        cfg["original_max_position_embeddings"] = spec.max_position_embeddings
    return cfg


_BUILD_LOCK = threading.Lock()  # mx.random's seed is process-global: one build at a time


def _group_size(spec: ModelSpec) -> int:
    dims = (spec.hidden_size, spec.intermediate_size, spec.num_attention_heads * _head_dim(spec))
    for group in (64, 32):
        if all(d % group == 0 for d in dims):
            return group
    raise ValueError(f"no quantization group size (64, 32) divides the model's dims {dims}")


def _scale_weights(model: Any, spec: ModelSpec, special_ids: list[int]) -> None:
    """Scale linear/embedding weights (not norms, not biases); zero special tokens' head rows."""
    import mlx.core as mx
    import mlx.nn as nn
    from mlx.utils import tree_flatten

    # A tied embedding is also the head: scaled up, the head keeps predicting the current token
    # (gemma also multiplies it by sqrt(hidden)), so it stays as drawn. Untied ones are scaled.
    tied = "lm_head" not in model
    updates = []
    for name, module in tree_flatten(model.leaf_modules(), is_leaf=nn.Module.is_module):
        if not isinstance(module, nn.Linear | nn.Embedding):
            continue
        is_embed = isinstance(module, nn.Embedding)
        scale = 1.0 if is_embed and tied else float(spec.weight_scale)
        weight = module.weight * scale
        if name.endswith("lm_head") or (is_embed and tied):
            weight = _without_rows(weight, special_ids)
        updates.append((name + ".weight", weight))
    model.load_weights(updates, strict=False)
    mx.eval(model.parameters())


def build_model(out_dir: Path, spec: ModelSpec = ModelSpec()) -> Path:
    """Write config.json, model.safetensors (+ index) and tokenizer files into `out_dir`."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    build_tokenizer(out_dir)
    vocab = json.loads((out_dir / "tokenizer.json").read_text())["added_tokens"]
    token_ids = {t["content"]: t["id"] for t in vocab}
    cfg = model_config(spec, token_ids)
    import mlx.core as mx

    # On the CPU, so a Mac, a CUDA box and a CPU-only host build the same bytes (GPU kernels
    # for random normals and quantization round differently). SHARDLINE_BUILD_DEVICE=gpu
    # builds on the GPU instead: minutes faster for the 8B shape, other bytes (bench/gpu.sh).
    on_gpu = os.environ.get("SHARDLINE_BUILD_DEVICE", "").strip().lower() == "gpu"
    with _BUILD_LOCK, mx.stream(mx.default_device() if on_gpu else mx.cpu):
        _build_weights(out_dir, spec, cfg, [token_ids[t] for t in SPECIAL_TOKENS])
        # MLX keeps freed buffers for reuse: the 8B shape's build leaves tens of GB there,
        # which the workers and mlx-lm that a benchmark starts next would run out of
        mx.clear_cache()
    return out_dir


def _build_weights(out_dir: Path, spec: ModelSpec, cfg: dict[str, Any], special: list[int]) -> None:
    import mlx.core as mx
    from mlx_lm.utils import _get_classes, quantize_model, save_config, save_model

    model_cls, args_cls = _get_classes(cfg)
    mx.random.seed(spec.seed)
    model = model_cls(args_cls.from_dict(cfg))
    if spec.tied and "lm_head" in model:  # gemma3_text builds a head and drops it on load
        model.pop("lm_head")
        model.tie_word_embeddings = True
    mx.eval(model.parameters())
    _scale_weights(model, spec, special)
    if spec.quiet_after:
        _quiet(model, spec.quiet_after, spec.quiet_scale)
    if spec.cycle:
        _quiet(model, 0, spec.quiet_scale)
        _cycle(model, spec.cycle, special)
    model.set_dtype(getattr(mx, spec.dtype))
    if spec.bits:
        with contextlib.redirect_stdout(io.StringIO()):  # mlx-lm prints bits per weight
            model, cfg = quantize_model(model, cfg, group_size=_group_size(spec), bits=spec.bits)
    save_model(out_dir, model)
    save_config(cfg, config_path=out_dir / "config.json")



def _quiet(model: Any, start: int, scale: float) -> None:
    """Scale the output projections of layers [start, ...) by `scale`."""
    import mlx.core as mx

    updates = []
    for i, layer in enumerate(model.layers):
        if i >= start:
            for name, proj in (("self_attn.o_proj", layer.self_attn.o_proj),
                               ("mlp.down_proj", layer.mlp.down_proj)):
                updates.append((f"model.layers.{i}.{name}.weight", proj.weight * scale))
    model.load_weights(updates, strict=False)
    mx.eval(model.parameters())


def cycle_next(token: int, length: int) -> int:
    """The token a `ModelSpec.cycle` model predicts after `token` (an ordinary one)."""
    base = token - token % length
    return base + (token + 1 - base) % length


def cycle_prompt(tokens: int, length: int = 16, base: int = 256) -> list[int]:
    """`tokens` ids of the block of `length` ids from `base`, in cycle order: a prompt whose
    continuation by a `ModelSpec.cycle` model of that length is text the prompt holds."""
    return [base + i % length for i in range(tokens)]


def _without_rows(weight: Any, rows: list[int]) -> Any:
    """`weight` with these rows zeroed (a plain mask, not a scatter: no kernel to JIT on CUDA)."""
    import mlx.core as mx

    drop = set(rows)
    keep = mx.array([[0.0 if i in drop else 1.0] for i in range(weight.shape[0])])
    return weight * keep.astype(weight.dtype)


def _cycle(model: Any, length: int, special: list[int]) -> None:
    """Make the head's row for each token the embedding of the token before it in its block of
    `length` ids, so that (the layers being quiet) the model continues the block's cycle.
    Blocks holding a special token map to themselves, and special tokens' rows stay zero."""
    import mlx.core as mx

    embed = model.model.embed_tokens.weight
    vocab = embed.shape[0]
    blocked = {t - t % length for t in special}
    before = list(range(vocab))  # head row j: the embedding of the token j follows
    for t in range(vocab):
        base = t - t % length
        if base not in blocked and base + length <= vocab:
            before[cycle_next(t, length)] = t
    head = _without_rows(embed[mx.array(before)], special)
    model.load_weights([("lm_head.weight", head)], strict=False)
    mx.eval(model.parameters())


def draft_model(target: Path, layers: int, out_dir: Path | None = None) -> Path:
    """A draft of `target`: its first `layers` layers with its embedding, norm and head (and
    tokenizer), written once next to it (or into `out_dir`)."""
    import mlx.core as mx

    target = Path(target)
    out = Path(out_dir) if out_dir else target.with_name(f"{target.name}-draft{layers}")
    if (out / "config.json").exists():
        return out
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        weights: dict[str, Any] = {}
        for file in sorted(target.glob("model*.safetensors")):
            weights.update(mx.load(str(file)))
        kept = {k: v for k, v in weights.items()
                if not (m := re.search(r"\.layers\.(\d+)\.", k)) or int(m.group(1)) < layers}
        mx.save_safetensors(str(tmp / "model.safetensors"), kept, metadata={"format": "mlx"})
        config = json.loads((target / "config.json").read_text())
        config["num_hidden_layers"] = layers
        (tmp / "config.json").write_text(json.dumps(config, indent=2))
        for file in target.iterdir():
            if file.is_file() and not file.name.startswith(("model", "config.json")):
                shutil.copy2(file, tmp / file.name)
        os.chmod(tmp, 0o755)
        try:
            os.rename(tmp, out)
        except OSError:
            if not (out / "config.json").exists():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def cached_model(spec: ModelSpec = ModelSpec(), cache_dir: Path | None = None) -> Path:
    """Build `spec` once into cache_dir/models/<spec.key()> and reuse it afterwards.

    The model is built in a temporary sibling directory and renamed into place, so a reader
    never sees a half-written model; when two processes race, one rename wins and the loser
    discards its copy.
    """
    root = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    models = root / "models"
    final = models / spec.key()
    if (final / "config.json").exists():
        return final
    models.mkdir(parents=True, exist_ok=True)
    _remove_stale_temps(models)
    tmp = Path(tempfile.mkdtemp(prefix=f".{spec.key()}.", dir=models))
    os.chmod(tmp, 0o755)  # mkdtemp makes it private; a cached model is an ordinary directory
    try:
        build_model(tmp, spec)
        try:
            os.rename(tmp, final)
        except OSError:
            if not (final / "config.json").exists():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return final


def _remove_stale_temps(models: Path, max_age_s: float = 3600.0) -> None:
    """Drop temp build dirs that a crashed process left behind (live builds take < 1 s)."""
    now = time.time()
    for path in models.glob(".*"):
        try:
            if path.is_dir() and now - path.stat().st_mtime > max_age_s:
                shutil.rmtree(path, ignore_errors=True)
        except OSError:
            pass
