"""Adapter checkpoints: adapter-only state, PEFT-format export/import, and atomic writes.

A PEFT LoRA adapter folder holds `adapter_config.json` and `adapter_model.safetensors` with keys
`base_model.model.<module>.lora_A.weight` / `.lora_B.weight`; `PeftModel.from_pretrained(base, folder)`
loads it unchanged (the model card's snippet). `AtomicCheckpointIO` makes Lightning's saves atomic and
writes such a folder beside every `.ckpt`, so each checkpoint is also a ready-to-use adapter.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO
from safetensors.torch import load_file, save_file
from torch import nn

from .lora import LoraLinear, lora_layers, unwrapped_name

ADAPTER_WEIGHTS = "adapter_model.safetensors"
ADAPTER_CONFIG = "adapter_config.json"
PEFT_PREFIX = "base_model.model."
LORA_KEY = re.compile(r"^(?P<module>.+)\.(?P<ab>lora_[AB])$")


def is_adapter_key(name: str) -> bool:
    """Whether a state-dict key names a LoRA tensor (`….lora_A` / `….lora_B`)."""
    return LORA_KEY.match(name) is not None


def adapter_state_dict(model: nn.Module, prefix: str = "") -> dict[str, torch.Tensor]:
    """Only the LoRA tensors of `model`, keyed as in `model.state_dict()` (`[prefix]<module>.lora_A`).

    Read from the modules, so under FSDP these are this rank's shards: gather through the strategy's state
    dict instead (as `QLoRAModule` does)."""
    return {f"{prefix}{name}.{ab}": getattr(layer, ab).detach() for name, layer in lora_layers(model).items()
            for ab in ("lora_A", "lora_B")}


def to_peft_keys(state: dict[str, torch.Tensor], prefix: str = "") -> dict[str, torch.Tensor]:
    """`[prefix]<module>.lora_A` → `base_model.model.<module>.lora_A.weight` (PEFT's saved layout)."""
    out = {}
    for key, value in state.items():
        if not key.startswith(prefix) or not is_adapter_key(key[len(prefix):]):
            continue
        out[f"{PEFT_PREFIX}{key[len(prefix):]}.weight"] = value.detach().contiguous().cpu()
    return out


def from_peft_keys(state: dict[str, torch.Tensor], source: str) -> dict[str, torch.Tensor]:
    """Inverse of `to_peft_keys`; also accepts PEFT's in-memory `.lora_A.default.weight` form."""
    out = {}
    for key, value in state.items():
        m = re.match(r"^base_model\.model\.(?P<module>.+)\.(?P<ab>lora_[AB])(\.default)?\.weight$", key)
        if m is None:
            raise KeyError(f"{source}: {key!r} is not a LoRA A/B weight in PEFT's layout "
                           "(only plain LoRA adapters are supported: no DoRA magnitudes, no modules_to_save)")
        out[f"{m['module']}.{m['ab']}"] = value
    return out


def peft_target_modules(model: nn.Module, lora_modules: list[str]) -> list[str] | str:
    """`target_modules` for adapter_config.json: suffixes when they pick exactly our modules, else a regex."""
    suffixes = sorted({name.rsplit(".", 1)[-1] for name in lora_modules})
    picked = {unwrapped_name(n) for n, m in model.named_modules()
              if isinstance(m, (nn.Linear, LoraLinear)) and n.rsplit(".", 1)[-1] in suffixes}
    if picked == set(lora_modules):
        return suffixes
    return "^(" + "|".join(re.escape(n) for n in sorted(lora_modules)) + ")$"


def peft_adapter_config(model: nn.Module, *, base_model: str, r: int, alpha: float, dropout: float) -> dict[str, Any]:
    """The adapter_config.json that PEFT needs to rebuild our adapters on `base_model`."""
    names = sorted(lora_layers(model))
    return {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_model,
        "r": r,
        "lora_alpha": alpha,
        "lora_dropout": dropout,
        "target_modules": peft_target_modules(model, names),
        "bias": "none",
        "fan_in_fan_out": False,
        "inference_mode": True,
        "init_lora_weights": True,
        "use_rslora": False,
        "use_dora": False,
        "modules_to_save": None,
    }


def atomic_write_bytes(path: Path, write) -> None:
    """Call `write(tmp_path)` then rename onto `path`: a kill mid-write leaves the old file whole."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def save_peft_adapter(folder: str | os.PathLike, state: dict[str, torch.Tensor], config: dict[str, Any]) -> Path:
    """Write `state` (PEFT keys) and `config` as a PEFT adapter folder, each file atomically."""
    folder = Path(folder)
    atomic_write_bytes(folder / ADAPTER_WEIGHTS, lambda p: save_file(state, p, metadata={"format": "pt"}))
    atomic_write_bytes(folder / ADAPTER_CONFIG, lambda p: Path(p).write_text(json.dumps(config, indent=2) + "\n"))
    return folder


def export_adapter(model: nn.Module, folder: str | os.PathLike, *, base_model: str, r: int, alpha: float,
                   dropout: float) -> Path:
    """Save `model`'s adapters as a PEFT adapter folder."""
    config = peft_adapter_config(model, base_model=base_model, r=r, alpha=alpha, dropout=dropout)
    return save_peft_adapter(folder, to_peft_keys(adapter_state_dict(model)), config)


def read_peft_adapter(folder: str | os.PathLike) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """(adapter_config, {<module>.lora_A: tensor}) of a PEFT LoRA adapter folder.

    `adapter_model.bin` (older PEFT) is read with `torch.load(weights_only=True)`, which refuses
    anything but tensors, so no code in the file can run.
    """
    folder = Path(folder)
    config_path = folder / ADAPTER_CONFIG
    if not config_path.is_file():
        raise FileNotFoundError(f"{folder}: no {ADAPTER_CONFIG}; not a PEFT adapter folder")
    config = json.loads(config_path.read_text())
    if config.get("peft_type", "LORA") != "LORA":
        raise ValueError(f"{config_path}: peft_type {config.get('peft_type')!r} is not supported; expected 'LORA'")
    for key in ("use_dora", "use_rslora"):
        if config.get(key):
            raise ValueError(f"{config_path}: {key}=true is not supported by LoraLinear4bit")
    for key in ("rank_pattern", "alpha_pattern"):
        if config.get(key):
            raise ValueError(f"{config_path}: per-module {key} is not supported; all adapters share r and alpha")
    if (folder / ADAPTER_WEIGHTS).is_file():
        weights_path = folder / ADAPTER_WEIGHTS
        raw = load_file(str(weights_path))
    elif (folder / "adapter_model.bin").is_file():
        weights_path = folder / "adapter_model.bin"
        raw = torch.load(weights_path, map_location="cpu", weights_only=True)
    else:
        raise FileNotFoundError(f"{folder}: neither {ADAPTER_WEIGHTS} nor adapter_model.bin")
    return config, from_peft_keys(raw, str(weights_path))


def checked_adapter_state(model: nn.Module, folder: str | os.PathLike, *,
                          base_model: str | None = None) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """(config, {<module>.lora_A: tensor}) of a PEFT adapter that fits `model`'s LoRA layers (which may
    still be on the meta device); every mismatch is a clear error.

    Checks: the same set of adapted modules, the same r and alpha, each tensor's shape, and (when
    `base_model` is given) the base the adapter was trained on.
    """
    config, state = read_peft_adapter(folder)
    layers = lora_layers(model)
    if not layers:
        raise ValueError("the model has no LoRA layers to load an adapter into")
    trained_on = config.get("base_model_name_or_path")
    if base_model is not None and trained_on and Path(str(trained_on)).name != Path(str(base_model)).name:
        raise ValueError(f"{folder}: adapter was trained on {trained_on!r}, not on {base_model!r}")
    any_layer = next(iter(layers.values()))
    if config.get("r") != any_layer.r or float(config.get("lora_alpha", any_layer.alpha)) != float(any_layer.alpha):
        raise ValueError(f"{folder}: adapter has r={config.get('r')}, lora_alpha={config.get('lora_alpha')}; "
                         f"the model's LoRA layers have r={any_layer.r}, alpha={any_layer.alpha}")
    adapter_modules = {k.rsplit(".", 1)[0] for k in state}
    missing, unexpected = sorted(set(layers) - adapter_modules), sorted(adapter_modules - set(layers))
    if missing or unexpected:
        raise KeyError(f"{folder}: adapter and model disagree on the adapted modules; "
                       f"missing in adapter: {missing[:6]}, not in model: {unexpected[:6]}")
    for key, value in state.items():
        module, ab = key.rsplit(".", 1)
        expected = getattr(layers[module], ab).shape
        if value.shape != expected:
            raise ValueError(f"{folder}: {key} has shape {tuple(value.shape)}, the model expects {tuple(expected)}")
    return config, state


def load_adapter_into(model: nn.Module, folder: str | os.PathLike, *, base_model: str | None = None) -> dict[str, Any]:
    """Copy a PEFT adapter's A/B into `model`'s LoRA layers after `checked_adapter_state`'s checks; returns
    the adapter's config."""
    config, state = checked_adapter_state(model, folder, base_model=base_model)
    layers = lora_layers(model)
    with torch.no_grad():
        for key, value in state.items():
            module, ab = key.rsplit(".", 1)
            target = getattr(layers[module], ab)
            target.copy_(value.to(target.dtype))
    return config


class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning checkpoint I/O that writes `.ckpt` files atomically and a PEFT adapter folder beside each.

    `step=100.ckpt` gets `step=100/` with `adapter_model.safetensors` + `adapter_config.json` when the
    checkpoint carries `peft_adapter_config` (put there by `QLoRAModule.on_save_checkpoint`).
    """

    def save_checkpoint(self, checkpoint: dict[str, Any], path, storage_options: Any | None = None) -> None:
        path = Path(path)
        adapter_config = checkpoint.get("peft_adapter_config")
        if adapter_config is not None:
            state = to_peft_keys(checkpoint["state_dict"], prefix=checkpoint.get("peft_key_prefix", ""))
            save_peft_adapter(adapter_dir_for(path), state, adapter_config)
        atomic_write_bytes(path, lambda tmp: torch.save(checkpoint, tmp))

    def remove_checkpoint(self, path) -> None:
        super().remove_checkpoint(path)
        adapter_dir = adapter_dir_for(Path(path))
        if adapter_dir.is_dir():
            shutil.rmtree(adapter_dir)


def adapter_dir_for(ckpt_path: Path) -> Path:
    """The PEFT adapter folder written beside a `.ckpt` file (same name without the suffix)."""
    return ckpt_path.with_suffix("")
