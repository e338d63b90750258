"""Shardline coordinator: generation: the engine, batching, the pipeline, scheduling, metrics."""
