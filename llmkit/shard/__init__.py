"""Resharding for tensor/pipeline-parallel layouts."""
