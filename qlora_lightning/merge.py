"""Merging an adapter into its base: a plain bf16 Hugging Face model folder that needs no PEFT and no extra code.

`save_merged` writes `W + B @ A * alpha / r` (`adapters.delta_weight`) in bf16 as sharded safetensors, with the
index and config that `AutoModelForCausalLM.from_pretrained` reads. By default `W` is the ORIGINAL 16/32-bit
weight re-read from the base checkpoint, streamed tensor by tensor (at most one output shard is held in memory).
`from_quantized=True` merges into the dequantized NF4 weight instead (what the adapter was trained against); it
changes every quantized weight of the base, so it warns. Only the base folder's own files are copied beside the
weights (`model_side_files`); its `config.json` must be one of them (a link out of the folder is refused).

`export.export_model` is the `export` command; `export_gguf` writes GGUF files from the same merged tensors.
"""

from __future__ import annotations

import json
import os
import shutil
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Literal

import torch
from bitsandbytes import functional as bnb_F
from safetensors.torch import save_file
from transformers import AutoConfig

from . import hub
from .adapters import Adapter, check_adapter_base, delta_weight, read_adapter
from .atomic import atomic_folder
from .checkpoint_files import CheckpointTensors, weights_fingerprint
from .inject import inject_lora
from .lora import FrozenLinear4bit, quantize_linear
from .model import build_skeleton, resolve_device
from .specs import QuantSpec

#: Files of a checkpoint folder that are weights (rewritten, or never copied: pickles are not carried over).
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".gguf", ".h5", ".msgpack")

#: How a GGUF file stores its matrices (1-D tensors are always f32, as llama.cpp's own converter writes them).
GGUFType = Literal["f16", "bf16", "q8_0", "q4_0"]
#: The prompt format written into a GGUF file and its Modelfile (`data.templates`' names).
GGUFTemplate = Literal["qlora", "chat"]


def lora_factors(adapter: Adapter) -> dict[str, tuple[torch.Tensor, torch.Tensor, float]]:
    """(A, B, alpha / r) of each adapted module, by module name: what merging and the GGUF export consume.
    `adapters.read_adapter` has checked that both factors are there and of rank r."""
    scaling = float(adapter.config["lora_alpha"]) / int(adapter.config["r"])
    modules = sorted({key.rsplit(".", 1)[0] for key in adapter.state})
    return {m: (adapter.state[f"{m}.lora_A"], adapter.state[f"{m}.lora_B"], scaling) for m in modules}


def quantized_linears(source_dir: Path, quant: QuantSpec) -> set[str]:
    """Names of the linears that `load_model` stores in 4-bit (the injector's rule, on a meta skeleton)."""
    skeleton = build_skeleton(AutoConfig.from_pretrained(source_dir), torch.bfloat16)
    inject_lora(skeleton, None, quant)
    return {n for n, m in skeleton.named_modules() if isinstance(m, FrozenLinear4bit)}


def merged_tensors(
    source_dir: Path,
    factors: dict[str, tuple[torch.Tensor, torch.Tensor, float]],
    keys: list[str],
    tensors: CheckpointTensors,
    *,
    quantized: set[str] | None,
    quant: QuantSpec,
    device: torch.device,
) -> Iterator[tuple[str, torch.Tensor]]:
    """(key, bf16 tensor) for `keys` of the base (read from `tensors`): adapted weights merged, the rest cast to bf16.

    `quantized` is None to merge into the original weights; otherwise the names of the linears whose
    weight is replaced by dequantize(quantize(W)) exactly as `load_model` quantizes it, merged or not.
    """
    for key in keys:
        module, _, attr = key.rpartition(".")
        weight = tensors(key)
        if attr == "weight" and quantized is not None and module in quantized:
            layer = quantize_linear(weight, device=device, quant=quant)
            weight = bnb_F.dequantize_4bit(*layer.quantized()).cpu()
        if attr == "weight" and module in factors:
            delta = delta_weight(*factors[module])
            if delta.shape != weight.shape:
                raise ValueError(
                    f"{source_dir}: {key} has shape {tuple(weight.shape)} but the adapter's B @ A for "
                    f"{module} has shape {tuple(delta.shape)} (adapter trained on another base?)"
                )
            weight = weight.float() + delta
        yield key, weight.to(torch.bfloat16).contiguous()


