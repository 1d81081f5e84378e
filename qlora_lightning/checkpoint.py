"""Adapter checkpoints: adapter-only state, PEFT-format export/import, and atomic writes.

A PEFT LoRA adapter folder holds `adapter_config.json` and `adapter_model.safetensors` with keys
`base_model.model.<module>.lora_A.weight` / `.lora_B.weight`; `PeftModel.from_pretrained(base, folder)`
loads it unchanged (the model card's snippet). `AtomicCheckpointIO` makes Lightning's saves atomic and
writes such a folder beside every `.ckpt`, so each checkpoint is also a ready-to-use adapter.
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
from pathlib import Path
from typing import Any

import torch
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn

from . import builtin
from .atomic import write_file, write_text
from .lora import LoraLinear, lora_layers, unwrapped_name
from .resume import read_checkpoint

ADAPTER_WEIGHTS = "adapter_model.safetensors"
ADAPTER_CONFIG = "adapter_config.json"
PEFT_PREFIX = "base_model.model."
LORA_KEY = re.compile(r"^(?P<module>.+)\.(?P<ab>lora_[AB])$")
#: PEFT's `LoraConfig.lora_alpha` default: what PEFT itself uses for an adapter_config.json without the key.
PEFT_DEFAULT_ALPHA = 8
# Written into adapter_model.safetensors' metadata (PEFT ignores it): the optimizer step the adapter was saved at,
# and the `model.weights_fingerprint` of the base it was trained on, to recognise that base under any name.
STEP_KEY = "qlora_lightning.global_step"
FINGERPRINT_KEY = "qlora_lightning.base_fingerprint"


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


def check_finite(state: dict[str, torch.Tensor], what: str) -> None:
    """Raise `FloatingPointError` naming the first tensor of `state` holding NaN or inf: a diverged run must
    never overwrite a good adapter with one that makes every output NaN."""
    for key, value in state.items():
        if value.is_floating_point() and not torch.isfinite(value).all():
            raise FloatingPointError(f"{what}: {key} holds NaN or inf values; refusing to write or use it")


def save_peft_adapter(folder: str | os.PathLike, state: dict[str, torch.Tensor], config: dict[str, Any], *,
                      step: int | None = None, base_fingerprint: str | None = None) -> Path:
    """Write `state` (PEFT keys) and `config` as a PEFT adapter folder, each file atomically.

    `step` and `base_fingerprint` go into the safetensors metadata, so an adapter says which optimizer step it
    holds and which base weights it belongs to; PEFT ignores them.
    """
    folder = Path(folder)
    check_finite(state, str(folder))
    metadata = {"format": "pt"}
    if step is not None:
        metadata[STEP_KEY] = str(step)
    if base_fingerprint is not None:
        metadata[FINGERPRINT_KEY] = base_fingerprint
    write_file(folder / ADAPTER_WEIGHTS, lambda p: save_file(state, p, metadata=metadata))
    write_text(folder / ADAPTER_CONFIG, json.dumps(config, indent=2) + "\n")
    return folder


def export_adapter(model: nn.Module, folder: str | os.PathLike, *, base_model: str, r: int, alpha: float,
                   dropout: float, base_fingerprint: str | None = None) -> Path:
    """Save `model`'s adapters as a PEFT adapter folder (`base_fingerprint`: see `save_peft_adapter`)."""
    config = peft_adapter_config(model, base_model=base_model, r=r, alpha=alpha, dropout=dropout)
    return save_peft_adapter(folder, to_peft_keys(adapter_state_dict(model)), config, base_fingerprint=base_fingerprint)


