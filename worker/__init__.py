"""Shardline worker: loads a slice of a model's layers and runs it as one pipeline stage."""
