"""Adapters in PEFT's format, all of it in one place.

A PEFT LoRA adapter folder holds `adapter_config.json` and `adapter_model.safetensors`, whose keys are
`base_model.model.<module>.lora_A.weight` / `.lora_B.weight`; `PeftModel.from_pretrained(base, folder)` loads
it unchanged (the model card's snippet). This module owns:
- the keys: our state dicts (`<module>.lora_A`) ↔ PEFT's (`to_peft_keys`, `from_peft_keys`, `is_adapter_key`);
- the config: written from the model's LoRA layers (`adapter_config`) and read back into a `LoraSpec`
  (`lora_spec`);
- the files: `save_adapter`, `read_adapter` (damaged files, pickles, NaN tensors and a config whose `r` is not the
  weights' rank are errors naming the file: every path that reads an adapter, from training to export, reads it
  here);
- the checks: `validate` (the one comparison of adapters with LoRA layers, used by loading, resume and FSDP)
  and `check_adapter_base` (was it trained on these base weights?);
- the one formula of what an adapter adds to its base weight, `delta_weight`.
"""

from __future__ import annotations

import json
import math
import os
import pickle
import re
from pathlib import Path
from typing import Any, NamedTuple

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn

from . import builtin
from .atomic import write_file, write_text
from .lora import LoraLinear, lora_layers
from .resume import read_checkpoint
from .specs import LoraSpec

ADAPTER_WEIGHTS = "adapter_model.safetensors"
ADAPTER_CONFIG = "adapter_config.json"
#: Older PEFT's weights file (a pickle): read with `weights_only=True`, never written.
LEGACY_ADAPTER_WEIGHTS = "adapter_model.bin"
PEFT_PREFIX = "base_model.model."
LORA_KEY = re.compile(r"^(?P<module>.+)\.(?P<ab>lora_[AB])$")
#: PEFT's `LoraConfig.lora_alpha` default: what PEFT itself uses for an adapter_config.json without the key.
PEFT_DEFAULT_ALPHA = 8
# Written into adapter_model.safetensors' metadata (PEFT ignores it): the optimizer step the adapter was saved at,
# and the `model.weights_fingerprint` of the base it was trained on, to recognise that base under any name.
STEP_KEY = "qlora_lightning.global_step"
FINGERPRINT_KEY = "qlora_lightning.base_fingerprint"


class Adapter(NamedTuple):
    """A PEFT LoRA adapter as read from its folder: `config` (adapter_config.json), `state` (`<module>.lora_A`
    / `.lora_B` tensors) and the weights file's `metadata` (`STEP_KEY`, `FINGERPRINT_KEY` when we wrote it)."""

    folder: Path
    config: dict[str, Any]
    state: dict[str, torch.Tensor]
    metadata: dict[str, str]


# ------------------------------------------------------------------------------------------------ keys
def is_adapter_key(name: str) -> bool:
    """Whether a state-dict key names a LoRA tensor (`….lora_A` / `….lora_B`)."""
    return LORA_KEY.match(name) is not None


def adapter_state_dict(model: nn.Module, prefix: str = "") -> dict[str, torch.Tensor]:
    """Only the LoRA tensors of `model`, keyed as in `model.state_dict()` (`[prefix]<module>.lora_A`).

    Read from the modules, so under FSDP these are this rank's shards: gather through the strategy's state
    dict instead (as `QLoRAModule` does)."""
    return {
        f"{prefix}{name}.{ab}": getattr(layer, ab).detach()
        for name, layer in lora_layers(model).items()
        for ab in ("lora_A", "lora_B")
    }


def to_peft_keys(state: dict[str, torch.Tensor], prefix: str = "") -> dict[str, torch.Tensor]:
    """`[prefix]<module>.lora_A` → `base_model.model.<module>.lora_A.weight` (PEFT's saved layout), on the CPU."""
    out = {}
    for key, value in state.items():
        if not key.startswith(prefix) or not is_adapter_key(key[len(prefix) :]):
            continue
        out[f"{PEFT_PREFIX}{key[len(prefix) :]}.weight"] = value.detach().contiguous().cpu()
    return out


def from_peft_keys(state: dict[str, torch.Tensor], source: str) -> dict[str, torch.Tensor]:
    """Inverse of `to_peft_keys`; also accepts PEFT's in-memory `.lora_A.default.weight` form."""
    out = {}
    for key, value in state.items():
        m = re.match(r"^base_model\.model\.(?P<module>.+)\.(?P<ab>lora_[AB])(\.default)?\.weight$", key)
        if m is None:
            raise KeyError(
                f"{source}: {key!r} is not a LoRA A/B weight in PEFT's layout "
                "(only plain LoRA adapters are supported: no DoRA magnitudes, no modules_to_save)"
            )
        out[f"{m['module']}.{m['ab']}"] = value
    return out


