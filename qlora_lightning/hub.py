"""Where a model's files come from: a `builtin:` model, a local folder, or a Hugging Face hub repository.

One place decides, so that each failure names what the user typed and what to check: a local folder that
does not exist is reported as such (transformers would call it a malformed repo id), and a hub repository
that cannot be fetched (no network, a typo, a gated model) says so with the hub's own reason.
"""

from __future__ import annotations

import os
from pathlib import Path

from . import builtin

__all__ = ["resolve", "checkpoint_dir"]

#: The files of a model repository that loading, tokenizers and export use; pickled weights are never fetched.
MODEL_FILES = ["*.json", "*.safetensors", "*.model", "*.txt", "*.jinja"]


def _looks_like_path(name: str) -> bool:
    """Whether `name` can only be a local path: absolute, `./`, `../`, `~`, or more than one `/` (hub ids are
    `name` or `owner/name`)."""
    return name.startswith(("/", "./", "../", "~", ".\\")) or name.count("/") > 1 or "\\" in name


def resolve(name_or_path: str) -> str:
    """A `builtin:` model → its folder (converted on first use); an existing local folder → itself; a hub id →
    unchanged. A name that can only be a local path and does not exist raises `FileNotFoundError`."""
    name_or_path = builtin.resolve(name_or_path)
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        return str(path)
    if path.exists():
        raise NotADirectoryError(
            f"model {name_or_path!r} is a file; expected a model folder (config.json and "
            "safetensors weights, as save_pretrained writes) or a hub id"
        )
    if _looks_like_path(name_or_path):
        raise FileNotFoundError(f"model folder {name_or_path!r} does not exist")
    return name_or_path


def checkpoint_dir(name_or_path: str, *, revision: str | None = None) -> Path:
    """The local folder holding a model's config, safetensors weights and tokenizer: the folder itself, or the
    hub repository's files fetched into the hub cache (`MODEL_FILES` only)."""
    resolved = resolve(name_or_path)
    if os.path.isdir(resolved):
        return Path(resolved)
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(resolved, revision=revision, allow_patterns=MODEL_FILES))
    except Exception as e:  # the hub client raises many types; all mean the same to the user
        raise FileNotFoundError(
            f"model {name_or_path!r} is not a local folder, and fetching it from the Hugging Face hub failed: "
            f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''} (check the name, the network, "
            "HF_HUB_OFFLINE, and for gated models `huggingface-cli login`)"
        ) from e
