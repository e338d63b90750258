"""Shardline coordinator: the HTTP and gRPC APIs: request checking, dialects, structured output."""
