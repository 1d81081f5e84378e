"""The model families people tune today (Llama 3, Mistral, Qwen 2.5/3, Gemma 2/3, Phi-3), each as a tiny random
model with a real tokenizer of its family (tests/family_models.py): the fixtures themselves, training through the
CLI and the Python API with the family's chat template and end-of-turn token, bitwise resume, compiled and
offloaded layers, FSDP's unit class, stopping at the end of a turn, and the configs of configs/families/."""

from __future__ import annotations

import json

import pytest
import torch
from family_models import FAMILIES, FAMILY_SPECS

# What the published tokenizers give for "Hello world" (their own encodings, BOS where the family adds one).
HELLO_WORLD = {
    "llama3": [128000, 9906, 1917],
    "mistral": [1, 23325, 2294],
    "qwen2": [9707, 1879],
    "qwen3": [9707, 1879],
    "gemma3": [2, 9259, 1902],
}


def _orca_sample(tmp_path, family):
    """The bundled OpenOrca sample; without its system prompts for Gemma 2, whose published template refuses a
    system message (`test_gemma2_chat_template_refusing_a_system_prompt_is_a_clear_error`)."""
    if family != "gemma2":
        return "bundled:orca_sample_train"
    from qlora_lightning.data.sources import BUNDLED

    records = [json.loads(line) for line in (BUNDLED / "orca_sample_train.jsonl").read_text().splitlines()]
    path = tmp_path / "orca_without_system.jsonl"
    path.write_text("".join(json.dumps({**r, "system_prompt": ""}) + "\n" for r in records))
    return str(path)


def _first_batch(folder, dataset, template):
    """The first training batch of 8 records of `dataset` under `template`, as `fit` would draw it."""
    from qlora_lightning import InstructionDataModule

    data = InstructionDataModule(
        str(folder), dataset=dataset, template=template, max_examples=8, val_size=8, batch_size=8, num_workers=0
    )
    data.prepare_data()
    data.setup("fit")
    return data, next(iter(data.train_dataloader()))


@pytest.mark.parametrize("family", FAMILIES)
def test_chat_targets_end_with_the_family_end_of_turn_inside_the_loss(family_model_dir, family, tmp_path):
    """The fixture is the family (its architecture; its real tokenizer's encodings and chat template, as saved) and,
    through the data module, under `template: chat` every target ends with the family's end-of-turn token, labelled
    (in the loss), after a source in the family's template; under `template: qlora` a target ends with the
    tokenizer's EOS (for a base model's tokenizer another token)."""
    from transformers import AutoConfig

    from qlora_lightning.data.formats import Example
    from qlora_lightning.data.tokenize import ExampleEncoder

    folder = family_model_dir(family)
    spec = FAMILY_SPECS[family]
    data, batch = _first_batch(folder, _orca_sample(tmp_path, family), "chat")
    tokenizer = data.tokenizer  # as the data module loads it from the folder
    config = AutoConfig.from_pretrained(folder)
    assert (config.model_type, config.tie_word_embeddings) == (spec.model_type, spec.tie)
    assert (config.num_hidden_layers, config.hidden_size, config.vocab_size) == (2, 64, len(tokenizer))
    if family in HELLO_WORLD:
        assert tokenizer("Hello world").input_ids == HELLO_WORLD[family]
    end = tokenizer.convert_tokens_to_ids(spec.end_of_turn)
    assert end not in (tokenizer.unk_token_id, None)
    for ids, labels in zip(batch["input_ids"].tolist(), batch["labels"].tolist(), strict=True):
        labelled = [i for i, label in zip(ids, labels, strict=True) if label != -100]
        assert labelled[-1] == end, tokenizer.decode(labelled)
        first = labels.index(labelled[0])  # the source before it is not learnt, and is the family's template
        source = tokenizer.decode(ids[:first])
        assert tokenizer.decode(labelled[:-1]).strip(), source  # the response
        assert spec.end_of_turn in source or source.endswith("[/INST]"), source  # Mistral: [/INST]
    plain = ExampleEncoder(tokenizer, "qlora").encode([Example(prompt="What is 2 + 2?", response="4")])
    assert plain["input_ids"][0][-1] == tokenizer.eos_token_id
    assert (tokenizer.eos_token_id == end) == (family == "mistral")


