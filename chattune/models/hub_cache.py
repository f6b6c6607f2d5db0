"""Hub models already in the local Hugging Face cache, found without the network."""

from __future__ import annotations

from pathlib import Path


def cached_hub_model(repo_id: str) -> Path | None:
    """The snapshot folder of hub model `repo_id` in the local cache (HF_HOME / HF_HUB_CACHE), or None when it is
    not there or `repo_id` is not spelled like a hub id. Never reaches the network, so it works offline."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HFValidationError, LocalEntryNotFoundError

    try:
        return Path(snapshot_download(repo_id, local_files_only=True))
    except (LocalEntryNotFoundError, HFValidationError, OSError):
        return None
