"""Recipes: pipelines of llmkit steps described in YAML, run by `llmkit run`."""