def check_adapted_modules(
    source_dir: Path, factors: dict[str, tuple[torch.Tensor, torch.Tensor, float]], shapes: dict[str, tuple]
) -> None:
    """Raise unless the base has the weight of every module the adapter adapts, of B @ A's shape: an adapter of
    another base fails here, before anything is written."""
    absent = sorted(f"{m}.weight" for m in factors if f"{m}.weight" not in shapes)
    if absent:
        raise KeyError(
            f"{source_dir}: the adapter adapts modules that the base lacks: {absent[:6]} "
            "(adapter trained on another base?)"
        )
    for module, (lora_A, lora_B, _) in factors.items():
        key, delta = f"{module}.weight", (lora_B.shape[0], lora_A.shape[1])
        if shapes[key] != delta:
            raise ValueError(
                f"{source_dir}: {key} has shape {shapes[key]} but the adapter's B @ A for {module} has shape "
                f"{delta} (adapter trained on another base?)"
            )


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


def save_merged(
    base: str,
    adapter: Adapter,
    output: str | os.PathLike,
    *,
    from_quantized: bool = False,
    quant: QuantSpec = QuantSpec(),
    device: torch.device | str = "cpu",
    max_shard_size: str | int = "5GB",
    overwrite: bool = False,
) -> Path:
    """Write `base` with `adapter` merged in as a bf16 Hugging Face model folder (sharded safetensors).

    Args:
        base: hub id, folder or `builtin:` name of the base checkpoint; its safetensors are re-read.
        adapter: the adapter to merge (`adapters.read_adapter`).
        output: the folder to create; written aside and renamed into place, so a failed export leaves nothing.
        from_quantized: merge into dequantize(NF4(W)) instead of W (see the module docstring).
        quant: the quantization the adapter was trained with (only for from_quantized).
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
        warnings.warn(
            "merging into the dequantized NF4 weights changes the model: every quantized weight of the "
            "export becomes dequantize(NF4(W)) instead of the original W (about 9% relative error per "
            "weight). The default merges into the original base weights.",
            UserWarning,
            stacklevel=2,
        )
    quantized = quantized_linears(source_dir, quant) if from_quantized else None
    factors = lora_factors(adapter)
    config, side_files = _model_config(source_dir), model_side_files(source_dir)
    checkpoint = CheckpointTensors(source_dir)
    shapes = checkpoint.shapes
    check_adapted_modules(source_dir, factors, shapes)
    sizes = [(key, 2 * int(torch.Size(shape).numel())) for key, shape in shapes.items()]
    plan = _plan_shards(sizes, convert_file_size_to_int(max_shard_size))
    with atomic_folder(output, overwrite=overwrite) as tmp:
        weight_map = {}
        for i, keys in enumerate(plan, 1):
            name = "model.safetensors" if len(plan) == 1 else f"model-{i:05d}-of-{len(plan):05d}.safetensors"
            shard = dict(
                merged_tensors(
                    source_dir,
                    factors,
                    keys,
                    checkpoint,
                    quantized=quantized,
                    quant=quant,
                    device=torch.device(device),
                )
            )
            save_file(shard, str(tmp / name), metadata={"format": "pt"})
            weight_map.update(dict.fromkeys(keys, name))
            del shard
        if len(plan) > 1:
            index = {"metadata": {"total_size": sum(n for _, n in sizes)}, "weight_map": weight_map}
            (tmp / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
        _copy_side_files(config, side_files, tmp)
    return output


def model_side_files(source_dir: Path) -> list[Path]:
    """The files of a model folder that export may copy: regular files inside it, or links that resolve to
    one inside it or, for a hub-cache snapshot (`<repo>/snapshots/<revision>/`), into that repository's
    `blobs/`. A link pointing anywhere else (a README linked to another file) is skipped with a warning."""
    roots = _model_roots(source_dir)
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


def _model_roots(source_dir: Path) -> list[Path]:
    """Where a model folder's files may live: the folder, and for a hub-cache snapshot its repository's blobs."""
    roots = [source_dir.resolve()]
    if source_dir.parent.name == "snapshots":
        roots.append((source_dir.parent.parent / "blobs").resolve())
    return roots


def _model_config(source_dir: Path) -> Path:
    """The folder's own `config.json`, which the export rewrites as its config; a link out of the folder is refused
    (the export copies nothing from outside the model folder, and the config would be that outside file)."""
    config = source_dir / "config.json"
    target = config.resolve()
    if not target.is_file():
        raise FileNotFoundError(f"{source_dir}: no config.json; not a model folder as save_pretrained writes it")
    if not any(target.is_relative_to(root) for root in _model_roots(source_dir)):
        raise ValueError(
            f"{config} links to {target}, outside the model folder; the export writes the folder's own config.json "
            f"and copies nothing from outside it. If that file is this model's config, put a copy in its place "
            f"(cp --remove-destination {target} {config}) and export again"
        )
    return config


def _copy_side_files(config: Path, files: list[Path], target: Path) -> None:
    """Write `config` (dtype set to bf16) and copy `files` (`model_side_files`: generation config, tokenizer…);
    weights and the weight index are never copied."""
    written = json.loads(config.read_text())
    written.pop("quantization_config", None)
    written["dtype"] = "bfloat16"
    if "torch_dtype" in written:  # the key's name before transformers 4.56
        written["torch_dtype"] = "bfloat16"
    (target / "config.json").write_text(json.dumps(written, indent=2) + "\n")
    for path in files:
        if (
            path.name != "config.json"
            and not path.name.endswith(_WEIGHT_SUFFIXES)
            and path.name != "model.safetensors.index.json"
        ):
            shutil.copyfile(path, target / path.name)


def checked_adapter(base: str, adapter: str, *, allow_other_base: bool) -> Adapter:
    """The adapter folder read, and refused unless it was trained on `base` (`check_adapter_base`) or the user
    said otherwise: every export starts here."""
    found = read_adapter(adapter)
    if not allow_other_base:
        check_adapter_base(found, base_model=base, base_fingerprint=weights_fingerprint(hub.checkpoint_dir(base)))
    return found


def export_merged(
    *,
    base: str,
    adapter: str,
    output: str,
    from_quantized: bool = False,
    quant: QuantSpec = QuantSpec(),
    device: str = "auto",
    max_shard_size: str = "5GB",
    allow_other_base: bool = False,
    overwrite: bool = False,
) -> str:
    """Merge a PEFT LoRA adapter into its base and save a bf16 Hugging Face model folder (`qlora-lightning export`).

    The folder loads with `AutoModelForCausalLM.from_pretrained(output)` and no extra code.

    Args:
        base: hub id, local folder or `builtin:` name of the base the adapter was trained on.
        adapter: the PEFT LoRA adapter folder to merge.
        output: the model folder to write.
        from_quantized: merge into the dequantized NF4 base instead of the original weights. Off by default:
            it changes the model (a frequent complaint about other tools); on, it reproduces exactly the
            weights the adapter was trained against, and warns.
        quant: the quantization the adapter was trained with (the paper's NF4 with double quantization); used
            with from_quantized.
        device: where weights are quantized for from_quantized ("auto": CUDA if present, as in training).
        max_shard_size: largest safetensors shard ("5GB", the hub's long-standing default).
        allow_other_base: skip the check that the adapter was trained on `base`.
        overwrite: replace `output` if it exists.
    """
    found = checked_adapter(base, adapter, allow_other_base=allow_other_base)
    folder = save_merged(
        base,
        found,
        output,
        from_quantized=from_quantized,
        quant=quant,
        device=resolve_device(device),
        max_shard_size=max_shard_size,
        overwrite=overwrite,
    )
    print(f"merged model written to {folder}")
    return str(folder)