def test_gemma2_chat_template_refusing_a_system_prompt_is_a_clear_error(family_model_dir):
    """Gemma 2's published template refuses a system message; a record with one is an error that names the setting,
    the tokenizer, the template's reason, what to do and the question, not jinja's bare "System role not supported"."""
    folder = family_model_dir("gemma2")
    with pytest.raises(
        ValueError,
        match="data.template chat: the chat template of tokenizer .* refused an example: "
        "System role not supported \\(this example has a system text: leave it out, or use data.template "
        "qlora\\); question: ",
    ):
        _first_batch(folder, "bundled:orca_sample_train", "chat")


def _real_ids(tokenizer, n=24):
    """`n` token ids of real text (longer than the tiny Gemmas' 16-token sliding window), two rows."""
    text = "The quick brown fox jumps over the lazy dog while the cat watches from the warm windowsill. " * 4
    ids = tokenizer(text, add_special_tokens=False)["input_ids"][:n]
    assert len(ids) == n
    return torch.tensor([ids, ids[::-1]])


def _linear_names(folder):
    """The names of every `nn.Linear` of the family's model as transformers builds it, but the output head."""
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM

    with init_empty_weights():
        plain = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(folder))
    return sorted(n for n, m in plain.named_modules() if isinstance(m, torch.nn.Linear) and n != "lm_head")


@pytest.mark.parametrize("family", FAMILIES)
def test_family_loads_in_4bit_with_lora_on_every_linear_and_computes_as_transformers(family_model_dir, family):
    """Python API: every linear layer (phi3's fused qkv_proj/gate_up_proj included) is a 4-bit base with LoRA, tied
    embeddings stay one frozen tensor, only the adapters train, and with fresh adapters the logits are those of
    transformers' own 4-bit load of the folder (Gemma's soft-capping and scaled embeddings, Qwen's biases, the
    sliding window over 24 tokens: whatever the family's forward does)."""
    from qlora_testing import FP32, transformers_4bit

    from qlora_lightning.lora import LoraLinear4bit, lora_layers
    from qlora_lightning.model import load_model
    from qlora_lightning.specs import LoraSpec

    folder = family_model_dir(family)
    loaded = load_model(str(folder), quant=FP32, lora=LoraSpec(r=4, alpha=8, dropout=0.0))
    model = loaded.model
    assert sorted(lora_layers(model)) == _linear_names(folder)
    assert all(isinstance(m, LoraLinear4bit) for m in lora_layers(model).values())
    if family == "phi3":
        assert {n.rsplit(".", 1)[-1] for n in lora_layers(model)} == {"qkv_proj", "o_proj", "gate_up_proj", "down_proj"}
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {f"{m}.lora_{ab}" for m in lora_layers(model) for ab in "AB"}
    if FAMILY_SPECS[family].tie:
        assert model.lm_head.weight is model.get_input_embeddings().weight
    ids = _real_ids(loaded.tokenizer)
    model.eval()
    ref = transformers_4bit(folder, compute_dtype=torch.float32)
    with torch.no_grad():
        ours, theirs = model(ids).logits, ref(ids).logits
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)
    if family == "gemma2":
        assert ours.abs().max() <= ref.config.final_logit_softcapping
    model.train()
    loss = model(ids, labels=ids).loss
    loss.backward()
    assert torch.isfinite(loss) and all(model.get_parameter(n).grad is not None for n in trainable)


def _fit(folder, root, dataset, max_steps, *extra):
    """`train.py fit` in this process (`cli.main`) on `dataset` under the family's chat template: 16 records,
    short rows (source 64, target 16 tokens), a checkpoint every 2 steps in `<root>/checkpoints`."""
    from qlora_testing import cli_args

    from qlora_lightning.cli import main

    args = cli_args(
        folder,
        root,
        max_steps,
        2,
        data__template="chat",
        data__dataset=dataset,
        data__val_dataset=dataset,
        data__max_examples=16,
        data__source_max_len=64,
        data__target_max_len=16,
    )
    main(args[2:] + list(extra))


#: Gemma's 262k-token vocabularies make its three CLI runs the slowest of the fast tier (about 45 s each on 2 cores):
#: in the slow tier, which CI runs; the other five families keep the default tier's CLI check.
CLI_PARAMS = [pytest.param(f, marks=pytest.mark.slow) if f.startswith("gemma") else f for f in FAMILIES]


