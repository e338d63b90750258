"""Shardline coordinator: plans the split, drives the pipeline and serves the public APIs."""
