"""load_model: streaming 4-bit load against transformers' own, memory bound, errors, train mode."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap

import pytest
import torch
from qlora_testing import (
    assert_bnb_cpu_repacking_off,
    make_tiny_llama,
    randomize_adapters,
    requires_cuda,
    transformers_4bit,
)
from transformers import AutoModelForCausalLM

from qlora_lightning.adapters import export_adapter
from qlora_lightning.lora import FrozenLinear4bit, LoraLinear4bit, LoraLinear16bit, lora_layers
from qlora_lightning.model import load_model, weights_fingerprint
from qlora_lightning.specs import LoraSpec, QuantSpec

DEVICES = ["cpu", pytest.param("cuda", marks=requires_cuda)]


@pytest.mark.parametrize("device", DEVICES)
def test_logits_match_transformers_4bit_load_of_a_sharded_checkpoint(tiny_llama_dir, device):
    shards = json.loads((tiny_llama_dir / "model.safetensors.index.json").read_text())["weight_map"].values()
    assert len(set(shards)) >= 3
    ours = load_model(str(tiny_llama_dir), device=device, with_tokenizer=False).model.eval()
    ref = transformers_4bit(tiny_llama_dir, device)
    per_block = [n for n, m in ours.model.layers[0].named_modules() if isinstance(m, LoraLinear4bit)]
    assert sorted(per_block) == sorted(
        [
            "self_attn.q_proj",
            "self_attn.k_proj",
            "self_attn.v_proj",
            "self_attn.o_proj",
            "mlp.gate_proj",
            "mlp.up_proj",
            "mlp.down_proj",
        ]
    )
    x = torch.randint(0, 256, (2, 12), device=device)
    with torch.no_grad():  # inference, where bitsandbytes would take its bf16 CPU kernel (see transformers_4bit)
        a, b = ours(x).logits.float(), ref(x).logits.float()
    assert_bnb_cpu_repacking_off(ref)
    # Same NF4 bytes, same kernels: identical on CPU; allow bf16 rounding differences elsewhere.
    assert (a - b).abs().max() <= 1e-2 * b.abs().max()
    if device == "cpu":
        assert torch.equal(a, b)


def test_loaded_model_is_ready_to_train(tiny_llama_dir):
    loaded = load_model(str(tiny_llama_dir), lora=LoraSpec(r=4), with_tokenizer=False)
    model = loaded.model
    assert model.training and model.is_gradient_checkpointing and not model.config.use_cache
    assert len(lora_layers(loaded.model)) == 2 * 7
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {f"{m}.lora_{ab}" for m in lora_layers(loaded.model) for ab in "AB"}
    assert model.lm_head.weight.dtype == model.model.embed_tokens.weight.dtype == torch.bfloat16
    assert model.model.norm.weight.dtype == torch.bfloat16
    model(torch.randint(0, 256, (1, 8)), labels=torch.randint(0, 256, (1, 8))).loss.backward()
    assert all(model.get_submodule(m).lora_A.grad is not None for m in lora_layers(loaded.model))


def test_tied_embeddings_and_16bit_mode(tmp_path):
    path = make_tiny_llama(tmp_path / "tied", tie=True)
    model = load_model(
        str(path), quant=QuantSpec(quantize="none"), with_tokenizer=False, gradient_checkpointing=False
    ).model
    assert model.lm_head.weight is model.model.embed_tokens.weight
    assert isinstance(model.model.layers[0].mlp.up_proj, LoraLinear16bit)
    ref = AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16).eval()
    x = torch.randint(0, 256, (1, 9))
    assert torch.equal(model.eval()(x).logits, ref(x).logits)


def test_target_subset_and_errors(tiny_llama_dir, tmp_path):
    loaded = load_model(str(tiny_llama_dir), lora=LoraSpec(target_modules=("q_proj", "v_proj")), with_tokenizer=False)
    assert len(lora_layers(loaded.model)) == 4
    assert type(loaded.model.model.layers[0].mlp.up_proj) is FrozenLinear4bit  # 4-bit, without LoRA
    with pytest.raises(ValueError, match="matches no linear layer"):
        load_model(str(tiny_llama_dir), lora=LoraSpec(target_modules=("query_key_value",)), with_tokenizer=False)
    (tmp_path / "config.json").write_text((tiny_llama_dir / "config.json").read_text())
    with pytest.raises(FileNotFoundError, match="never unpickled"):
        load_model(str(tmp_path), with_tokenizer=False)


def test_checkpoint_of_another_architecture_is_a_clear_error(tmp_path):
    path = make_tiny_llama(tmp_path / "m", shard="10MB")
    config = json.loads((path / "config.json").read_text())
    config["num_hidden_layers"] = 1
    (path / "config.json").write_text(json.dumps(config))
    with pytest.raises(KeyError, match="model.layers.1.*has no place"):
        load_model(str(path), with_tokenizer=False)


MEMORY_PROBE = textwrap.dedent("""
    import os, sys, threading, time
    from qlora_lightning.model import load_model
    from qlora_lightning.specs import LoraSpec

    def rss():
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

    load_model(sys.argv[2], lora=LoraSpec(r=8), with_tokenizer=False)  # warm-up: lazy imports, kernels
    before, peak, done = rss(), [0], threading.Event()

    def watch():
        while not done.is_set():
            peak[0] = max(peak[0], rss())
            time.sleep(0.001)

    watcher = threading.Thread(target=watch)
    watcher.start()
    model = load_model(sys.argv[1], lora=LoraSpec(r=8), with_tokenizer=False).model
    done.set()
    watcher.join()
    held = sum(t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers()])
    print(max(peak[0], rss()) - before, held)