@pytest.mark.parametrize("family", CLI_PARAMS)
def test_family_trains_through_the_cli_and_a_finished_run_resumes_bitwise(family_model_dir, family, tmp_path):
    """`train.py fit` with `template: chat` trains 3 steps; a run of 2 steps extended to 3 with `--ckpt_path last`
    ends with the straight run's adapters, bit for bit (the pattern of test_resume's extension test, per family)."""
    from safetensors.torch import load_file

    folder = family_model_dir(family)
    dataset = _orca_sample(tmp_path, family)
    _fit(folder, tmp_path / "straight", dataset, 3)
    _fit(folder, tmp_path / "cut", dataset, 2)
    _fit(folder, tmp_path / "cut", dataset, 3, "--ckpt_path", "last")
    straight = load_file(tmp_path / "straight" / "checkpoints" / "last" / "adapter_model.safetensors")
    extended = load_file(tmp_path / "cut" / "checkpoints" / "last" / "adapter_model.safetensors")
    assert straight.keys() == extended.keys() and len(straight) == 2 * len(_linear_names(folder))
    assert all(torch.equal(straight[k], extended[k]) for k in straight)
    assert any(v.abs().sum() > 0 for k, v in straight.items() if "lora_B" in k)  # it trained


def _loss_and_grads(folder, ids, **layers):
    """Loss and LoRA gradients of one batch of `ids` (second half labelled) through `QLoRAModule`, fp32 on the CPU,
    with the layers' settings (`compile_layers`, `offload_activations`); the adapters drawn at random."""
    from qlora_testing import FP32, randomize_adapters

    from qlora_lightning import QLoRAModule
    from qlora_lightning.specs import LoraSpec

    module = QLoRAModule(str(folder), quant=FP32, lora=LoraSpec(r=8, dropout=0.0), **layers)
    module.configure_model()
    randomize_adapters(module.model, seed=0)  # B = 0 would hide differences in the LoRA path
    labels = ids.clone()
    labels[:, : ids.shape[1] // 2] = -100
    loss, _ = module.loss_on({"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels})
    loss.backward()
    return loss.detach(), [p.grad for p in module.model.parameters() if p.requires_grad]


@pytest.mark.parametrize("family", FAMILIES)
def test_family_compiled_and_offloaded_layers_give_the_plain_loss_and_gradients(family_model_dir, family):
    """Each decoder layer compiled (`compile_layers`, torch.compile on the CPU) with its checkpointed inputs offloaded
    (`offload_activations`) gives the loss and gradients of the plain layers, over 24 tokens (past Gemma's window)."""
    from family_models import family_tokenizer
    from torch._dynamo.utils import counters

    folder = family_model_dir(family)
    ids = _real_ids(family_tokenizer(family, copy=False))
    torch._dynamo.reset()
    counters.clear()
    compiled = _loss_and_grads(folder, ids, compile_layers=True, offload_activations=True)
    assert counters["stats"]["unique_graphs"] >= 1  # the layers did run compiled
    plain = _loss_and_grads(folder, ids)
    torch.testing.assert_close(compiled[0], plain[0], rtol=1e-4, atol=1e-5)
    for a, b in zip(compiled[1], plain[1], strict=True):
        torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-5)


@pytest.mark.parametrize("family", FAMILIES)
def test_family_outputs_kept_from_forward_give_the_plain_loss_and_gradients(family_model_dir, family):
    """`offload_outputs` naming every projection but those the recomputation skips anyway (fused ones such as Phi-3's
    `qkv_proj` included): the recomputation reuses their forward outputs and the loss and gradients are the plain
    layers'. Eager here; tests/test_offload.py runs the ops compiled."""
    import re

    from family_models import family_tokenizer

    from qlora_lightning.lora import lora_layers
    from qlora_lightning.model import RESIDUAL_ONLY_OUTPUTS, load_model
    from qlora_lightning.specs import LoraSpec

    folder = family_model_dir(family)
    skeleton = load_model(str(folder), lora=LoraSpec(r=8), materialize=False, with_tokenizer=False).model
    projections = {re.sub(r"^.*\.layers\.\d+\.", "", name) for name in lora_layers(skeleton)}
    kept = tuple(sorted(projections - set(RESIDUAL_ONLY_OUTPUTS.get(skeleton.config.model_type, ()))))
    assert len(kept) >= 2, kept  # attention and MLP projections
    ids = _real_ids(family_tokenizer(family, copy=False))
    reused = _loss_and_grads(folder, ids, offload_activations=True, offload_outputs=kept)
    plain = _loss_and_grads(folder, ids)
    torch.testing.assert_close(reused[0], plain[0], rtol=1e-5, atol=1e-6)
    for a, b in zip(reused[1], plain[1], strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("family", FAMILIES)
def test_family_recomputation_skips_only_outputs_no_backward_reads(family_model_dir, family, monkeypatch):
    """`RESIDUAL_ONLY_OUTPUTS` (the projections whose frozen matmul the offloaded recomputation skips) lists exactly
    the families whose MLP output goes straight into the residual. Gemma 2/3 normalise it first, so forcing the skip
    on them changes the gradients: the test above is what catches a family listed wrongly."""
    from family_models import FAMILY_SPECS, family_tokenizer

    from qlora_lightning.model import RESIDUAL_ONLY_OUTPUTS

    model_type = FAMILY_SPECS[family].model_type
    if not family.startswith("gemma"):
        assert RESIDUAL_ONLY_OUTPUTS[model_type] == ("mlp.down_proj",)
        return
    assert model_type not in RESIDUAL_ONLY_OUTPUTS
    monkeypatch.setitem(RESIDUAL_ONLY_OUTPUTS, model_type, ("mlp.down_proj",))
    folder = family_model_dir(family)
    ids = _real_ids(family_tokenizer(family, copy=False))
    forced = _loss_and_grads(folder, ids, offload_activations=True)
    plain = _loss_and_grads(folder, ids)
    torch.testing.assert_close(forced[0], plain[0])  # forward is untouched
    assert any(not torch.allclose(a, b, rtol=1e-3, atol=1e-5) for a, b in zip(forced[1], plain[1], strict=True))


@pytest.mark.parametrize("family", FAMILIES)
def test_family_fsdp_units_are_its_decoder_layers_and_load_streaming(family_model_dir, family, monkeypatch):
    """FSDP's units are the family's own decoder-layer class (transformers' `_no_split_modules`, found from the model,
    not named anywhere in fsdp.py) and each frozen 4-bit base; the model left on the meta device and loaded unit by
    unit as FSDP wraps it (one CPU process, gloo) gives the unwrapped model's loss, tied embeddings still tied."""
    import torch.distributed as dist
    from family_models import family_tokenizer
    from qlora_testing import free_port, wrap_fsdp1
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

    from qlora_lightning.fsdp import decoder_layer_policy
    from qlora_lightning.lora import FrozenLinear
    from qlora_lightning.model import load_model
    from qlora_lightning.specs import LoraSpec, QuantSpec

    folder = family_model_dir(family)
    quant = QuantSpec(compute_dtype="float32", quant_storage="float32")
    model = load_model(str(folder), quant=quant, lora=LoraSpec(r=4, dropout=0.0), with_tokenizer=False).model
    units = [m for m in model.modules() if decoder_layer_policy(m, recurse=False, nonwrapped_numel=0)]
    layers = [m for m in units if not isinstance(m, FrozenLinear)]
    assert {type(m).__name__ for m in layers} == set(model._no_split_modules)
    assert len(layers) == 2 and len(units) - 2 == len(_linear_names(folder))
    ids = _real_ids(family_tokenizer(family, copy=False))
    with torch.no_grad():
        expected = model(input_ids=ids, labels=ids).loss

    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", str(free_port()))
    dist.init_process_group("gloo", rank=0, world_size=1)
    try:
        deferred = load_model(
            str(folder), quant=quant, lora=LoraSpec(r=4, dropout=0.0), with_tokenizer=False, materialize=False
        )
        wrapped = wrap_fsdp1(deferred)
        with torch.no_grad():
            loss = wrapped(input_ids=ids, labels=ids).loss
        if FAMILY_SPECS[family].tie:
            inner = wrapped.module
            assert inner.lm_head.weight is inner.get_input_embeddings().weight
    finally:
        dist.destroy_process_group()
    torch.testing.assert_close(loss, expected, rtol=1e-5, atol=1e-6)
    assert sum(isinstance(m, FSDP) for m in wrapped.modules()) == len(units) + 1  # and the root


@pytest.mark.parametrize("family", FAMILIES)
def test_family_generation_stops_at_its_end_of_turn(family_model_dir, family):
    """`generate` with the chat template stops where the model writes the family's end-of-turn token, although the
    tokenizer's EOS (a base model's) is another token: the model here is made to write it as its 3rd token."""
    from qlora_lightning.generate import generate, stop_ids
    from qlora_lightning.model import load_model

    folder = family_model_dir(family)
    loaded = load_model(str(folder), lora=None, train_mode=False, gradient_checkpointing=False)
    model, tokenizer = loaded.model, loaded.tokenizer
    end = tokenizer.convert_tokens_to_ids(FAMILY_SPECS[family].end_of_turn)
    assert end in stop_ids(model, tokenizer)
    word = tokenizer("Paris", add_special_tokens=False)["input_ids"][0]
    calls = []

    def scripted(module, args, output):
        """The head's logits made to pick `word`, `word`, then the end of turn, then `word` forever."""
        step = len(calls)
        calls.append(step)
        forced = torch.full_like(output, -1e4)
        forced[..., -1, end if step == 2 else word] = 1e4
        return forced

    handle = model.lm_head.register_forward_hook(scripted)
    try:
        [answer] = generate(model, tokenizer, "What is the capital of France?", template="chat", max_new_tokens=8)
    finally:
        handle.remove()
    assert answer == tokenizer.decode([word, word]) and len(calls) == 3


@pytest.mark.parametrize("family", FAMILIES)
def test_family_mmlu_reads_one_answer_letter_token_each(family_model_dir, family):
    """MMLU scores the logit of " A" … " D" after "Answer:" (no generation, so no end of turn enters): each family's
    tokenizer writes each letter there as one token of its own."""
    from family_models import family_tokenizer

    from qlora_lightning.eval.mmlu import answer_token_ids

    family_model_dir(family)
    tokenizer = family_tokenizer(family, copy=False)
    ids = answer_token_ids(tokenizer)
    assert len(set(ids)) == 4
    assert [tokenizer.decode([i]).strip() for i in ids] == ["A", "B", "C", "D"]


CONFIGS = {  # configs/families/<name>.yaml: (base model, template, packed rows)
    "llama3": ("meta-llama/Llama-3.1-8B", "chat", True),
    "mistral": ("mistralai/Mistral-7B-v0.3", "qlora", True),
    "qwen2.5": ("Qwen/Qwen2.5-7B", "chat", True),
    "qwen3": ("Qwen/Qwen3-8B", "chat", True),
    "gemma2": ("google/gemma-2-9b", "qlora", False),  # soft-capped attention: no packed rows
    "gemma3": ("google/gemma-3-12b-pt", "chat", True),
    "phi3": ("microsoft/Phi-3-mini-4k-instruct", "chat", True),
}


def test_every_family_config_is_tested():
    from qlora_testing import REPO

    assert sorted(p.stem for p in (REPO / "configs" / "families").glob("*.yaml")) == sorted(CONFIGS)


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_family_config_parses_into_the_paper_recipe(name, tmp_path):
    """configs/families/<name>.yaml through the CLI's parser (no model download): the family's model, the paper's
    7B/13B recipe (r 64, alpha 16, dropout 0.1, lr 2e-4, batch 16, clipping 0.3, 10000 steps), its template."""
    from qlora_testing import REPO

    from qlora_lightning.cli import run_lightning_cli
    from qlora_lightning.optim import PagedAdamW32bitOneSync

    base, template, packed = CONFIGS[name]
    config = REPO / "configs" / "families" / f"{name}.yaml"
    cli = run_lightning_cli(["--config", str(config), "--trainer.default_root_dir", str(tmp_path)], run=False)
    model, data, trainer = cli.model, cli.datamodule, cli.trainer
    assert model.base_model == base and data.hparams.tokenizer == base
    assert (model.lora.r, model.lora.alpha, model.lora.dropout, model.lora.target_modules) == (
        64,
        16,
        0.1,
        "all-linear",
    )
    assert (model.quant.quantize, model.quant.double_quant, model.quant.compute_dtype) == ("nf4", True, "bfloat16")
    assert trainer.max_steps == 10000 and trainer.gradient_clip_val == 0.3
    assert data.hparams.batch_size * trainer.accumulate_grad_batches == 16
    assert (data.hparams.source_max_len, data.hparams.target_max_len) == (384, 128)
    assert (data.hparams.template, data.hparams.padding_free) == (template, packed)
    optimizer = model.optimizer_factory([torch.nn.Parameter(torch.zeros(2))])
    assert isinstance(optimizer, PagedAdamW32bitOneSync)  # bitsandbytes' paged AdamW, one launch a step
    assert optimizer.defaults["lr"] == 2e-4 and optimizer.defaults["betas"] == (0.9, 0.999)
