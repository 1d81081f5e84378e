"""Merging (original and NF4 bases) against the adapter model; mismatched adapters and bases; the export's files."""

from __future__ import annotations

import json
import os
import shutil
import stat

import pytest
import torch
from qlora_testing import make_tiny_llama
from transformers import AutoModelForCausalLM, AutoTokenizer

from qlora_lightning.merge import export_merged
from qlora_lightning.model import load_for_inference
from qlora_lightning.specs import QuantSpec

#: Merged weights vs the adapter computed beside the base, both run in fp32: the export rounds W + BA to
#: bf16 once (relative 2^-9 per weight) and the adapter model computes its LoRA term in bf16 (the LoRA
#: dtype). Measured on the tiny model: max |Δlogit| / max |logit| = 0.34 % (original base) and 0.38 %
#: (NF4 base); a wrong scale, transpose or missing module gives 15-90 %.
REL_TOL = 1e-2


def logits(model, ids):
    with torch.no_grad():
        return model(ids).logits.float()


def rel_err(a, b):
    return float((a - b).abs().max() / b.abs().max())


@pytest.fixture(scope="module")
def ids():
    return torch.randint(0, 49152, (2, 24), generator=torch.Generator().manual_seed(0))


@pytest.fixture(scope="module")
def merged_dir(tiny_chat_llama_dir, chat_adapter, tmp_path_factory):
    out = tmp_path_factory.mktemp("merged") / "model"
    export_merged(
        base=str(tiny_chat_llama_dir), adapter=str(chat_adapter), output=str(out), max_shard_size="1MB", device="cpu"
    )
    return out


