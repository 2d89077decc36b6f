"""Quantizers (pure tensor math), formats, and the pipelines that apply them to checkpoints."""