""")


def test_peak_host_memory_is_bounded_by_the_4bit_model_plus_a_shard(tmp_path):
    """Loading a ~290 MB bf16 checkpoint in 25 MB shards must not raise peak RSS by the bf16 model size.

    RSS is sampled every millisecond during the load, after a warm-up load of a small model.
    """
    big = make_tiny_llama(tmp_path / "big", hidden=1024, intermediate=2816, layers=12, vocab=4096, shard="25MB")
    small = make_tiny_llama(tmp_path / "small", hidden=1024, intermediate=2816, layers=1, vocab=4096, shard="25MB")
    bf16_bytes = sum(p.stat().st_size for p in big.glob("*.safetensors"))
    # glibc's dynamic mmap threshold would keep freed weight-sized blocks in the heap and count them in
    # RSS; a fixed threshold returns them, so RSS measures what loading really holds.
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"}
    out = subprocess.run(
        [sys.executable, "-c", MEMORY_PROBE, str(big), str(small)], capture_output=True, text=True, check=True, env=env
    )
    grown, held = map(int, out.stdout.strip().splitlines()[-1].split())
    largest_shard = max(p.stat().st_size for p in big.glob("*.safetensors"))
    # What stays is the 4-bit model (~0.3 of the bf16 size with its bf16 embeddings); loading adds about
    # one weight and its temporaries (a shard is mapped only while one tensor is read). Materialising the model would add the bf16 size.
    assert held < 0.35 * bf16_bytes
    assert grown < held + 2 * largest_shard + 32 * 2**20, (grown, held, largest_shard)
    assert grown < 0.6 * bf16_bytes


def test_random_shape_builds_directly_in_4bit():
    loaded = load_model("random:tiny", lora=LoraSpec(r=4))
    assert loaded.tokenizer is None and len(lora_layers(loaded.model)) == 14
    layer = loaded.model.model.layers[1].mlp.down_proj
    assert isinstance(layer, LoraLinear4bit) and layer.base_layer.weight.dtype == torch.uint8
    w = layer.base_layer.dense_weight().float()
    assert 0.015 < w.std() < 0.025  # N(0, 0.02) through NF4
    loss = loaded.model(torch.randint(0, 256, (2, 8)), labels=torch.randint(0, 256, (2, 8))).loss
    assert abs(loss.item() - torch.log(torch.tensor(256.0)).item()) < 0.5  # random model: ~uniform
    with pytest.raises(ValueError, match="unknown random shape"):
        load_model("random:8b")


@pytest.mark.parametrize("tie", [False, True])
@pytest.mark.parametrize("device", DEVICES)
def test_deferred_loading_module_by_module_in_any_order_gives_the_same_model(tmp_path, device, tie):
    """What FSDP loading does: the model stays on the meta device and each module is loaded when asked for
    (FSDP asks for the nested units first, the root's embeddings and head last); the adapters to start
    from come from a PEFT folder."""
    folder = str(make_tiny_llama(tmp_path / "tiny", tie=tie))
    direct = load_model(folder, device=device, with_tokenizer=False).model.eval()
    randomize_adapters(direct, seed=0)  # B = 0 would hide the adapters
    adapter = export_adapter(direct, tmp_path / "adapter", base_model=folder)
    deferred = load_model(folder, device=device, adapter=adapter, materialize=False, with_tokenizer=False)
    assert all(p.is_meta for p in deferred.model.parameters())
    for module in reversed(list(deferred.model.modules())):
        deferred.materialize(module)
    assert not any(p.is_meta for p in deferred.model.parameters())
    head, embeddings = deferred.model.get_output_embeddings().weight, deferred.model.get_input_embeddings().weight
    assert (head is embeddings) == tie
    assert {p.device.type for p in deferred.model.parameters()} == {device}
    assert [n for n, p in deferred.model.named_parameters() if p.requires_grad] == [
        n for n, p in direct.named_parameters() if p.requires_grad
    ]
    ids = torch.randint(0, 256, (2, 8), device=device)
    with torch.no_grad():
        torch.testing.assert_close(
            deferred.model.eval()(input_ids=ids).logits, direct(input_ids=ids).logits, rtol=0, atol=0
        )


def test_a_missing_or_damaged_base_is_named(tiny_llama_dir, tmp_path):
    for missing in (str(tmp_path / "no-such-model"), "./no-such-model", "~/no/such/model"):
        with pytest.raises(FileNotFoundError, match=f"model folder '{missing}' does not exist"):
            load_model(missing, with_tokenizer=False)
    with pytest.raises(FileNotFoundError, match="'no-such-org/no-such-model' is not a local folder, and fetching it"):
        load_model("no-such-org/no-such-model", with_tokenizer=False)  # the hub is off in the tests
    damaged = shutil.copytree(tiny_llama_dir, tmp_path / "damaged")
    shard = sorted(damaged.glob("*.safetensors"))[1]
    shard.write_bytes(shard.read_bytes()[:-1000])  # a download cut short: the header promises more bytes
    with pytest.raises(ValueError, match=f"{shard}: .*damaged or incomplete"):
        load_model(str(damaged), with_tokenizer=False)


def test_fingerprint_tells_weights_apart_not_names(tiny_llama_dir, tmp_path):
    same = shutil.copytree(tiny_llama_dir, tmp_path / "copy")
    other = make_tiny_llama(tmp_path / "other", seed=1)
    assert weights_fingerprint(same) == weights_fingerprint(tiny_llama_dir) != weights_fingerprint(other)


def test_a_text_command_on_random_weights_names_the_missing_tokenizer():
    """`generate` and `eval mmlu` ask the loaded model for its tokenizer: a `random:<shape>` base has none, which is
    said by name instead of failing inside the tokenizer calls."""
    from qlora_lightning.model import LoadedModel

    loaded = LoadedModel(model=None, tokenizer=None, materialize=None, fingerprint="random:tiny")
    with pytest.raises(ValueError, match=r"random:tiny: random weights come without a tokenizer"):
        loaded.text_tokenizer()
