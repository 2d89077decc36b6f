"""Inference runtime: scheduler, KV blocks, model runner, engine, server."""