# ---------------------------------------------------------------------------------------------- config
def _target_modules(model: nn.Module, lora_modules: list[str]) -> list[str] | str:
    """`target_modules` for adapter_config.json: suffixes when they pick exactly our modules, else a regex."""
    suffixes = sorted({name.rsplit(".", 1)[-1] for name in lora_modules})
    picked = {
        n
        for n, m in model.named_modules()
        if isinstance(m, (nn.Linear, LoraLinear)) and n.rsplit(".", 1)[-1] in suffixes
    }
    if picked == set(lora_modules):
        return suffixes
    return "^(" + "|".join(re.escape(n) for n in sorted(lora_modules)) + ")$"


def adapter_config(model: nn.Module, *, base_model: str) -> dict[str, Any]:
    """The adapter_config.json that PEFT needs to rebuild `model`'s adapters on `base_model`, read from the
    LoRA layers themselves (rank, scale, dropout, which modules)."""
    layers = lora_layers(model)
    if not layers:
        raise ValueError("the model has no LoRA layers")
    shapes = {(layer.r, float(layer.alpha)) for layer in layers.values()}
    if len(shapes) != 1:
        raise ValueError(f"the LoRA layers differ in (r, alpha): {sorted(shapes)}; PEFT's config has one of each")
    layer = next(iter(layers.values()))
    dropout = layer.lora_dropout.p if isinstance(layer.lora_dropout, nn.Dropout) else 0.0
    return {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_model,
        "r": layer.r,
        "lora_alpha": layer.alpha,
        "lora_dropout": dropout,
        "target_modules": _target_modules(model, sorted(layers)),
        "bias": "none",
        "fan_in_fan_out": False,
        "inference_mode": True,
        "init_lora_weights": True,
        "use_rslora": False,
        "use_dora": False,
        "modules_to_save": None,
    }


def lora_spec(config: dict[str, Any], source: str = ADAPTER_CONFIG) -> LoraSpec:
    """The `LoraSpec` that rebuilds an adapter's layers: its r, lora_alpha, lora_dropout, target_modules.

    PEFT reads a string `target_modules` as a regex over the full module name (except "all-linear"); ours
    spells that "re:<regex>".
    """
    if config.get("target_modules") is None:
        raise KeyError(f"{source}: no target_modules; not a LoRA adapter config")
    for key in ("layers_to_transform", "exclude_modules", "modules_to_save"):
        if config.get(key):
            raise ValueError(f"{source}: {key}={config[key]!r} is not supported (plain LoRA adapters only)")
    targets = config["target_modules"]
    if isinstance(targets, str):
        targets = targets if targets == "all-linear" else f"re:{targets}"
    else:
        targets = tuple(targets)
    return LoraSpec(
        r=int(config["r"]),
        alpha=float(config["lora_alpha"]),
        dropout=float(config.get("lora_dropout") or 0.0),
        target_modules=targets,
    )


# ----------------------------------------------------------------------------------------------- files
def check_finite(state: dict[str, torch.Tensor], what: str) -> None:
    """Raise `FloatingPointError` naming the first tensor of `state` holding NaN or inf: a diverged run must
    never overwrite a good adapter with one that makes every output NaN."""
    for key, value in state.items():
        if value.is_floating_point() and not torch.isfinite(value).all():
            raise FloatingPointError(f"{what}: {key} holds NaN or inf values; refusing to write or use it")


def save_adapter(
    folder: str | os.PathLike,
    state: dict[str, torch.Tensor],
    config: dict[str, Any],
    *,
    step: int | None = None,
    base_fingerprint: str | None = None,
) -> Path:
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


def export_adapter(
    model: nn.Module, folder: str | os.PathLike, *, base_model: str, base_fingerprint: str | None = None
) -> Path:
    """Save `model`'s adapters as a PEFT adapter folder (`base_fingerprint`: see `save_adapter`)."""
    return save_adapter(
        folder,
        to_peft_keys(adapter_state_dict(model)),
        adapter_config(model, base_model=base_model),
        base_fingerprint=base_fingerprint,
    )


def _read_config(folder: Path) -> dict[str, Any]:
    """An adapter folder's adapter_config.json, checked: a plain LoRA adapter with a positive r and lora_alpha."""
    path = folder / ADAPTER_CONFIG
    if not path.is_file():
        raise FileNotFoundError(f"{folder}: no {ADAPTER_CONFIG}; not a PEFT adapter folder")
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path}: not valid JSON ({e}); the file is damaged or incomplete") from e
    if not isinstance(config, dict):
        raise ValueError(f"{path}: expected a JSON object, got {type(config).__name__}")
    _check_plain_lora(config, path)
    config.setdefault("lora_alpha", PEFT_DEFAULT_ALPHA)
    if not (isinstance(config.get("r"), int) and config["r"] > 0):
        raise ValueError(f"{path}: r must be a positive integer, got {config.get('r')!r}")
    alpha = config["lora_alpha"]
    if not (isinstance(alpha, (int, float)) and math.isfinite(alpha) and alpha > 0):
        raise ValueError(f"{path}: lora_alpha must be a positive number, got {alpha!r}")
    return config


