"""A prefill chunk whose activations exceed gRPC's 4 MiB default passes between the stages."""

from __future__ import annotations

from conftest import Serving, reference_tokens, run

from coordinator.demo import ModelSpec

# hidden 256 in float32: 1 KiB of activations a token; 2 layers, untied, about 0.85 M parameters
SPEC = ModelSpec(family="llama", num_layers=2, hidden_size=256, intermediate_size=128,
                 num_attention_heads=4, num_key_value_heads=2, dtype="float32",
                 max_position_embeddings=8192)
CHUNK = 4200  # 4200 x 256 x 4 bytes = 4.1 MiB in one message from stage 0 to stage 1


def test_a_chunk_over_four_mib_goes_through_two_workers_exactly(model_dir, workers):
    path = model_dir(SPEC)
    prompt = [(29 * i + 13) % 480 + 10 for i in range(CHUNK + 1)]  # one chunk, then the last

    async def scenario():
        async with Serving(path, workers[:2], context=CHUNK + 64, prefill_chunk=CHUNK) as s:
            model = s.coordinator.model
            tokens, _, _ = await s.generate(prompt, 6)
            batcher = s.coordinator.engine.batcher
            return tokens, model.hidden_size * model.activation_bytes, batcher.prefill_chunks

    tokens, token_bytes, chunks = run(scenario())
    assert CHUNK * token_bytes > 4 << 20 and chunks == 2
    assert tokens == reference_tokens(path, prompt, 6)