def read_peft_adapter(folder: str | os.PathLike) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """(adapter_config, {<module>.lora_A: tensor}) of a PEFT LoRA adapter folder.

    `adapter_model.bin` (older PEFT) is read with `torch.load(weights_only=True)`, which refuses
    anything but tensors, so no code in the file can run. A config without `lora_alpha` gets PEFT's own
    default (8), as PEFT would load it. Damaged files and tensors holding NaN or inf are errors naming the file.
    """
    folder = Path(folder)
    config_path = folder / ADAPTER_CONFIG
    if not config_path.is_file():
        raise FileNotFoundError(f"{folder}: no {ADAPTER_CONFIG}; not a PEFT adapter folder")
    try:
        config = json.loads(config_path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{config_path}: not valid JSON ({e}); the file is damaged or incomplete") from e
    if not isinstance(config, dict):
        raise ValueError(f"{config_path}: expected a JSON object, got {type(config).__name__}")
    if config.get("peft_type", "LORA") != "LORA":
        raise ValueError(f"{config_path}: peft_type {config.get('peft_type')!r} is not supported; expected 'LORA'")
    for key in ("use_dora", "use_rslora"):
        if config.get(key):
            raise ValueError(f"{config_path}: {key}=true is not supported by LoraLinear4bit")
    for key in ("rank_pattern", "alpha_pattern"):
        if config.get(key):
            raise ValueError(f"{config_path}: per-module {key} is not supported; all adapters share r and alpha")
    config.setdefault("lora_alpha", PEFT_DEFAULT_ALPHA)
    if not (isinstance(config.get("r"), int) and config["r"] > 0):
        raise ValueError(f"{config_path}: r must be a positive integer, got {config.get('r')!r}")
    alpha = config["lora_alpha"]
    if not (isinstance(alpha, (int, float)) and math.isfinite(alpha) and alpha > 0):
        raise ValueError(f"{config_path}: lora_alpha must be a positive number, got {alpha!r}")
    if (folder / ADAPTER_WEIGHTS).is_file():
        weights_path = folder / ADAPTER_WEIGHTS
        try:
            raw = load_file(str(weights_path))
        except Exception as e:  # safetensors' errors name no file
            raise ValueError(f"{weights_path}: not a readable safetensors file ({e}); it is damaged or "
                             "incomplete") from e
    elif (folder / "adapter_model.bin").is_file():
        weights_path = folder / "adapter_model.bin"
        raw = torch.load(weights_path, map_location="cpu", weights_only=True)
    else:
        raise FileNotFoundError(f"{folder}: neither {ADAPTER_WEIGHTS} nor adapter_model.bin")
    state = from_peft_keys(raw, str(weights_path))
    check_finite(state, str(weights_path))
    return config, state


def adapter_metadata(folder: str | os.PathLike) -> dict[str, str]:
    """The metadata of an adapter folder's safetensors file (`STEP_KEY`, `FINGERPRINT_KEY` when we wrote it)."""
    path = Path(folder) / ADAPTER_WEIGHTS
    if not path.is_file():
        return {}
    with safe_open(str(path), framework="pt") as f:
        return f.metadata() or {}


def check_adapter_base(folder: str | os.PathLike, config: dict[str, Any], *, base_model: str,
                       base_fingerprint: str | None) -> None:
    """Raise unless the adapter in `folder` was trained on `base_model`.

    Adapters we wrote carry the base weights' fingerprint: equal fingerprints accept the base under any name
    or path (a `builtin:` model and its folder), different ones refuse it whatever its name. Others (written by
    PEFT) are compared by the last component of `base_model_name_or_path`.
    """
    trained_on = str(config.get("base_model_name_or_path") or "")
    saved = adapter_metadata(folder).get(FINGERPRINT_KEY)
    hint = (f"If it really belongs to these weights, pass allow_other_base (--allow_other_base true), or set "
            f"base_model_name_or_path in {Path(folder) / ADAPTER_CONFIG} to {base_model!r}")
    if saved is not None and base_fingerprint is not None:
        if saved != base_fingerprint:
            raise ValueError(f"{folder}: adapter was trained on other base weights than {base_model!r} "
                             f"({trained_on!r}, fingerprint {saved}; this base: {base_fingerprint}). {hint}")
        return

    def name(model: str) -> str:
        return Path(builtin.resolve(model) if model.startswith(builtin.PREFIX) else model).name

    if trained_on and name(trained_on) != name(base_model):
        raise ValueError(f"{folder}: adapter was trained on {trained_on!r}, not on {base_model!r}. {hint}")


def checked_adapter_state(model: nn.Module, folder: str | os.PathLike, *, base_model: str | None = None,
                          base_fingerprint: str | None = None) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """(config, {<module>.lora_A: tensor}) of a PEFT adapter that fits `model`'s LoRA layers (which may
    still be on the meta device); every mismatch is a clear error.

    Checks: the same set of adapted modules, the same r and alpha, each tensor's shape, and (when
    `base_model` is given) the base the adapter was trained on (`check_adapter_base`).
    """
    config, state = read_peft_adapter(folder)
    layers = lora_layers(model)
    if not layers:
        raise ValueError("the model has no LoRA layers to load an adapter into")
    if base_model is not None:
        check_adapter_base(folder, config, base_model=base_model, base_fingerprint=base_fingerprint)
    any_layer = next(iter(layers.values()))
    if config["r"] != any_layer.r or float(config["lora_alpha"]) != float(any_layer.alpha):
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


def load_adapter_into(model: nn.Module, folder: str | os.PathLike, *, base_model: str | None = None,
                      base_fingerprint: str | None = None) -> dict[str, Any]:
    """Copy a PEFT adapter's A/B into `model`'s LoRA layers after `checked_adapter_state`'s checks; returns
    the adapter's config."""
    config, state = checked_adapter_state(model, folder, base_model=base_model, base_fingerprint=base_fingerprint)
    layers = lora_layers(model)
    with torch.no_grad():
        for key, value in state.items():
            module, ab = key.rsplit(".", 1)
            target = getattr(layers[module], ab)
            target.copy_(value.to(target.dtype))
    return config


class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning checkpoint I/O that writes `.ckpt` files atomically, a PEFT adapter folder beside each, and
    reads them back safely.

    `step=100.ckpt` gets `step=100/` with `adapter_model.safetensors` + `adapter_config.json` when the
    checkpoint carries `peft_adapter_config` (put there by `QLoRAModule.on_save_checkpoint`). The `.ckpt` is
    written first and each adapter file says its step in its metadata, so after a kill between the two the
    pair can be told apart. Adapters holding NaN or inf are never written. Loading always uses
    `weights_only=True` (`resume.read_checkpoint`): our checkpoints hold tensors and plain data only.
    """

    def save_checkpoint(self, checkpoint: dict[str, Any], path, storage_options: Any | None = None) -> None:
        path = Path(path)
        adapter_config = checkpoint.get("peft_adapter_config")
        state = None
        if adapter_config is not None:
            state = to_peft_keys(checkpoint["state_dict"], prefix=checkpoint.get("peft_key_prefix", ""))
            check_finite(state, str(path))
        write_file(path, lambda tmp: torch.save(checkpoint, tmp))
        if state is not None:
            run = checkpoint.get("qlora_run") or {}
            save_peft_adapter(adapter_dir_for(path), state, adapter_config, step=checkpoint.get("global_step"),
                              base_fingerprint=run.get("base_fingerprint"))

    def load_checkpoint(self, path, map_location: Any = None, weights_only: bool | None = None) -> dict[str, Any]:
        return read_checkpoint(path, map_location="cpu" if map_location is None else map_location)

    def remove_checkpoint(self, path) -> None:
        super().remove_checkpoint(path)
        adapter_dir = adapter_dir_for(Path(path))
        if adapter_dir.is_dir():
            shutil.rmtree(adapter_dir)


def adapter_dir_for(ckpt_path: Path) -> Path:
    """The PEFT adapter folder written beside a `.ckpt` file (same name without the suffix)."""
    return ckpt_path.with_suffix("")
