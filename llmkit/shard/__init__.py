"""Reshard checkpoints for tensor/pipeline-parallel layouts: plan, write, merge, verify."""
