"""Benchmarks of checkpoints and servers: throughput, latency, memory, quality."""