def _check_plain_lora(config: dict[str, Any], path: Path) -> None:
    """Refuse the PEFT variants `LoraLinear4bit` does not compute (other PEFT types, DoRA, rsLoRA, per-module
    ranks), rather than load them as plain LoRA with a different result."""
    if config.get("peft_type", "LORA") != "LORA":
        raise ValueError(f"{path}: peft_type {config.get('peft_type')!r} is not supported; expected 'LORA'")
    for key in ("use_dora", "use_rslora"):
        if config.get(key):
            raise ValueError(f"{path}: {key}=true is not supported by LoraLinear4bit")
    for key in ("rank_pattern", "alpha_pattern"):
        if config.get(key):
            raise ValueError(f"{path}: per-module {key} is not supported; all adapters share r and alpha")


def check_ranks(state: dict[str, torch.Tensor], r: int, *, weights: Path, config: Path) -> None:
    """Raise unless every adapted module has both factors and each is of rank `r` (the config's): A is (r × in),
    B is (out × r). A config whose `r` no longer matches its weights would scale every update by alpha / r with the
    wrong r, so it is refused here, where every path (training, generation, evaluation, export) reads adapters."""
    for module in sorted({key.rsplit(".", 1)[0] for key in state}):
        lora_A, lora_B = state.get(f"{module}.lora_A"), state.get(f"{module}.lora_B")
        if lora_A is None or lora_B is None:
            raise KeyError(f"{weights}: {module} has no {'lora_A' if lora_A is None else 'lora_B'} weight")
        if lora_A.dim() != 2 or lora_B.dim() != 2 or lora_A.shape[0] != r or lora_B.shape[1] != r:
            raise ValueError(
                f"{weights}: {module}.lora_A has shape {tuple(lora_A.shape)} and lora_B {tuple(lora_B.shape)}, but "
                f"{config} says r={r} (lora_A must be r × in, lora_B out × r): the config does not describe these "
                f"weights. If the weights are right, set r to their rank ({lora_A.shape[0]}) in {config.name}"
            )


def _read_weights(folder: Path) -> tuple[Path, dict[str, torch.Tensor], dict[str, str]]:
    """(file, PEFT-keyed tensors, safetensors metadata) of an adapter folder's weights file."""
    if (folder / ADAPTER_WEIGHTS).is_file():
        path = folder / ADAPTER_WEIGHTS
        try:
            with safe_open(str(path), framework="pt") as f:
                metadata = f.metadata() or {}
            return path, load_file(str(path)), metadata
        except Exception as e:  # safetensors' errors name no file
            raise ValueError(f"{path}: not a readable safetensors file ({e}); it is damaged or incomplete") from e
    path = folder / LEGACY_ADAPTER_WEIGHTS
    if not path.is_file():
        raise FileNotFoundError(f"{folder}: neither {ADAPTER_WEIGHTS} nor {LEGACY_ADAPTER_WEIGHTS}")
    try:
        return path, torch.load(path, map_location="cpu", weights_only=True), {}
    except pickle.UnpicklingError:
        raise ValueError(
            f"{path}: holds Python objects besides tensors, and pickles are refused for safety (loading one can run "
            f"any code written into it). Save the adapter as safetensors where it was made (PEFT: "
            f"save_pretrained(folder, safe_serialization=True)), or convert this file on a machine you trust: "
            f"safetensors.torch.save_file(torch.load(file), '{ADAPTER_WEIGHTS}')"
        ) from None
    except Exception as e:  # torch's errors for a truncated or foreign file name no file
        raise ValueError(f"{path}: not a readable PyTorch tensor file ({e}); it is damaged or incomplete") from e


def read_adapter(folder: str | os.PathLike) -> Adapter:
    """A PEFT LoRA adapter folder, read and checked.

    `adapter_model.bin` (older PEFT) is read with `torch.load(weights_only=True)`, which refuses anything but
    tensors, so no code in the file can run; a file that holds more is an error saying how to convert it. A config
    without `lora_alpha` gets PEFT's own default (8), as PEFT would load it. Damaged files, tensors holding NaN or
    inf, and factors whose rank is not the config's `r` (`check_ranks`) are errors naming the file.
    """
    folder = Path(folder)
    config = _read_config(folder)
    weights_path, raw, metadata = _read_weights(folder)
    state = from_peft_keys(raw, str(weights_path))
    check_finite(state, str(weights_path))
    check_ranks(state, config["r"], weights=weights_path, config=folder / ADAPTER_CONFIG)
    return Adapter(folder, config, state, metadata)


