"""Adapters in and out: load a PEFT LoRA adapter for inference, and merge adapters into a plain HF model folder.

Import: `load_with_adapter(base, adapter)` builds our QLoRA model with the adapter's own r/alpha/targets
(read from its `adapter_config.json`) and copies the A/B tensors in with `checkpoint.load_adapter_into`,
which turns every mismatch (other base, other r, missing or extra modules, shapes) into a clear error.

Export: `save_merged` writes `W + B @ A * alpha / r` in bf16 as sharded safetensors with the index and
config that `AutoModelForCausalLM.from_pretrained` reads with no extra code. By default `W` is the
ORIGINAL 16/32-bit weight re-read from the base checkpoint, streamed tensor by tensor (at most one output
shard is held in memory). `from_quantized=True` merges into the dequantized NF4 weight instead (what the
adapter was trained against); it changes every quantized weight of the base, so it warns.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import warnings
from pathlib import Path
from typing import Iterator, Literal, NamedTuple

import torch
from bitsandbytes import functional as bnb_F
from safetensors.torch import save_file
from torch import nn
from transformers import AutoConfig

from . import hub
from .atomic import atomic_folder
from .checkpoint import check_adapter_base, load_adapter_into, read_peft_adapter
from .lora import lora_layers, quantize_linear
from .model import (LoadedModel, LoraSpec, QuantSpec, build_skeleton, load_model, open_safetensors, safetensors_shards,
                    weights_fingerprint)

#: Files of a checkpoint folder that are weights (rewritten, or never copied: pickles are not carried over).
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".gguf", ".h5", ".msgpack")


def resolve_device(device: str) -> torch.device:
    """`"auto"` → the first CUDA device when there is one, else the CPU; anything else as torch reads it."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def lora_spec_from_adapter(config: dict, source: str = "adapter_config.json") -> LoraSpec:
    """The `LoraSpec` that rebuilds a PEFT adapter's layers: its r, lora_alpha, lora_dropout, target_modules.

    PEFT reads a string `target_modules` as a regex over the full module name (except "all-linear");
    ours spells that "re:<regex>".
    """
    missing = [k for k in ("r", "lora_alpha", "target_modules") if config.get(k) is None]
    if missing:
        raise KeyError(f"{source}: missing {missing}; not a LoRA adapter config")
    for key in ("layers_to_transform", "exclude_modules", "modules_to_save"):
        if config.get(key):
            raise ValueError(f"{source}: {key}={config[key]!r} is not supported (plain LoRA adapters only)")
    targets = config["target_modules"]
    if isinstance(targets, str):
        targets = targets if targets == "all-linear" else f"re:{targets}"
    else:
        targets = tuple(targets)
    return LoraSpec(r=int(config["r"]), alpha=float(config["lora_alpha"]), dropout=float(config.get("lora_dropout", 0.0)),
                    target_modules=targets)


def load_with_adapter(base: str, adapter: str | None = None, *, quant: QuantSpec = QuantSpec(),
                      device: torch.device | str = "cpu", train: bool = False,
                      allow_other_base: bool = False) -> LoadedModel:
    """Load `base` in its QLoRA form with the PEFT adapter folder `adapter` (None: the base alone).

    Args:
        base: hub id, local folder or `builtin:` name of the base model (as `load_model`).
        adapter: a PEFT LoRA adapter folder (ours, or published ones such as the QLoRA OpenOrca adapters).
            None gives fresh adapters with B = 0, whose output is exactly the (quantized) base's.
        quant: how the base is stored; NF4 by default because that is what QLoRA adapters were trained on.
        device: where the model lives.
        train: leave the model ready for continued training (train mode, gradient checkpointing, dropout);
            otherwise it is in eval mode with the KV cache on, for evaluation and generation.
        allow_other_base: skip the check that the adapter's `base_model_name_or_path` names `base`
            (use it when the same weights live under another name).
    """
    if adapter is None:
        lora = LoraSpec(r=8, dropout=0.0)  # B = 0: adds exactly nothing, just satisfies the LoRA layout
    else:
        config, _ = read_peft_adapter(adapter)
        lora = lora_spec_from_adapter(config, str(Path(adapter) / "adapter_config.json"))
    loaded = load_model(base, quant=quant, lora=lora, device=device, gradient_checkpointing=train, train_mode=train)
    if adapter is not None:
        load_adapter_into(loaded.model, adapter, base_model=None if allow_other_base else base,
                          base_fingerprint=loaded.fingerprint)
    return loaded


class LoraFactors(NamedTuple):
    """One module's adapter: A (r × in), B (out × r) and the scale alpha / r of B @ A."""

    A: torch.Tensor
    B: torch.Tensor
    scaling: float

    def delta(self) -> torch.Tensor:
        """`B @ A * scaling` in fp32 (out × in)."""
        return (self.B.float() @ self.A.float()) * self.scaling


