"""Adapters in PEFT's format: PEFT loads ours as the model card does, round trips, what is refused and why."""

from __future__ import annotations

import json
import os
import re
import shutil

import pytest
import torch
from qlora_testing import make_tiny_llama, transformers_4bit
from safetensors.torch import load_file, save_file

from qlora_lightning.adapters import PEFT_DEFAULT_ALPHA, adapter_state_dict, export_adapter, lora_spec, read_adapter
from qlora_lightning.lora import lora_layers
from qlora_lightning.model import load_model, weights_fingerprint
from qlora_lightning.specs import LoraSpec


def trained_like(path, seed=1, **lora):
    """Our 4-bit model with random (non-zero) adapters, as after some training."""
    model = load_model(str(path), lora=LoraSpec(r=8, alpha=16, **lora), with_tokenizer=False).model.eval()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    return model


def test_peft_loads_our_adapter_exactly_as_the_model_card_does(tiny_llama_dir, tmp_path):
    from peft import PeftModel

    ours = trained_like(tiny_llama_dir)
    folder = export_adapter(ours, tmp_path / "adapter", base_model=str(tiny_llama_dir))
    config = json.loads((folder / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["task_type"] == "CAUSAL_LM" and config["r"] == 8
    assert sorted(config["target_modules"]) == sorted(
        ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    )
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
    folder = export_adapter(ours, tmp_path / "a", base_model=str(tiny_llama_dir))
    peft_model = PeftModel.from_pretrained(transformers_4bit(tiny_llama_dir, "cpu"), folder)
    peft_model.save_pretrained(tmp_path / "b")  # PEFT writes it back out itself
    fresh = load_model(
        str(tiny_llama_dir), lora=LoraSpec(r=8, alpha=16), adapter=tmp_path / "b", with_tokenizer=False
    ).model
    a, b = adapter_state_dict(ours), adapter_state_dict(fresh)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert len(get_peft_model_state_dict(peft_model)) == len(a)


def test_peft_adapter_on_some_modules_loads_for_continued_training(tiny_chat_llama_dir, tmp_path):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(tiny_chat_llama_dir)
    peft_model = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.normal_()
    peft_model.save_pretrained(tmp_path / "qv")
    loaded = load_model(str(tiny_chat_llama_dir), lora=None, adapter=str(tmp_path / "qv"))
    model = loaded.model
    assert model.training and sorted({n.rsplit(".", 1)[-1] for n in lora_layers(loaded.model)}) == ["q_proj", "v_proj"]
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert len(trainable) == 2 * 2 * 2 and all(n.endswith((".lora_A", ".lora_B")) for n in trainable)
    layer = model.model.layers[1].self_attn.v_proj
    assert layer.r == 4 and layer.scaling == 2.0
    expected = {k.replace(".default", ""): v for k, v in peft_model.state_dict().items() if "lora_" in k}
    peft_b = expected["base_model.model.model.layers.1.self_attn.v_proj.lora_B.weight"]  # PEFT's fp32
    assert torch.equal(layer.lora_B, peft_b.to(torch.bfloat16))  # held in bf16, as the paper's adapters
    model(input_ids=torch.randint(0, 1000, (1, 8)), labels=torch.randint(0, 1000, (1, 8))).loss.backward()
    assert layer.lora_A.grad is not None


def test_import_mismatches_are_clear_errors(tiny_llama_dir, tmp_path):
    ours = trained_like(tiny_llama_dir)
    folder = export_adapter(ours, tmp_path / "a", base_model=str(tiny_llama_dir))
    with pytest.raises(ValueError, match="r=8.*r=4"):
        load_model(str(tiny_llama_dir), lora=LoraSpec(r=4), adapter=folder, with_tokenizer=False)
    with pytest.raises(KeyError, match="disagree on the adapted modules"):
        load_model(
            str(tiny_llama_dir), lora=LoraSpec(r=8, target_modules=("q_proj",)), adapter=folder, with_tokenizer=False
        )
    other_name = shutil.copytree(tiny_llama_dir, tmp_path / "Llama-2-7b-hf")
    with pytest.raises(ValueError, match="trained on"):
        load_model(str(other_name), lora=LoraSpec(r=8, alpha=16), adapter=folder, with_tokenizer=False)
    config = json.loads((folder / "adapter_config.json").read_text())
    (folder / "adapter_config.json").write_text(json.dumps({**config, "use_dora": True}))
    with pytest.raises(ValueError, match="use_dora"):
        read_adapter(folder)
    with pytest.raises(FileNotFoundError, match="not a PEFT adapter folder"):
        read_adapter(tmp_path)


def test_subset_of_layers_is_written_as_an_exact_regex(tiny_llama_dir, tmp_path):
    from peft import PeftModel

    ours = trained_like(tiny_llama_dir, target_modules=("re:model\\.layers\\.0\\..*",))
    folder = export_adapter(ours, tmp_path / "a", base_model=str(tiny_llama_dir))
    assert isinstance(json.loads((folder / "adapter_config.json").read_text())["target_modules"], str)
    peft_model = PeftModel.from_pretrained(transformers_4bit(tiny_llama_dir, "cpu"), folder).eval()
    x = torch.randint(0, 256, (1, 7))
    ref = peft_model(x).logits.float()
    assert (ours(x).logits.float() - ref).abs().max() <= 2e-2 * ref.abs().max()


def test_adapters_that_would_train_or_predict_garbage_are_refused(tiny_llama_dir, tmp_path):
    folder = export_adapter(trained_like(tiny_llama_dir), tmp_path / "a", base_model=str(tiny_llama_dir))
    state = load_file(folder / "adapter_model.safetensors")
    key = next(iter(state))
    save_file({**state, key: torch.full_like(state[key], float("nan"))}, folder / "adapter_model.safetensors")
    with pytest.raises(FloatingPointError, match=f"adapter_model.safetensors: .*{key.split('.', 2)[2][:20]}.*NaN"):
        read_adapter(folder)
    with pytest.raises(FloatingPointError, match="NaN"):
        load_model(str(tiny_llama_dir), lora=LoraSpec(r=8, alpha=16), adapter=folder, with_tokenizer=False)
    config = json.loads((folder / "adapter_config.json").read_text())
    for alpha in (0, -16):
        (folder / "adapter_config.json").write_text(json.dumps({**config, "lora_alpha": alpha}))
        with pytest.raises(ValueError, match="lora_alpha must be a positive number"):
            read_adapter(folder)


def test_an_adapter_without_lora_alpha_gets_peft_s_default(tiny_llama_dir, tmp_path):
    """PEFT reads a config without `lora_alpha` as 8; taking ours (16) would double every update."""
    from peft import PeftModel

    folder = export_adapter(trained_like(tiny_llama_dir, seed=3), tmp_path / "a", base_model=str(tiny_llama_dir))
    config = json.loads((folder / "adapter_config.json").read_text())
    del config["lora_alpha"]
    (folder / "adapter_config.json").write_text(json.dumps(config))
    assert read_adapter(folder).config["lora_alpha"] == PEFT_DEFAULT_ALPHA == 8
    spec = lora_spec(read_adapter(folder).config)  # what generate / eval / export build
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
    folder = export_adapter(trained_like(tiny_llama_dir), tmp_path / "a", base_model=str(tiny_llama_dir))
    weights = (folder / "adapter_model.safetensors").read_bytes()
    (folder / "adapter_model.safetensors").write_bytes(weights[: len(weights) // 2])
    with pytest.raises(ValueError, match=f"{folder / 'adapter_model.safetensors'}: not a readable safetensors"):
        read_adapter(folder)
    text = (folder / "adapter_config.json").read_text()
    (folder / "adapter_config.json").write_text(text[: len(text) // 2])
    with pytest.raises(ValueError, match=f"{folder / 'adapter_config.json'}: not valid JSON"):
        read_adapter(folder)


def test_the_base_is_recognised_by_its_weights_not_its_name(tiny_llama_dir, tmp_path):
    folder = export_adapter(
        trained_like(tiny_llama_dir),
        tmp_path / "a",
        base_model=str(tiny_llama_dir),
        base_fingerprint=weights_fingerprint(tiny_llama_dir),
    )
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


def test_a_config_whose_r_is_not_its_weights_rank_is_refused_on_every_path(tiny_chat_llama_dir, chat_adapter, tmp_path):
    """An adapter_config.json edited to r=16 over r=8 weights: every path reads adapters through `read_adapter`, so
    export (hf and gguf-lora), generation and training refuse it alike, naming both files; nothing is written."""
    from qlora_lightning.cli import main

    edited = shutil.copytree(chat_adapter, tmp_path / "r16")
    config = json.loads((edited / "adapter_config.json").read_text())
    (edited / "adapter_config.json").write_text(json.dumps({**config, "r": 16}))
    message = (
        re.escape(str(edited / "adapter_model.safetensors"))
        + r": .*lora_A has shape \(8, \d+\) and lora_B \(\d+, 8\), but "
        + re.escape(str(edited / "adapter_config.json"))
        + r" says r=16 .*set r to their rank \(8\)"
    )
    base = ["--base", str(tiny_chat_llama_dir), "--adapter", str(edited)]
    for format, output in (("hf", tmp_path / "merged"), ("gguf-lora", tmp_path / "adapter.gguf")):
        with pytest.raises(ValueError, match=message):
            main(["export", *base, "--output", str(output), "--format", format, "--device", "cpu"])
        assert not output.exists()
    with pytest.raises(ValueError, match=message):
        main(["generate", *base, "--prompt", "Hi", "--max_new_tokens", "1"])
    with pytest.raises(ValueError, match=message):  # training that starts from the adapter
        load_model(str(tiny_chat_llama_dir), lora=LoraSpec(r=16, alpha=16), adapter=edited, with_tokenizer=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["r16"]


class _Payload:
    """What a malicious pickle carries: unpickling it runs `touch <marker>`."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_a_pickled_adapter_bin_is_refused_with_what_to_do_and_runs_nothing(tiny_llama_dir, tmp_path):
    folder = export_adapter(trained_like(tiny_llama_dir), tmp_path / "a", base_model=str(tiny_llama_dir))
    state = load_file(folder / "adapter_model.safetensors")
    (folder / "adapter_model.safetensors").unlink()
    torch.save(state, folder / "adapter_model.bin")  # older PEFT's tensors-only pickle: still read
    assert read_adapter(folder).state.keys() == {k.removeprefix("base_model.model.")[: -len(".weight")] for k in state}
    marker = tmp_path / "code_ran"
    torch.save({**state, "payload": _Payload(marker)}, folder / "adapter_model.bin")
    with pytest.raises(
        ValueError,
        match=r"adapter_model\.bin: holds Python objects besides tensors, and pickles are "
        r"refused for safety .*safe_serialization=True.*save_file",
    ):
        read_adapter(folder)
    assert not marker.exists()
