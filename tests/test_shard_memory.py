"""Each worker holds only its slice: resident MLX memory after loading is close to its plan."""

from __future__ import annotations

import pytest
from conftest import Serving, run

from coordinator.demo import ModelSpec

# Large enough (about 9 MB in bf16) that fixed allocator overheads do not hide the slice size.
SPEC = ModelSpec(family="llama", num_layers=6, hidden_size=256, intermediate_size=768,
                 num_attention_heads=8, num_key_value_heads=4, vocab_size=2048)


@pytest.mark.parametrize("spec", [SPEC, ModelSpec(**{**SPEC.__dict__, "bits": 4})],
                         ids=["bf16", "q4"])
def test_each_worker_holds_only_its_planned_slice(spec, model_dir, workers):
    path = model_dir(spec)

    async def loaded():
        async with Serving(path, workers) as s:
            cluster = s.coordinator.cluster
            return [(st.weight_bytes, w.shard.active_memory_bytes, w.shard.weight_bytes)
                    for st, w in zip(cluster.plan.stages, cluster.workers, strict=True)]

    rows = run(loaded())
    total = sum(planned for planned, _, _ in rows)
    for planned, resident, loaded_bytes in rows:
        assert abs(resident - planned) <= 0.15 * planned, (planned, resident)
        assert loaded_bytes == planned
        assert resident < 0.8 * total  # far from the whole model
