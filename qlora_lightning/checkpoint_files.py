"""Reading a checkpoint folder's safetensors shards: which files, each opened with an error that names it, every
tensor's shape from the headers, tensors read one at a time, and a fingerprint of the weights. The one reader for
loading (`model.load_model`), merging and the GGUF export; pickled weights are never read.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
from pathlib import Path

import torch
from safetensors import safe_open

__all__ = ["safetensors_shards", "open_safetensors", "weights_fingerprint", "CheckpointTensors"]


def safetensors_shards(checkpoint_dir: Path) -> list[Path]:
    """The safetensors files of a checkpoint folder, from its index when sharded."""
    index = checkpoint_dir / "model.safetensors.index.json"
    if index.is_file():
        weight_map = json.loads(index.read_text())["weight_map"]
        return [checkpoint_dir / f for f in sorted(set(weight_map.values()))]
    single = checkpoint_dir / "model.safetensors"
    if single.is_file():
        return [single]
    raise FileNotFoundError(
        f"{checkpoint_dir} has neither model.safetensors nor model.safetensors.index.json; "
        "only safetensors checkpoints are loaded (pickled .bin files are never unpickled)"
    )


@contextlib.contextmanager
def open_safetensors(path: Path):
    """`safe_open` on the CPU, with an error that names the file when it is not valid safetensors."""
    try:
        handle = safe_open(str(path), framework="pt", device="cpu")
    except Exception as e:  # safetensors' errors name no file
        raise ValueError(
            f"{path}: not a readable safetensors file ({e}); it is damaged or incomplete: download or save it again"
        ) from e
    with handle as f:
        yield f


def weights_fingerprint(checkpoint_dir: Path) -> str:
    """A short hash that tells one base model's weights from another's without reading them all.

    It covers each safetensors shard's header (tensor names, dtypes, shapes) and 16 KiB sampled at 16 evenly
    spaced places of its data: two checkpoints of the same architecture (LLaMA-2-7B and its chat model, a
    re-download of another revision) differ there, while the same weights under another path or name (a
    `builtin:` model and its folder) agree. Resume and adapter loading compare it to the base the adapters
    were trained on.
    """
    digest = hashlib.sha256()
    for shard in safetensors_shards(checkpoint_dir):
        size = shard.stat().st_size
        with open(shard, "rb") as f:
            header_len = int.from_bytes(f.read(8), "little")
            digest.update(f.read(min(header_len, size)))
            data_start, data_len = 8 + header_len, max(size - 8 - header_len, 0)
            for k in range(16):
                f.seek(data_start + data_len * k // 16)
                digest.update(f.read(1024))
    return digest.hexdigest()[:16]


class CheckpointTensors:
    """The tensors of a folder of safetensors shards by key, each read on demand on the CPU, and every key's shape
    (`shapes`, from the headers, in the shards' order) so that a caller can plan and check before reading a weight.

    With `expected`, every key is checked against the model up front, so a checkpoint of another architecture
    fails before anything is loaded. A shard is mapped only while one tensor is read from it, so host memory holds
    one tensor at a time, in whatever order the caller asks."""

    def __init__(self, checkpoint_dir: Path, expected: set[str] | None = None, model_name: str = ""):
        self.shard_of: dict[str, Path] = {}
        self.shapes: dict[str, tuple[int, ...]] = {}
        for shard in safetensors_shards(checkpoint_dir):
            with open_safetensors(shard) as f:
                for key in f.keys():  # noqa: SIM118 (safetensors' safe_open has keys() but is not iterable)
                    if expected is not None and key not in expected:
                        raise KeyError(
                            f"{shard}: tensor {key!r} has no place in {model_name} "
                            f"(is the folder's config.json the checkpoint's own?)"
                        )
                    self.shard_of[key] = shard
                    self.shapes[key] = tuple(f.get_slice(key).get_shape())

    def __contains__(self, key: str) -> bool:
        return key in self.shard_of

    def __call__(self, key: str, shape: torch.Size | None = None) -> torch.Tensor:
        """The tensor `key`, checked to have `shape` when one is given (the shape the model's config implies)."""
        shard = self.shard_of[key]
        with open_safetensors(shard) as f:
            try:
                tensor = f.get_tensor(key)
            except Exception as e:  # a truncated file: its header promises bytes that are not there
                raise ValueError(
                    f"{shard}: cannot read tensor {key} ({e}); the file is damaged or incomplete: "
                    "download or save it again"
                ) from e
        if shape is not None and tensor.shape != shape:
            raise ValueError(
                f"{shard}: {key} has shape {tuple(tensor.shape)}, the folder's config.json implies {tuple(shape)}"
            )
        return tensor