def test_merged_folder_loads_with_plain_transformers_and_matches_the_adapter_on_the_original_base(
    merged_dir, tiny_chat_llama_dir, chat_adapter, ids
):
    index = json.loads((merged_dir / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) >= 3 and shards[0] == f"model-00001-of-{len(shards):05d}.safetensors"
    assert not list(merged_dir.glob("*.bin")) and not list(merged_dir.glob("adapter*"))
    assert json.loads((merged_dir / "config.json").read_text())["dtype"] == "bfloat16"
    merged = AutoModelForCausalLM.from_pretrained(merged_dir).eval()  # no extra code, no PEFT
    assert merged.dtype == torch.bfloat16 and AutoTokenizer.from_pretrained(merged_dir).eos_token == "<|im_end|>"
    merged = merged.float()  # compare in fp32 so that the weights' differences show, not bf16 compute noise
    adapter = load_for_inference(
        str(tiny_chat_llama_dir), str(chat_adapter), quant=QuantSpec(quantize="none", compute_dtype="float32")
    ).model
    base = AutoModelForCausalLM.from_pretrained(tiny_chat_llama_dir, dtype=torch.float32).eval()
    err = rel_err(logits(merged, ids), logits(adapter, ids))
    assert err <= REL_TOL, err
    assert rel_err(logits(base, ids), logits(adapter, ids)) > 20 * REL_TOL  # the adapter matters: a real check


def test_merging_into_nf4_warns_and_matches_the_qlora_model(
    tiny_chat_llama_dir, chat_adapter, merged_dir, tmp_path, ids
):
    out = tmp_path / "from_nf4"
    with pytest.warns(UserWarning, match="changes the model"):
        export_merged(
            base=str(tiny_chat_llama_dir), adapter=str(chat_adapter), output=str(out), from_quantized=True, device="cpu"
        )
    assert (out / "model.safetensors").is_file()  # small enough for one shard at the default 5GB
    from_nf4 = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    # NF4 base + adapter, as trained (fp32 compute: the dequantized weights are the same either way).
    qlora = load_for_inference(
        str(tiny_chat_llama_dir), str(chat_adapter), quant=QuantSpec(compute_dtype="float32")
    ).model
    err = rel_err(logits(from_nf4, ids), logits(qlora, ids))
    assert err <= REL_TOL, err
    original = AutoModelForCausalLM.from_pretrained(merged_dir, dtype=torch.float32).eval()
    assert rel_err(logits(original, ids), logits(qlora, ids)) > 2 * REL_TOL  # the quantization error is visible
    embed = "model.embed_tokens.weight"  # not quantized: identical in both exports
    assert torch.equal(from_nf4.state_dict()[embed], original.state_dict()[embed])


def test_existing_output_is_not_overwritten_unless_asked(tiny_chat_llama_dir, chat_adapter, merged_dir):
    with pytest.raises(FileExistsError, match="overwrite"):
        export_merged(base=str(tiny_chat_llama_dir), adapter=str(chat_adapter), output=str(merged_dir))


def _edited_adapter(src, dst, **config_changes):
    shutil.copytree(src, dst)
    config = json.loads((dst / "adapter_config.json").read_text())
    config.update(config_changes)
    (dst / "adapter_config.json").write_text(json.dumps(config))
    return dst


def test_mismatched_adapters_are_clear_errors(tiny_chat_llama_dir, chat_adapter, tmp_path):
    other_base = _edited_adapter(chat_adapter, tmp_path / "other_base", base_model_name_or_path="org/llama-7b")
    with pytest.raises(ValueError, match="trained on 'org/llama-7b'"):
        load_for_inference(str(tiny_chat_llama_dir), str(other_base))
    with pytest.raises(ValueError, match="trained on 'org/llama-7b'"):
        export_merged(base=str(tiny_chat_llama_dir), adapter=str(other_base), output=str(tmp_path / "x"))
    load_for_inference(str(tiny_chat_llama_dir), str(other_base), allow_other_base=True)  # same weights, other name

    other_r = _edited_adapter(chat_adapter, tmp_path / "other_r", r=16)  # every path: test_adapters.py
    with pytest.raises(ValueError, match=r"lora_A has shape \(8, \d+\) .* says r=16"):
        load_for_inference(str(tiny_chat_llama_dir), str(other_r))

    fewer = _edited_adapter(chat_adapter, tmp_path / "fewer", target_modules=["q_proj", "k_proj", "v_proj", "o_proj"])
    with pytest.raises(KeyError, match="not in model: .*down_proj"):
        load_for_inference(str(tiny_chat_llama_dir), str(fewer))

    narrow = make_tiny_llama(tmp_path / "narrow", hidden=32, intermediate=64)  # same module names, other shapes
    with pytest.raises(
        ValueError, match=r"down_proj.weight has shape \(32, 64\) but the adapter's B @ A .* \(64, 128\)"
    ):
        export_merged(base=str(narrow), adapter=str(chat_adapter), output=str(tmp_path / "y"), allow_other_base=True)
    assert not (tmp_path / "y").exists() and not list(tmp_path.glob(".y.*"))  # nothing half-written


def test_export_through_the_cli(tiny_chat_llama_dir, chat_adapter, tmp_path, merged_dir):
    from safetensors.torch import load_file

    from qlora_lightning.cli import main

    main(
        [
            "export",
            "--base",
            str(tiny_chat_llama_dir),
            "--adapter",
            str(chat_adapter),
            "--output",
            str(tmp_path / "m"),
            "--device",
            "cpu",
        ]
    )
    single = load_file(tmp_path / "m" / "model.safetensors")
    sharded = AutoModelForCausalLM.from_pretrained(merged_dir).state_dict()
    assert all(torch.equal(single[k], sharded[k]) for k in single)


def test_export_copies_the_model_s_own_files_and_follows_no_link_out_of_it(tiny_chat_llama_dir, chat_adapter, tmp_path):
    """A README linked to a file elsewhere must not pull that file's contents into the export; a hub-cache
    snapshot, whose files are all links into the repository's `blobs/`, is copied as usual."""
    secret = tmp_path / "secret.txt"
    secret.write_text("not part of the model")
    repo = tmp_path / "hub" / "models--org--tiny"
    snapshot, blobs = repo / "snapshots" / "abc123", repo / "blobs"
    snapshot.mkdir(parents=True)
    blobs.mkdir()
    for path in tiny_chat_llama_dir.iterdir():  # the hub cache's layout: snapshots/<rev>/<file> -> ../../blobs/<hash>
        shutil.copyfile(path, blobs / path.name)
        (snapshot / path.name).symlink_to(f"../../blobs/{path.name}")
    (snapshot / "README.md").symlink_to(secret)
    (snapshot / "LICENSE").write_text("Apache-2.0")
    with pytest.warns(UserWarning, match="README.md links to .*secret.txt, outside the model folder: not copied"):
        export_merged(
            base=str(snapshot),
            adapter=str(chat_adapter),
            output=str(tmp_path / "out"),
            device="cpu",
            allow_other_base=True,
        )
    copied = {p.name for p in (tmp_path / "out").iterdir()}
    assert "README.md" not in copied and {"LICENSE", "tokenizer.json", "tokenizer_config.json"} <= copied
    assert not any(p.is_symlink() for p in (tmp_path / "out").iterdir())


def test_a_config_json_linked_out_of_the_model_folder_is_refused(tiny_chat_llama_dir, chat_adapter, tmp_path):
    """The export rewrites the folder's own config.json and copies nothing from outside the folder: a config.json
    linked to a file elsewhere is an error naming both (it was once warned "not copied" and copied all the same)."""
    from qlora_lightning.cli import main

    model = shutil.copytree(tiny_chat_llama_dir, tmp_path / "model")
    outside = tmp_path / "elsewhere" / "config.json"
    outside.parent.mkdir()
    outside.write_text(json.dumps({**json.loads((model / "config.json").read_text()), "secret": "not the model's"}))
    (model / "config.json").unlink()
    (model / "config.json").symlink_to(outside)
    args = ["export", "--base", str(model), "--adapter", str(chat_adapter), "--device", "cpu"]
    message = f"{model / 'config.json'} links to {outside}, outside the model folder.*cp --remove-destination"
    with pytest.raises(ValueError, match=message):
        main(args + ["--output", str(tmp_path / "out"), "--allow_other_base", "true"])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["elsewhere", "model"]  # nothing written
    (model / "config.json").unlink()
    shutil.copyfile(outside, model / "config.json")  # what the message says to do
    main(args + ["--output", str(tmp_path / "out"), "--allow_other_base", "true"])
    assert json.loads((tmp_path / "out" / "config.json").read_text())["secret"] == "not the model's"


def test_the_merged_folder_follows_the_umask(tiny_chat_llama_dir, chat_adapter, tmp_path):
    """safetensors creates its files 0600; the README promises what the umask gives (0644 / 0755 under 022)."""
    from qlora_lightning.cli import main

    old = os.umask(0o022)
    try:
        main(
            ["export", "--base", str(tiny_chat_llama_dir), "--adapter", str(chat_adapter)]
            + ["--output", str(tmp_path / "m"), "--device", "cpu"]
        )
    finally:
        os.umask(old)
    modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in (tmp_path / "m").iterdir()}
    assert "model.safetensors" in modes and set(modes.values()) == {0o644}, modes
    assert stat.S_IMODE((tmp_path / "m").stat().st_mode) == 0o755


