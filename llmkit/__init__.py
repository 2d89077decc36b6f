"""llmkit: prepare large language models and serve them locally."""

__version__ = "0.1.0"
