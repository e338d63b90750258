"""Shardline coordinator: the workers: discovery, membership, planning, shipping weights."""