def factors_from_model(model: nn.Module) -> dict[str, LoraFactors]:
    """The adapters of an in-memory model with our LoRA layers, by module name."""
    return {name: LoraFactors(layer.lora_A.detach().cpu(), layer.lora_B.detach().cpu(), layer.scaling)
            for name, layer in lora_layers(model).items()}


def factors_from_adapter(folder: str | os.PathLike) -> tuple[dict[str, LoraFactors], dict]:
    """The adapters of a PEFT LoRA folder by module name, and its adapter_config."""
    config, state = read_peft_adapter(folder)
    spec = lora_spec_from_adapter(config, str(Path(folder) / "adapter_config.json"))
    modules = sorted({key.rsplit(".", 1)[0] for key in state})
    for module in modules:
        for ab in ("lora_A", "lora_B"):
            if f"{module}.{ab}" not in state:
                raise KeyError(f"{folder}: {module} has no {ab} weight")
    return {m: LoraFactors(state[f"{m}.lora_A"], state[f"{m}.lora_B"], spec.alpha / spec.r) for m in modules}, config


def _quantized_linears(source_dir: Path) -> set[str]:
    """Names of the linears that `load_model` stores in 4-bit: every `nn.Linear` but the output head."""
    skeleton = build_skeleton(AutoConfig.from_pretrained(source_dir), torch.bfloat16)
    head = skeleton.get_output_embeddings()
    return {n for n, m in skeleton.named_modules() if isinstance(m, nn.Linear) and m is not head}


def merged_tensors(source_dir: Path, factors: dict[str, LoraFactors], keys: list[str], handles: dict[str, object], *,
                   quantized: set[str] | None, quant_type: Literal["nf4", "fp4"], double_quant: bool,
                   device: torch.device) -> Iterator[tuple[str, torch.Tensor]]:
    """(key, bf16 tensor) for `keys` of the base: adapted weights merged, the rest cast to bf16.

    `quantized` is None to merge into the original weights; otherwise the names of the linears whose
    weight is replaced by dequantize(quantize(W)) exactly as `load_model` quantizes it, merged or not.
    """
    for key in keys:
        module, _, attr = key.rpartition(".")
        weight = handles[key].get_tensor(key)
        if attr == "weight" and quantized is not None and module in quantized:
            layer = quantize_linear(weight, device=device, quant_type=quant_type, double_quant=double_quant)
            weight = bnb_F.dequantize_4bit(layer.weight.data, layer.weight.quant_state).cpu()
        if attr == "weight" and module in factors:
            delta = factors[module].delta()
            if delta.shape != weight.shape:
                raise ValueError(f"{source_dir}: {key} has shape {tuple(weight.shape)} but the adapter's B @ A for "
                                 f"{module} has shape {tuple(delta.shape)} (adapter trained on another base?)")
            weight = weight.float() + delta
        yield key, weight.to(torch.bfloat16).contiguous()


def _plan_shards(keys_and_sizes: list[tuple[str, int]], max_shard_bytes: int) -> list[list[str]]:
    """Greedy split of keys (in order) into shards of at most `max_shard_bytes` (a larger tensor gets its own)."""
    shards: list[list[str]] = [[]]
    size = 0
    for key, nbytes in keys_and_sizes:
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(key)
        size += nbytes
    return shards


