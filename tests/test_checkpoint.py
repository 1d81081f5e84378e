"""PEFT-format adapter export/import, atomic writes, adapter-only state."""

from __future__ import annotations

import json
import os
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from qlora_lightning.checkpoint import (FINGERPRINT_KEY, PEFT_DEFAULT_ALPHA, STEP_KEY, AtomicCheckpointIO,
                                        adapter_metadata, adapter_state_dict, export_adapter, load_adapter_into,
                                        read_peft_adapter)
from qlora_lightning.lora import lora_layers
from qlora_lightning.model import LoraSpec, load_model, weights_fingerprint
from qlora_testing import make_tiny_llama, transformers_4bit


def trained_like(path, seed=1, **lora):
    """Our 4-bit model with random (non-zero) adapters, as after some training."""
    model = load_model(str(path), lora=LoraSpec(r=8, alpha=16, **lora), with_tokenizer=False).model.eval()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.requires_grad:
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    return model


def test_peft_loads_our_adapter_exactly_as_the_model_card_does(tiny_llama_dir, tmp_path):
    from peft import PeftModel

    ours = trained_like(tiny_llama_dir)
    folder = export_adapter(ours, tmp_path / "adapter", base_model=str(tiny_llama_dir), r=8, alpha=16, dropout=0.1)
    config = json.loads((folder / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["task_type"] == "CAUSAL_LM" and config["r"] == 8
    assert sorted(config["target_modules"]) == sorted(["q_proj", "k_proj", "v_proj", "o_proj",
                                                       "gate_proj", "up_proj", "down_proj"])
    keys = load_file(folder / "adapter_model.safetensors").keys()
    assert "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight" in keys and len(keys) == 2 * 2 * 7

    base = transformers_4bit(tiny_llama_dir, "cpu")
    peft_model = PeftModel.from_pretrained(base, folder).eval()
    x = torch.randint(0, 256, (2, 10))
    ours_logits, peft_logits = ours(x).logits.float(), peft_model(x).logits.float()
    assert not torch.equal(ours_logits, transformers_4bit(tiny_llama_dir, "cpu")(x).logits.float())  # adapters matter
    # Same NF4 bytes, same A/B; PEFT adds the LoRA term in its own op order: bf16 rounding apart.
    assert (ours_logits - peft_logits).abs().max() <= 2e-2 * peft_logits.abs().max()


def test_round_trip_through_peft_is_exact(tiny_llama_dir, tmp_path):
    from peft import PeftModel, get_peft_model_state_dict

    ours = trained_like(tiny_llama_dir, seed=2)
    folder = export_adapter(ours, tmp_path / "a", base_model=str(tiny_llama_dir), r=8, alpha=16, dropout=0.1)
    peft_model = PeftModel.from_pretrained(transformers_4bit(tiny_llama_dir, "cpu"), folder)
    peft_model.save_pretrained(tmp_path / "b")  # PEFT writes it back out itself
    fresh = load_model(str(tiny_llama_dir), lora=LoraSpec(r=8, alpha=16), with_tokenizer=False).model
    load_adapter_into(fresh, tmp_path / "b", base_model=str(tiny_llama_dir))
    a, b = adapter_state_dict(ours), adapter_state_dict(fresh)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert len(get_peft_model_state_dict(peft_model)) == len(a)


def test_import_mismatches_are_clear_errors(tiny_llama_dir, tmp_path):
    ours = trained_like(tiny_llama_dir)
    folder = export_adapter(ours, tmp_path / "a", base_model=str(tiny_llama_dir), r=8, alpha=16, dropout=0.1)
    other_r = load_model(str(tiny_llama_dir), lora=LoraSpec(r=4), with_tokenizer=False).model
    with pytest.raises(ValueError, match="r=8.*r=4"):
        load_adapter_into(other_r, folder)
    fewer = load_model(str(tiny_llama_dir), lora=LoraSpec(r=8, target_modules=("q_proj",)), with_tokenizer=False).model
    with pytest.raises(KeyError, match="disagree on the adapted modules"):
        load_adapter_into(fewer, folder)
    with pytest.raises(ValueError, match="trained on"):
        load_adapter_into(trained_like(tiny_llama_dir), folder, base_model="meta-llama/Llama-2-7b-hf")
    config = json.loads((folder / "adapter_config.json").read_text())
    (folder / "adapter_config.json").write_text(json.dumps({**config, "use_dora": True}))
    with pytest.raises(ValueError, match="use_dora"):
        read_peft_adapter(folder)
    with pytest.raises(FileNotFoundError, match="not a PEFT adapter folder"):
        read_peft_adapter(tmp_path)


def test_subset_of_layers_is_written_as_an_exact_regex(tiny_llama_dir, tmp_path):
    from peft import PeftModel

    ours = trained_like(tiny_llama_dir, target_modules=("re:model\\.layers\\.0\\..*",))
    folder = export_adapter(ours, tmp_path / "a", base_model=str(tiny_llama_dir), r=8, alpha=16, dropout=0.0)
    assert isinstance(json.loads((folder / "adapter_config.json").read_text())["target_modules"], str)
    peft_model = PeftModel.from_pretrained(transformers_4bit(tiny_llama_dir, "cpu"), folder).eval()
    x = torch.randint(0, 256, (1, 7))
    ref = peft_model(x).logits.float()
    assert (ours(x).logits.float() - ref).abs().max() <= 2e-2 * ref.abs().max()


def test_atomic_checkpoint_io_survives_a_failed_write(tmp_path, monkeypatch):
    io = AtomicCheckpointIO()
    path = tmp_path / "last.ckpt"
    io.save_checkpoint({"state_dict": {"m.lora_A": torch.ones(2, 3)}, "step": 1}, path)
    before = path.read_bytes()

    def dies(obj, f, *a, **k):
        with open(f, "wb") as fh:
            fh.write(b"partial")
        raise KeyboardInterrupt("killed mid-save")

    monkeypatch.setattr(torch, "save", dies)
    with pytest.raises(KeyboardInterrupt):
        io.save_checkpoint({"state_dict": {}, "step": 2}, path)
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["last.ckpt"]  # no temp file left behind
    monkeypatch.undo()
    assert torch.load(path, weights_only=True)["step"] == 1


def test_checkpoint_io_writes_and_removes_the_peft_folder(tmp_path):
    io = AtomicCheckpointIO()
    ckpt = {"state_dict": {"model.x.lora_A": torch.ones(2, 3), "model.x.lora_B": torch.zeros(4, 2)},
            "peft_adapter_config": {"peft_type": "LORA", "r": 2}, "peft_key_prefix": "model."}
    io.save_checkpoint(ckpt, tmp_path / "step=5.ckpt")
    assert set(load_file(tmp_path / "step=5" / "adapter_model.safetensors")) == {
        "base_model.model.x.lora_A.weight", "base_model.model.x.lora_B.weight"}
    io.remove_checkpoint(tmp_path / "step=5.ckpt")
    assert not os.listdir(tmp_path)


def test_each_adapter_folder_says_its_step_and_base(tmp_path):
    """The `.ckpt` is written first; a kill before its PEFT folder follows leaves a folder one step older, so
    each file says which step it holds."""
    io = AtomicCheckpointIO()
    ckpt = {"global_step": 7, "state_dict": {"model.x.lora_A": torch.ones(2, 3)}, "qlora_run": {"base_fingerprint": "f00"},
            "peft_adapter_config": {"peft_type": "LORA", "r": 2}, "peft_key_prefix": "model."}
    io.save_checkpoint(ckpt, tmp_path / "last.ckpt")
    metadata = adapter_metadata(tmp_path / "last")
    assert metadata[STEP_KEY] == "7" and metadata[FINGERPRINT_KEY] == "f00"
    assert io.load_checkpoint(tmp_path / "last.ckpt")["global_step"] == 7


def test_a_non_finite_adapter_is_never_written(tmp_path):
    io = AtomicCheckpointIO()
    ckpt = {"global_step": 3, "state_dict": {"model.x.lora_A": torch.tensor([[1.0, float("nan")]])},
            "peft_adapter_config": {"peft_type": "LORA", "r": 1}, "peft_key_prefix": "model."}
    with pytest.raises(FloatingPointError, match="x.lora_A.weight holds NaN or inf"):
        io.save_checkpoint(ckpt, tmp_path / "last.ckpt")
    assert os.listdir(tmp_path) == []


def test_adapters_that_would_train_or_predict_garbage_are_refused(tiny_llama_dir, tmp_path):
    folder = export_adapter(trained_like(tiny_llama_dir), tmp_path / "a", base_model=str(tiny_llama_dir), r=8,
                            alpha=16, dropout=0.1)
    state = load_file(folder / "adapter_model.safetensors")
    key = next(iter(state))
    save_file({**state, key: torch.full_like(state[key], float("nan"))}, folder / "adapter_model.safetensors")
    with pytest.raises(FloatingPointError, match=f"adapter_model.safetensors: .*{key.split('.', 2)[2][:20]}.*NaN"):
        read_peft_adapter(folder)
    with pytest.raises(FloatingPointError, match="NaN"):
        load_model(str(tiny_llama_dir), lora=LoraSpec(r=8, alpha=16), adapter=folder, with_tokenizer=False)
    config = json.loads((folder / "adapter_config.json").read_text())
    for alpha in (0, -16):
        (folder / "adapter_config.json").write_text(json.dumps({**config, "lora_alpha": alpha}))
        with pytest.raises(ValueError, match="lora_alpha must be a positive number"):
            read_peft_adapter(folder)


def test_an_adapter_without_lora_alpha_gets_peft_s_default(tiny_llama_dir, tmp_path):
    """PEFT reads a config without `lora_alpha` as 8; taking ours (16) would double every update."""
    from peft import PeftModel

    from qlora_lightning.export import lora_spec_from_adapter

    folder = export_adapter(trained_like(tiny_llama_dir, seed=3), tmp_path / "a", base_model=str(tiny_llama_dir),
                            r=8, alpha=16, dropout=0.0)
    config = json.loads((folder / "adapter_config.json").read_text())
    del config["lora_alpha"]
    (folder / "adapter_config.json").write_text(json.dumps(config))
    assert read_peft_adapter(folder)[0]["lora_alpha"] == PEFT_DEFAULT_ALPHA == 8
    spec = lora_spec_from_adapter(read_peft_adapter(folder)[0])  # what generate / eval / export build
    assert spec.alpha == 8
    with pytest.raises(ValueError, match="lora_alpha=8"):
        load_model(str(tiny_llama_dir), lora=LoraSpec(r=8, alpha=16), adapter=folder, with_tokenizer=False)
    ours = load_model(str(tiny_llama_dir), lora=spec, adapter=folder, with_tokenizer=False).model.eval()
    assert all(layer.alpha == 8 for layer in lora_layers(ours).values())
    peft_model = PeftModel.from_pretrained(transformers_4bit(tiny_llama_dir, "cpu"), folder).eval()
    x = torch.randint(0, 256, (1, 9))
    with torch.no_grad():
        ref, got = peft_model(x).logits.float(), ours(x).logits.float()
    assert (got - ref).abs().max() <= 2e-2 * ref.abs().max()


def test_damaged_adapter_files_are_named(tiny_llama_dir, tmp_path):
    folder = export_adapter(trained_like(tiny_llama_dir), tmp_path / "a", base_model=str(tiny_llama_dir), r=8,
                            alpha=16, dropout=0.1)
    weights = (folder / "adapter_model.safetensors").read_bytes()
    (folder / "adapter_model.safetensors").write_bytes(weights[: len(weights) // 2])
    with pytest.raises(ValueError, match=f"{folder / 'adapter_model.safetensors'}: not a readable safetensors"):
        read_peft_adapter(folder)
    text = (folder / "adapter_config.json").read_text()
    (folder / "adapter_config.json").write_text(text[: len(text) // 2])
    with pytest.raises(ValueError, match=f"{folder / 'adapter_config.json'}: not valid JSON"):
        read_peft_adapter(folder)


def test_the_base_is_recognised_by_its_weights_not_its_name(tiny_llama_dir, tmp_path):
    folder = export_adapter(trained_like(tiny_llama_dir), tmp_path / "a", base_model=str(tiny_llama_dir), r=8,
                            alpha=16, dropout=0.1, base_fingerprint=weights_fingerprint(tiny_llama_dir))
    renamed = shutil.copytree(tiny_llama_dir, tmp_path / "same-weights-other-name")
    load_model(str(renamed), lora=LoraSpec(r=8, alpha=16), adapter=folder, with_tokenizer=False)
    other = make_tiny_llama(tmp_path / "other" / tiny_llama_dir.name, seed=1)  # the same name, other weights
    with pytest.raises(ValueError, match="trained on other base weights.*allow_other_base"):
        load_model(str(other), lora=LoraSpec(r=8, alpha=16), adapter=folder, with_tokenizer=False)
    # an adapter written by PEFT carries no fingerprint: its recorded name decides, and the error says what to do
    (folder / "adapter_model.safetensors").write_bytes(_without_metadata(folder / "adapter_model.safetensors"))
    with pytest.raises(ValueError, match=f"not on '{renamed}'.*set base_model_name_or_path in {folder}"):
        load_model(str(renamed), lora=LoraSpec(r=8, alpha=16), adapter=folder, with_tokenizer=False)


def _without_metadata(path) -> bytes:
    tmp = path.with_suffix(".plain")
    save_file(load_file(path), tmp)
    return tmp.read_bytes()