# ---------------------------------------------------------------------------------------------- checks
def check_adapter_base(adapter: Adapter, *, base_model: str, base_fingerprint: str | None) -> None:
    """Raise unless `adapter` was trained on `base_model`.

    Adapters we wrote carry the base weights' fingerprint: equal fingerprints accept the base under any name
    or path (a `builtin:` model and its folder), different ones refuse it whatever its name. Others (written by
    PEFT) are compared by the last component of `base_model_name_or_path`.
    """
    trained_on = str(adapter.config.get("base_model_name_or_path") or "")
    saved = adapter.metadata.get(FINGERPRINT_KEY)
    hint = (
        f"If it really belongs to these weights, pass allow_other_base (--allow_other_base true), or set "
        f"base_model_name_or_path in {adapter.folder / ADAPTER_CONFIG} to {base_model!r}"
    )
    if saved is not None and base_fingerprint is not None:
        if saved != base_fingerprint:
            raise ValueError(
                f"{adapter.folder}: adapter was trained on other base weights than {base_model!r} "
                f"({trained_on!r}, fingerprint {saved}; this base: {base_fingerprint}). {hint}"
            )
        return

    def name(model: str) -> str:
        return Path(builtin.resolve(model) if model.startswith(builtin.PREFIX) else model).name

    if trained_on and name(trained_on) != name(base_model):
        raise ValueError(f"{adapter.folder}: adapter was trained on {trained_on!r}, not on {base_model!r}. {hint}")


def read_checkpoint_adapters(path: str | os.PathLike, layers: dict[str, LoraLinear]) -> tuple[dict, dict]:
    """(adapter tensors, the rest) of the Lightning checkpoint at `path`, read safely and memory-mapped
    (`resume.read_checkpoint`), its adapter tensors checked against `layers` (`validate`): what a sharded strategy
    loads into its shards, and the optimizer state and loop counters Lightning restores."""
    checkpoint = read_checkpoint(path, mmap=True)
    state = {k: v for k, v in checkpoint.pop("state_dict").items() if is_adapter_key(k)}
    validate(layers, state, source=str(path))
    return state, checkpoint


def validate(
    layers: dict[str, LoraLinear], state: dict[str, Any], *, source: str, config: dict[str, Any] | None = None
) -> None:
    """Raise unless `state` (`<module>.lora_A` / `.lora_B` keys) holds exactly the adapters of `layers` (by
    module name): the same modules, both factors of each, each of its layer's shape, and, with `config`, the same
    r and lora_alpha. The one check behind loading an adapter, resuming a checkpoint and FSDP's loading."""
    if not layers:
        raise ValueError(f"{source}: the model has no LoRA layers to load adapters into")
    if config is not None:
        layer = next(iter(layers.values()))
        if config["r"] != layer.r or float(config["lora_alpha"]) != float(layer.alpha):
            raise ValueError(
                f"{source}: adapter has r={config['r']}, lora_alpha={config['lora_alpha']}; "
                f"the model's LoRA layers have r={layer.r}, alpha={layer.alpha}"
            )
    adapted = {key.rsplit(".", 1)[0] for key in state}
    missing, unexpected = sorted(set(layers) - adapted), sorted(adapted - set(layers))
    if missing or unexpected:
        raise KeyError(
            f"{source}: adapter and model disagree on the adapted modules; missing in adapter: "
            f"{missing[:6]}, not in model: {unexpected[:6]}"
        )
    if lacking := sorted(
        f"{name}.{ab}" for name in layers for ab in ("lora_A", "lora_B") if f"{name}.{ab}" not in state
    ):
        raise KeyError(f"{source}: the adapter lacks {lacking[:6]}")
    for key, value in state.items():
        if not hasattr(value, "shape"):
            continue
        module, ab = key.rsplit(".", 1)
        layer = layers[module]
        shape = (layer.r, layer.in_features) if ab == "lora_A" else (layer.out_features, layer.r)
        if tuple(value.shape) != shape:
            raise ValueError(f"{source}: {key} has shape {tuple(value.shape)}, the model expects {shape}")


# --------------------------------------------------------------------------------------------- merging
def delta_weight(lora_A: torch.Tensor, lora_B: torch.Tensor, scaling: float) -> torch.Tensor:
    """What an adapter adds to its base weight: `B @ A * scaling` (out × in), in fp32."""
    return (lora_B.float() @ lora_A.float()) * scaling