def save_merged(base: str, factors: dict[str, LoraFactors], output: str | os.PathLike, *, from_quantized: bool = False,
                quant_type: Literal["nf4", "fp4"] = "nf4", double_quant: bool = True, device: torch.device | str = "cpu",
                max_shard_size: str | int = "5GB", overwrite: bool = False) -> Path:
    """Write `base` with `factors` merged in as a bf16 Hugging Face model folder (sharded safetensors).

    Args:
        base: hub id, folder or `builtin:` name of the base checkpoint; its safetensors are re-read.
        factors: the adapters by module name (`factors_from_adapter`, `factors_from_model`).
        output: the folder to create; written aside and renamed into place, so a failed export leaves nothing.
        from_quantized: merge into dequantize(NF4(W)) instead of W (see the module docstring).
        quant_type / double_quant: the quantization the adapter was trained with (only for from_quantized).
        device: where weights are quantized for from_quantized (the training device gives the same bytes).
        max_shard_size: largest shard, e.g. "5GB" (the hub's long-standing default, friendly to uploads).
        overwrite: replace an existing `output` folder.
    """
    from transformers.utils.hub import convert_file_size_to_int

    source_dir = hub.checkpoint_dir(base)
    output = Path(output)
    if output.exists() and not overwrite:
        raise FileExistsError(f"{output} exists; pass overwrite=True to replace it")
    if from_quantized:
        warnings.warn("merging into the dequantized NF4 weights changes the model: every quantized weight of the "
                      "export becomes dequantize(NF4(W)) instead of the original W (about 9% relative error per "
                      "weight). The default merges into the original base weights.", UserWarning, stacklevel=2)
    quantized = _quantized_linears(source_dir) if from_quantized else None
    with contextlib.ExitStack() as stack:
        handles, sizes = {}, []
        for shard in safetensors_shards(source_dir):
            f = stack.enter_context(open_safetensors(shard))
            for key in f.keys():
                handles[key] = f
                shape = f.get_slice(key).get_shape()
                sizes.append((key, 2 * int(torch.Size(shape).numel())))
        targets = {f"{m}.weight" for m in factors}
        absent = sorted(targets - set(handles))
        if absent:
            raise KeyError(f"{source_dir}: the adapter adapts modules that the base lacks: {absent[:6]} "
                           "(adapter trained on another base?)")
        plan = _plan_shards(sizes, convert_file_size_to_int(max_shard_size))
        with atomic_folder(output, overwrite=overwrite) as tmp:
            weight_map = {}
            for i, keys in enumerate(plan, 1):
                name = "model.safetensors" if len(plan) == 1 else f"model-{i:05d}-of-{len(plan):05d}.safetensors"
                tensors = dict(merged_tensors(source_dir, factors, keys, handles, quantized=quantized,
                                              quant_type=quant_type, double_quant=double_quant,
                                              device=torch.device(device)))
                save_file(tensors, str(tmp / name), metadata={"format": "pt"})
                weight_map.update(dict.fromkeys(keys, name))
                del tensors
            if len(plan) > 1:
                index = {"metadata": {"total_size": sum(n for _, n in sizes)}, "weight_map": weight_map}
                (tmp / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
            _copy_side_files(source_dir, tmp)
    return output


def model_side_files(source_dir: Path) -> list[Path]:
    """The files of a model folder that export may copy: regular files inside it, or links that resolve to
    one inside it or, for a hub-cache snapshot (`<repo>/snapshots/<revision>/`), into that repository's
    `blobs/`. A link pointing anywhere else (a README linked to another file) is skipped with a warning."""
    roots = [source_dir.resolve()]
    if source_dir.parent.name == "snapshots":
        roots.append((source_dir.parent.parent / "blobs").resolve())
    files = []
    for path in sorted(source_dir.iterdir()):
        target = path.resolve()
        if not target.is_file():
            continue
        if any(target.is_relative_to(root) for root in roots):
            files.append(path)
        else:
            warnings.warn(f"{path} links to {target}, outside the model folder: not copied", UserWarning, stacklevel=2)
    return files


def _copy_side_files(source_dir: Path, target: Path) -> None:
    """Copy config (dtype set to bf16), generation config and tokenizer files; weights are never copied."""
    config = json.loads((source_dir / "config.json").read_text())
    config.pop("quantization_config", None)
    config["dtype"] = "bfloat16"
    if "torch_dtype" in config:  # the key's name before transformers 4.56
        config["torch_dtype"] = "bfloat16"
    (target / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    for path in model_side_files(source_dir):
        if path.name != "config.json" and not path.name.endswith(_WEIGHT_SUFFIXES) \
                and path.name != "model.safetensors.index.json":
            shutil.copyfile(path, target / path.name)


def export_merged(*, base: str, adapter: str, output: str, from_quantized: bool = False,
                  quant_type: Literal["nf4", "fp4"] = "nf4", double_quant: bool = True, device: str = "auto",
                  max_shard_size: str = "5GB", allow_other_base: bool = False, overwrite: bool = False) -> str:
    """Merge a PEFT LoRA adapter into its base and save a bf16 Hugging Face model folder.

    The folder loads with `AutoModelForCausalLM.from_pretrained(output)` and no extra code.

    Args:
        base: hub id, local folder or `builtin:` name of the base the adapter was trained on.
        adapter: the PEFT LoRA adapter folder to merge.
        output: the model folder to write.
        from_quantized: merge into the dequantized NF4 base instead of the original weights. Off by default:
            it changes the model (a frequent complaint about other tools); on, it reproduces exactly the
            weights the adapter was trained against, and warns.
        quant_type: the 4-bit type the adapter was trained with ("nf4", the paper's); used with from_quantized.
        double_quant: whether training used double quantization (the paper does); used with from_quantized.
        device: where weights are quantized for from_quantized ("auto": CUDA if present, as in training).
        max_shard_size: largest safetensors shard ("5GB", the hub's long-standing default).
        allow_other_base: skip the check that the adapter names `base` as its base model.
        overwrite: replace `output` if it exists.
    """
    factors, config = factors_from_adapter(adapter)
    if not allow_other_base:
        check_adapter_base(adapter, config, base_model=base, base_fingerprint=weights_fingerprint(hub.checkpoint_dir(base)))
    folder = save_merged(base, factors, output, from_quantized=from_quantized, quant_type=quant_type,
                         double_quant=double_quant, device=resolve_device(device), max_shard_size=max_shard_size,
                         overwrite=overwrite)
    print(f"merged model written to {folder}")
    return str(folder)

