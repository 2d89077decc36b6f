"""Resolve a hub id to a local snapshot: safetensors when the repo has them, else *.bin."""

from __future__ import annotations

from pathlib import Path

from llmkit.errors import LlmkitError

_COMMON = ["*.json", "tokenizer.model", "*.txt", "*.jinja"]


def download(repo_id: str, revision: str | None = None) -> Path:
    """Download (or reuse from the local cache) the files llmkit needs from `repo_id`."""
    from huggingface_hub import HfApi, snapshot_download

    try:
        files = HfApi().list_repo_files(repo_id, revision=revision)
    except Exception as e:  # the network boundary: any failure here means "not reachable"
        return _from_cache(repo_id, revision, reason=e)
    weights = ["*.safetensors"] if any(f.endswith(".safetensors") for f in files) else ["*.bin"]
    try:
        return Path(snapshot_download(repo_id, revision=revision, allow_patterns=_COMMON + weights))
    except Exception as e:
        raise LlmkitError(_message(repo_id, e)) from None


def _from_cache(repo_id: str, revision: str | None, reason: Exception) -> Path:
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(repo_id, revision=revision, local_files_only=True))
    except Exception:
        raise LlmkitError(_message(repo_id, reason)) from None


def _message(repo_id: str, error: Exception) -> str:
    reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    return (
        f"cannot get '{repo_id}' from the Hugging Face hub and it is not in the local cache "
        f"({reason}); check the id and your network, or pass a local directory"
    )