def test_an_hf_export_never_replaces_a_gguf_file(tiny_chat_llama_dir, chat_adapter, tmp_path):
    """`--output exp/m.gguf --overwrite true` with the format left at hf once replaced the GGUF file by a folder."""
    from qlora_lightning.cli import main

    gguf_file = tmp_path / "m.gguf"
    gguf_file.write_bytes(b"GGUF the exported model")
    args = ["export", "--base", str(tiny_chat_llama_dir), "--adapter", str(chat_adapter), "--device", "cpu"]
    with pytest.raises(ValueError, match=r"m\.gguf names a \.gguf file but --format is hf.*--format gguf"):
        main(args + ["--output", str(gguf_file), "--overwrite", "true"])
    with pytest.raises(FileExistsError, match=r"model is a file; a folder is written here"):
        (tmp_path / "model").write_bytes(b"a file named like a folder")
        main(args + ["--output", str(tmp_path / "model"), "--overwrite", "true"])
    assert gguf_file.read_bytes() == b"GGUF the exported model" and (tmp_path / "model").is_file()


def test_a_damaged_base_shard_is_a_clear_error_naming_it(tiny_chat_llama_dir, chat_adapter, tmp_path):
    """A shard cut short (an interrupted download) fails with its path and what to do, and nothing is written."""
    base = shutil.copytree(tiny_chat_llama_dir, tmp_path / "base")
    shard = sorted(base.glob("model-*.safetensors"))[-1]
    shard.write_bytes(shard.read_bytes()[:-4096])
    with pytest.raises(ValueError, match=f"{shard}: .*damaged or incomplete: download or save it again"):
        export_merged(base=str(base), adapter=str(chat_adapter), output=str(tmp_path / "merged"), allow_other_base=True)
    assert not (tmp_path / "merged").exists()
