"""GGUF export: the merged model and the adapter alone, read back by transformers, by `gguf.GGUFReader` and
(opt-in) by llama.cpp itself, through its Python wheel and through node-llama-cpp's chat API; metadata, chat template,
Modelfile, streaming, and bad input. Skipped as a whole where the `gguf` package is missing."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from pathlib import Path
from typing import get_args

import jinja2.sandbox
import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

gguf = pytest.importorskip("gguf", reason="the GGUF export needs the `gguf` package (pip install gguf)")

from qlora_lightning import builtin, export_gguf, gguf_model, gguf_vocab, ollama  # noqa: E402
from qlora_lightning.adapters import save_adapter, to_peft_keys  # noqa: E402
from qlora_lightning.atomic import WriteError  # noqa: E402
from qlora_lightning.checkpoint_files import safetensors_shards, weights_fingerprint  # noqa: E402
from qlora_lightning.data.formats import Example  # noqa: E402
from qlora_lightning.data.templates import format_prompt, render_source  # noqa: E402
from qlora_lightning.data.tokenize import encode_prompt  # noqa: E402
from qlora_lightning.export import export_model  # noqa: E402
from qlora_lightning.merge import GGUFType  # noqa: E402

#: GGUF logits against the merged Hugging Face model's, both run in fp32 by transformers, as max |Δlogit| / max
#: |logit| over every position and token. f16 stores the merged bf16 weights exactly (bf16 → f16 is exact but for
#: |w| < 6e-5, which f16 keeps as subnormals): measured 3.7e-7 (tiny model) and 2.6e-6 (SmolLM2); bf16 gives 0.
F16_TOL = 1e-5
#: q8_0 rounds each block of 32 weights to 8 bits: measured 2.3 % (tiny) and 2.9 % (SmolLM2-135M, where every
#: position's most likely next token stays the same). The adapters move the logits by more than 4x that.
Q8_TOL = 5e-2
QUESTION = "What is 79 + 60? Don't answer 12345; café, naïve  spaces\nand a new line."


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max())


def logits(model, ids: list[int]) -> torch.Tensor:
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0].float()


def export(base, adapter, output: Path, **kwargs) -> Path:
    return Path(export_model(base=str(base), adapter=str(adapter), output=str(output), device="cpu", **kwargs))


@pytest.fixture(scope="module")
def merged_dir(tiny_chat_llama_dir, chat_adapter, tmp_path_factory) -> Path:
    return export(tiny_chat_llama_dir, chat_adapter, tmp_path_factory.mktemp("hf") / "merged")


@pytest.fixture(scope="module")
def gguf_file(tiny_chat_llama_dir, chat_adapter, tmp_path_factory):
    """The merged tiny model as GGUF, one folder per type (each gets its own Modelfile)."""
    made = {}

    def make(gguf_type: str) -> Path:
        if gguf_type not in made:
            folder = tmp_path_factory.mktemp(gguf_type)
            made[gguf_type] = export(
                tiny_chat_llama_dir, chat_adapter, folder / "model.gguf", format="gguf", gguf_type=gguf_type
            )
        return made[gguf_type]

    return make


@pytest.fixture(scope="module")
def lora_folder(tiny_chat_llama_dir, chat_adapter, tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("lora")
    export(tiny_chat_llama_dir, chat_adapter, folder / "adapter.gguf", format="gguf-lora")
    return folder


def read_gguf(path: Path) -> tuple[dict, dict]:
    reader = gguf.GGUFReader(path)
    return {name: field.contents() for name, field in reader.fields.items()}, {t.name: t for t in reader.tensors}


# ------------------------------------------------------------------------------------------ round trips
@pytest.mark.parametrize("gguf_type, tol", [("f16", F16_TOL), ("q8_0", Q8_TOL)])
def test_gguf_loads_in_transformers_with_the_merged_model_s_logits_and_tokens(
    gguf_file, merged_dir, tiny_chat_llama_dir, gguf_type, tol
):
    path = gguf_file(gguf_type)
    tokenizer = AutoTokenizer.from_pretrained(merged_dir)
    from_gguf = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    prompt = format_prompt(QUESTION)
    ids = encode_prompt(tokenizer, prompt)
    assert encode_prompt(from_gguf, prompt) == ids
    merged = AutoModelForCausalLM.from_pretrained(merged_dir, dtype=torch.float32).eval()
    model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32).eval()
    expected = logits(merged, ids)
    assert rel_err(logits(model, ids), expected) <= tol
    base = AutoModelForCausalLM.from_pretrained(tiny_chat_llama_dir, dtype=torch.float32).eval()
    assert rel_err(logits(base, ids), expected) > 4 * Q8_TOL  # the adapter is in the file: a real check


def test_metadata_matches_the_config_and_tokenizer(gguf_file, tiny_chat_llama_dir):
    path = gguf_file("q8_0")
    kv, tensors = read_gguf(path)
    config = json.loads((tiny_chat_llama_dir / "config.json").read_text())
    tokenizer = AutoTokenizer.from_pretrained(tiny_chat_llama_dir)
    heads = config["num_attention_heads"]
    expected = {
        "general.architecture": "llama",
        "general.type": "model",
        "general.file_type": int(gguf.LlamaFileType.MOSTLY_Q8_0),
        "llama.context_length": config["max_position_embeddings"],
        "llama.embedding_length": config["hidden_size"],
        "llama.feed_forward_length": config["intermediate_size"],
        "llama.block_count": config["num_hidden_layers"],
        "llama.attention.head_count": heads,
        "llama.attention.head_count_kv": config["num_key_value_heads"],
        "llama.rope.dimension_count": config["hidden_size"] // heads,
        "llama.vocab_size": config["vocab_size"],
        "general.name": tiny_chat_llama_dir.name,  # the model's name, not the command line's spelling of it
        "tokenizer.ggml.model": "gpt2",
        # SmolLM2's tokenizer (the built-in's, from its GGUF) splits digits apart: llama.cpp's "smollm", as its own
        # GGUF says
        "tokenizer.ggml.pre": gguf.GGUFReader(builtin.smollm2_gguf()).fields["tokenizer.ggml.pre"].contents(),
        "tokenizer.ggml.bos_token_id": tokenizer.bos_token_id,
        "tokenizer.ggml.eos_token_id": tokenizer.eos_token_id,
        "tokenizer.ggml.add_bos_token": False,  # SmolLM2's tokenizer adds nothing (LLaMA-2's adds BOS)
    }
    assert {k: kv.get(k) for k in expected} == expected and kv["tokenizer.ggml.pre"] == "smollm"
    rope_theta = config.get("rope_parameters", {}).get("rope_theta", config.get("rope_theta"))
    assert kv["llama.rope.freq_base"] == pytest.approx(rope_theta)
    assert kv["llama.attention.layer_norm_rms_epsilon"] == pytest.approx(config["rms_norm_eps"])
    assert len(kv["tokenizer.ggml.tokens"]) == config["vocab_size"]
    assert kv["tokenizer.ggml.tokens"][tokenizer.eos_token_id] == tokenizer.eos_token
    types = kv["tokenizer.ggml.token_type"]
    assert types[tokenizer.eos_token_id] == gguf.TokenType.CONTROL and types[300] == gguf.TokenType.NORMAL
    # every checkpoint tensor once, norms in f32 and matrices in the chosen type
    assert len(tensors) == 3 + 9 * config["num_hidden_layers"]
    assert tensors["blk.1.ffn_norm.weight"].tensor_type == gguf.GGMLQuantizationType.F32
    assert {t.tensor_type for n, t in tensors.items() if len(t.shape) == 2} == {gguf.GGMLQuantizationType.Q8_0}
    assert list(tensors["blk.0.attn_k.weight"].shape) == [config["hidden_size"], config["hidden_size"] // 2]  # ne


@pytest.mark.parametrize(
    "messages, example",
    [
        ([{"role": "user", "content": QUESTION}], Example(prompt=QUESTION, response="")),
        (
            [{"role": "system", "content": "Answer in French."}, {"role": "user", "content": "Hi"}],
            Example(prompt="Hi", response="", system="Answer in French."),
        ),
        (
            [
                {"role": "user", "content": "2 + 2?"},
                {"role": "assistant", "content": "4"},
                {"role": "user", "content": "And 3 + 3?"},
            ],
            Example(prompt="And 3 + 3?", response="", history=(("2 + 2?", "4"),)),
        ),
    ],
)
def test_the_chat_template_renders_the_prompt_the_model_was_trained_on(gguf_file, messages, example):
    path = gguf_file("f16")
    template = read_gguf(path)[0]["tokenizer.chat_template"]
    expected = render_source(example, "qlora")
    # as transformers runs chat templates (sandboxed, trim_blocks + lstrip_blocks) and as plain Jinja does
    for env in (
        jinja2.sandbox.ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True),
        jinja2.Environment(),
    ):
        assert env.from_string(template).render(messages=messages, add_generation_prompt=True) == expected
    if len(messages) == 1:
        assert expected == format_prompt(QUESTION)
        tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
        assert tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True) == expected


def render(template: str, messages: list[dict]) -> str:
    return jinja2.sandbox.ImmutableSandboxedEnvironment().from_string(template).render(messages=messages)


def test_a_final_answer_follows_training_s_source_and_ends_with_eos(gguf_file, tiny_chat_llama_dir):
    """Chat clients render a placeholder answer as the last message, prompt with the text before it and stop at the
    text after it (node-llama-cpp's chat API does). Before it must be training's source, past turns included; after
    it EOS alone, as training's target ends with EOS: with " " there, every answer stopped at its first space."""
    template = read_gguf(gguf_file("f16"))[0]["tokenizer.chat_template"]
    example = Example(prompt="And 3 + 3?", response="", history=(("2 + 2?", "4"),))
    messages = [
        {"role": "user", "content": "2 + 2?"},
        {"role": "assistant", "content": "4"},
        {"role": "user", "content": "And 3 + 3?"},
        {"role": "assistant", "content": "ANSWER"},
    ]
    before, after = render(template, messages).split("ANSWER")
    assert before == render_source(example, "qlora") and after == "<|im_end|>"
    assert AutoTokenizer.from_pretrained(tiny_chat_llama_dir).eos_token == after


def test_general_name_is_the_model_s_published_name(tmp_path):
    """Not the command line's spelling (it was "builtin:smollm2-135m-instruct"); the tiny folder's case is checked in
    test_metadata_matches_the_config_and_tokenizer."""
    assert export_gguf.model_name("builtin:smollm2-135m-instruct", tmp_path) == "SmolLM2-135M-Instruct"
    snapshot = tmp_path / "models--meta-llama--Llama-2-7b-hf" / "snapshots" / "8cca527"  # the hub cache's layout
    assert export_gguf.model_name("meta-llama/Llama-2-7b-hf", snapshot) == "Llama-2-7b-hf"
    assert export_gguf.model_name(str(snapshot), snapshot) == "Llama-2-7b-hf"
    assert export_gguf.model_name("runs/merged", tmp_path / "merged") == "merged"


def test_chat_template_is_the_tokenizer_s_own_with_template_chat(tiny_chat_llama_dir, chat_adapter, tmp_path):
    path = export(tiny_chat_llama_dir, chat_adapter, tmp_path / "chat.gguf", format="gguf", template="chat")
    assert (
        read_gguf(path)[0]["tokenizer.chat_template"]
        == AutoTokenizer.from_pretrained(tiny_chat_llama_dir).chat_template
    )
    modelfile = (tmp_path / "Modelfile").read_text()
    assert "TEMPLATE" not in modelfile.replace("# TEMPLATE", "") and 'PARAMETER stop "<|im_end|>"' in modelfile


def test_modelfile_is_ready_for_ollama_create(gguf_file, lora_folder):
    lines = (gguf_file("f16").parent / "Modelfile").read_text().splitlines()
    assert "FROM ./model.gguf" in lines
    assert 'PARAMETER stop "<|im_end|>"' in lines and 'PARAMETER stop "### Human:"' in lines
    text = "\n".join(lines)
    template = re.search(r'TEMPLATE """(.*?)"""', text, re.S)[1]
    assert template.startswith("{{ .System }}\n") and "### Human: {{ .Content }} ### Assistant:" in template
    assert re.search(r'SYSTEM """A chat between a curious human', text)
    lora = (lora_folder / "Modelfile").read_text().splitlines()
    assert "FROM ./adapter.base.gguf" in lora and "ADAPTER ./adapter.gguf" in lora
    note = [f"# {line}" for line in ollama.OLLAMA_ADAPTER_NOTE.splitlines()]
    at = lora.index("ADAPTER ./adapter.gguf")  # what newer Ollama releases do with ADAPTER, said right above it
    assert lora[at - len(note) : at] == note and "0.34.1" in note[0] and "--format gguf" in note[1]


# ------------------------------------------------------------------------------------------------- LoRA
def test_gguf_lora_has_llama_cpp_s_layout_and_applies_to_the_base_as_the_merge_does(
    lora_folder, gguf_file, chat_adapter
):
    kv, lora = read_gguf(lora_folder / "adapter.gguf")
    config = json.loads((chat_adapter / "adapter_config.json").read_text())
    assert kv["general.architecture"] == "llama" and kv["general.type"] == "adapter"
    assert kv["adapter.type"] == "lora" and kv["adapter.lora.alpha"] == config["lora_alpha"]
    matrices = ["attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up", "ffn_down"]
    assert set(lora) == {f"blk.{i}.{m}.weight.lora_{ab}" for i in range(2) for m in matrices for ab in "ab"}
    _, base = read_gguf(lora_folder / "adapter.base.gguf")  # the unmerged base, written beside the adapter
    _, merged = read_gguf(gguf_file("f16"))
    r, scale = config["r"], config["lora_alpha"] / config["r"]
    for name, weight in base.items():
        if f"{name}.lora_a" not in lora:
            assert np.array_equal(weight.data, merged[name].data), name  # norms, embedding, head: untouched
            continue
        a, b = lora[f"{name}.lora_a"], lora[f"{name}.lora_b"]
        # llama.cpp's checks (ne order: row length first): a is r × in, b is out × r
        assert a.shape[0] == weight.shape[0] and b.shape[1] == weight.shape[1] and a.shape[1] == b.shape[0] == r
        # llama.cpp computes W x + scale * b (a x): in PyTorch order W + scale * B @ A
        reference = weight.data.astype(np.float32) + scale * (b.data.astype(np.float32) @ a.data.astype(np.float32))
        delta = np.abs(reference - weight.data).max()
        err = np.abs(reference - merged[name].data.astype(np.float32)).max()
        assert err <= 2**-8 * np.abs(reference).max() < delta / 4, name  # bf16 rounding, far below the delta


def test_gguf_lora_with_a_named_base_writes_no_base(tiny_chat_llama_dir, chat_adapter, tmp_path):
    export(tiny_chat_llama_dir, chat_adapter, tmp_path / "a.gguf", format="gguf-lora", base_gguf="smollm2:135m")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["Modelfile", "a.gguf"]
    lines = (tmp_path / "Modelfile").read_text().splitlines()
    assert "FROM smollm2:135m" in lines and "ADAPTER ./a.gguf" in lines


# ------------------------------------------------------------------------------------- streaming, CLI
def test_tensors_are_merged_and_written_one_at_a_time(tiny_chat_llama_dir, chat_adapter, tmp_path, monkeypatch):
    """The writer pulls one merged tensor, writes it, then pulls the next: never the whole model at once."""
    pulled, encoded = [], []
    merged_tensors, encode = export_gguf.merged_tensors, gguf_model._encode

    def counting_merge(*args, **kwargs):
        for item in merged_tensors(*args, **kwargs):
            pulled.append(item[0])
            yield item

    def counting_encode(tensor, planned):
        encoded.append(len(pulled))
        return encode(tensor, planned)

    monkeypatch.setattr(export_gguf, "merged_tensors", counting_merge)
    monkeypatch.setattr(gguf_model, "_encode", counting_encode)
    export(tiny_chat_llama_dir, chat_adapter, tmp_path / "m.gguf", format="gguf")
    assert encoded == list(range(1, len(pulled) + 1)) and len(pulled) == 21


def test_export_through_the_cli(tiny_chat_llama_dir, chat_adapter, tmp_path, capsys):
    from qlora_lightning.cli import main

    args = ["export", "--base", str(tiny_chat_llama_dir), "--adapter", str(chat_adapter), "--device", "cpu"]
    main(args + ["--output", str(tmp_path / "m.gguf"), "--format", "gguf", "--gguf_type", "q4_0"])
    _, tensors = read_gguf(tmp_path / "m.gguf")
    assert tensors["blk.0.ffn_up.weight"].tensor_type == gguf.GGMLQuantizationType.Q4_0
    assert tensors["output.weight"].tensor_type == gguf.GGMLQuantizationType.Q8_0  # the head keeps 8 bits
    with pytest.raises(SystemExit):
        main(args + ["--output", str(tmp_path / "x.gguf"), "--format", "gguf", "--gguf_type", "q5_k"])
    assert "q5_k" in capsys.readouterr().err and not (tmp_path / "x.gguf").exists()
    assert get_args(GGUFType) == tuple(gguf_model.FILE_TYPES)  # the CLI's choices are the types written


# -------------------------------------------------------------------------------------------- bad input
def _edited_copy(src: Path, dst: Path, name: str, **changes) -> Path:
    shutil.copytree(src, dst)
    config = json.loads((dst / name).read_text())
    config.update(changes)
    (dst / name).write_text(json.dumps(config))
    return dst


@pytest.mark.parametrize("format", ["gguf", "gguf-lora"])
def test_bad_input_is_a_clear_error_that_writes_nothing(tiny_chat_llama_dir, chat_adapter, tmp_path, format):
    out = tmp_path / "out"
    out.mkdir()

    def refused(error, match, *, base=tiny_chat_llama_dir, adapter=chat_adapter, output=out / "m.gguf", **kwargs):
        with pytest.raises(error, match=match):
            export(base, adapter, output, format=format, **kwargs)
        assert not list(out.iterdir())  # no file under a final name, no temporary, no Modelfile

    other_base = _edited_copy(
        chat_adapter, tmp_path / "other_base", "adapter_config.json", base_model_name_or_path="org/llama-7b"
    )
    refused(ValueError, "trained on 'org/llama-7b'", adapter=other_base)
    neox = _edited_copy(tiny_chat_llama_dir, tmp_path / "neox", "config.json", architectures=["GPTNeoXForCausalLM"])
    refused(
        ValueError,
        r"'GPTNeoXForCausalLM' cannot be exported to GGUF; supported: LlamaForCausalLM \(Llama\), Mistral",
        base=neox,
        allow_other_base=True,
    )
    refused(ValueError, "gguf_type 'q5_k' is not one a GGUF (model|LoRA) is written in", gguf_type="q5_k")
    no_tokenizer = shutil.copytree(tiny_chat_llama_dir, tmp_path / "no_tokenizer")
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        (no_tokenizer / name).unlink()
    refused(ValueError, "cannot load the tokenizer of '.*no_tokenizer'", base=no_tokenizer, allow_other_base=True)
    refused(ValueError, "unknown template 'alpaca'; the GGUF export writes 'qlora' or 'chat'", template="alpaca")
    refused(FileNotFoundError, "the folder .*missing does not exist", output=out / "missing" / "m.gguf")
    assert not (out / "missing").exists()
    (tmp_path / "narrow").mkdir()
    narrow = make_narrow_llama(tmp_path / "narrow", tiny_chat_llama_dir)
    refused(
        ValueError, r"down_proj.weight has shape \(32, 64\) but the adapter's B @ A", base=narrow, allow_other_base=True
    )
    if format == "gguf-lora":
        refused(
            ValueError,
            "gguf_type 'q8_0' is not one a GGUF LoRA is written in; choose one of f16, bf16",
            gguf_type="q8_0",
        )


def make_narrow_llama(path: Path, like: Path) -> Path:
    """A Llama with the tiny model's module names and tokenizer but half its width (an adapter's shapes differ)."""
    from qlora_testing import make_tiny_llama

    make_tiny_llama(
        path, hidden=32, intermediate=64, vocab=json.loads((like / "config.json").read_text())["vocab_size"]
    )
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copyfile(like / name, path / name)
    return path


def test_existing_files_are_kept_unless_overwrite(gguf_file, tiny_chat_llama_dir, chat_adapter):
    path = gguf_file("f16")
    before = path.read_bytes()
    with pytest.raises(FileExistsError, match="exists; choose another output or pass overwrite"):
        export(tiny_chat_llama_dir, chat_adapter, path, format="gguf", gguf_type="bf16")
    assert path.read_bytes() == before


def test_a_failure_while_writing_leaves_no_file(tiny_chat_llama_dir, chat_adapter, tmp_path, monkeypatch):
    """What a kill or a full disk mid-export leaves: no file under the final name, no temporary, no Modelfile."""
    encode, calls = gguf_model._encode, []

    def failing(tensor, planned):
        calls.append(1)
        if len(calls) == 5:
            raise OSError(28, "No space left on device")
        return encode(tensor, planned)

    monkeypatch.setattr(gguf_model, "_encode", failing)
    with pytest.raises(WriteError, match=r"cannot write .*m\.gguf: .*No space left.*nothing was written"):
        export(tiny_chat_llama_dir, chat_adapter, tmp_path / "m.gguf", format="gguf")
    assert not list(tmp_path.iterdir())


# ------------------------------------------------------------------- LLaMA-2's kind of tokenizer ("llama")
def llama2_style_tokenizer():
    """A small tokenizer laid out as LLaMA-2's tokenizer.json is: BPE with byte fallback over "▁"-marked words,
    <unk> <s> </s> then the 256 byte tokens <0x00>…<0xFF> first, BOS added to every text. Its merges are learned
    here (the `tokenizers` trainer, a second) since the real one is not on this machine."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    from qlora_lightning.data.templates import QLORA_SYSTEM

    learner = Tokenizer(models.BPE())
    learner.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="first")
    texts = [QLORA_SYSTEM, format_prompt(QUESTION) + " 139", "The quick brown fox jumps over the lazy dog."] * 20
    learner.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=400, show_progress=False))
    learned = json.loads(learner.to_str())["model"]
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2} | {f"<0x{b:02X}>": 3 + b for b in range(256)}
    for token in sorted(learned["vocab"], key=learned["vocab"].get):
        vocab.setdefault(token, len(vocab))
    merges = [tuple(m) for m in learned["merges"]]
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, byte_fallback=True, unk_token="<unk>", fuse_unk=True))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="first", split=False)
    tok.decoder = decoders.Sequence(
        [decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(" ", 1, 0)]
    )
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>")


#: Texts whose ids must survive the export: the prompt, bytes outside the vocabulary, digits, tabs, newlines.
SAMPLES = [format_prompt(QUESTION), "naïve café 😀 ok", "Numbers 0123456789", "tabs\tand\nnew lines"]


@pytest.fixture(scope="module")
def llama2_style_export(tmp_path_factory):
    """A tiny Llama with `llama2_style_tokenizer`, a random adapter, and its f16 GGUF."""
    from qlora_testing import make_tiny_llama

    root = tmp_path_factory.mktemp("llama2_style")
    base = make_tiny_llama(root / "base", tokenizer=llama2_style_tokenizer())
    adapter = random_adapter(base, root / "adapter")
    (root / "gguf").mkdir()
    merged = export(base, adapter, root / "merged")
    return base, merged, export(base, adapter, root / "gguf" / "model.gguf", format="gguf")


def test_a_llama2_style_tokenizer_is_written_as_llama_cpp_s_sentencepiece_kind(llama2_style_export):
    base, merged, path = llama2_style_export
    kv, _ = read_gguf(path)
    assert kv["tokenizer.ggml.model"] == "llama" and "tokenizer.ggml.pre" not in kv
    assert kv["tokenizer.ggml.add_bos_token"] is True and kv["tokenizer.ggml.add_space_prefix"] is True
    types, scores = kv["tokenizer.ggml.token_type"], kv["tokenizer.ggml.scores"]
    assert types[:4] == [gguf.TokenType.UNKNOWN, gguf.TokenType.CONTROL, gguf.TokenType.CONTROL, gguf.TokenType.BYTE]
    assert scores[-1] < scores[-2] < 0  # later merges rank lower: llama.cpp merges by score
    tokenizer = AutoTokenizer.from_pretrained(base)
    from_gguf = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    for text in SAMPLES:
        assert from_gguf(text)["input_ids"] == tokenizer(text)["input_ids"], text
    ids = encode_prompt(tokenizer, SAMPLES[0])
    assert ids[0] == tokenizer.bos_token_id
    expected = logits(AutoModelForCausalLM.from_pretrained(merged, dtype=torch.float32).eval(), ids)
    model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32).eval()
    assert rel_err(logits(model, ids), expected) <= F16_TOL


def with_tokenizer_json(folder: Path, dst: Path, **changes) -> Path:
    """A copy of a model folder whose tokenizer.json has `changes` at its top level (normalizer, pre_tokenizer…)."""
    shutil.copytree(folder, dst)
    tokenizer_json = json.loads((dst / "tokenizer.json").read_text())
    tokenizer_json.update(changes)
    (dst / "tokenizer.json").write_text(json.dumps(tokenizer_json))
    return dst


DIGITS_THEN_GPT2 = {
    "type": "Sequence",
    "pretokenizers": [
        {"type": "Digits", "individual_digits": True},
        {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True},
    ],
}


def test_tokenizer_kinds_the_export_recognises_and_refuses(tiny_chat_llama_dir, llama2_style_export, tmp_path):
    n_vocab = json.loads((tiny_chat_llama_dir / "config.json").read_text())["vocab_size"]
    gpt2 = with_tokenizer_json(
        tiny_chat_llama_dir, tmp_path / "gpt2", pre_tokenizer=DIGITS_THEN_GPT2["pretokenizers"][1]
    )
    assert gguf_vocab.vocabulary(gpt2, n_vocab).pre == "gpt-2"
    published = with_tokenizer_json(tiny_chat_llama_dir, tmp_path / "published", pre_tokenizer=DIGITS_THEN_GPT2)
    assert gguf_vocab.vocabulary(published, n_vocab).pre == "smollm"  # SmolLM2's tokenizer.json on the hub
    split = {"type": "Split", "pattern": {"Regex": "\\p{N}{1,3}"}, "behavior": "Isolated", "invert": False}
    llama3 = {"type": "Sequence", "pretokenizers": [split, {"type": "ByteLevel", "use_regex": False}]}
    other = with_tokenizer_json(tiny_chat_llama_dir, tmp_path / "llama3", pre_tokenizer=llama3)
    with pytest.raises(ValueError, match="tokenizer.json: this byte-level tokenizer's .* is not one the GGUF export"):
        gguf_vocab.vocabulary(other, n_vocab)
    with pytest.raises(ValueError, match="token id 49151 is beyond the model's 1000 embedding rows"):
        gguf_vocab.vocabulary(tiny_chat_llama_dir, 1000)
    base = llama2_style_export[0]
    n_vocab = json.loads((base / "config.json").read_text())["vocab_size"]
    legacy = {  # LLaMA-2's own tokenizer.json: "▁" prepended and spaces replaced by a normalizer
        "type": "Sequence",
        "normalizers": [
            {"type": "Prepend", "prepend": "\u2581"},
            {"type": "Replace", "pattern": {"String": " "}, "content": "\u2581"},
        ],
    }
    assert gguf_vocab.vocabulary(
        with_tokenizer_json(base, tmp_path / "legacy", normalizer=legacy, pre_tokenizer=None), n_vocab
    ).add_space_prefix
    never = {"type": "Metaspace", "replacement": "\u2581", "prepend_scheme": "never", "split": False}
    assert not gguf_vocab.vocabulary(
        with_tokenizer_json(base, tmp_path / "never", pre_tokenizer=never), n_vocab
    ).add_space_prefix


# ---------------------------------------------------------------------------------------- real SmolLM2
def random_adapter(base: Path, folder: Path, *, r: int = 8, alpha: float = 16.0, scale: float = 0.03) -> Path:
    """A PEFT adapter on every linear of the decoder layers of `base`, with random A and B (as after training)."""
    from safetensors import safe_open

    g = torch.Generator().manual_seed(0)
    state = {}
    for shard in safetensors_shards(base):
        with safe_open(str(shard), framework="pt") as f:
            for key in sorted(f.keys()):
                if re.search(r"layers\.\d+\.(self_attn|mlp)\.\w+_proj\.weight$", key):
                    out_features, in_features = f.get_slice(key).get_shape()
                    module = key.removesuffix(".weight")
                    state[f"{module}.lora_A"] = (torch.randn(r, in_features, generator=g) * scale).to(torch.bfloat16)
                    state[f"{module}.lora_B"] = (torch.randn(out_features, r, generator=g) * scale).to(torch.bfloat16)
    config = {
        "peft_type": "LORA",
        "base_model_name_or_path": str(base),
        "r": r,
        "lora_alpha": alpha,
        "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
    }
    return save_adapter(folder, to_peft_keys(state), config, base_fingerprint=weights_fingerprint(base))


@pytest.fixture(scope="module")
def smollm2_export(smollm2_dir, tmp_path_factory):
    """SmolLM2-135M-Instruct with a random adapter: the merged HF folder and its f16 / q8_0 GGUF files."""
    root = tmp_path_factory.mktemp("smollm2_gguf")
    adapter = random_adapter(Path(smollm2_dir), root / "adapter")
    files = {"base": Path(smollm2_dir), "hf": export(smollm2_dir, adapter, root / "merged")}
    for gguf_type in ("f16", "q8_0"):
        (root / gguf_type).mkdir()
        files[gguf_type] = export(
            smollm2_dir, adapter, root / gguf_type / "model.gguf", format="gguf", gguf_type=gguf_type
        )
    return files


@pytest.mark.slow
def test_real_smollm2_round_trip(smollm2_export):
    merged = smollm2_export["hf"]
    tokenizer = AutoTokenizer.from_pretrained(merged)
    ids = encode_prompt(tokenizer, format_prompt(QUESTION))
    expected = logits(AutoModelForCausalLM.from_pretrained(merged, dtype=torch.float32).eval(), ids)
    base = AutoModelForCausalLM.from_pretrained(smollm2_export["base"], dtype=torch.float32).eval()
    assert rel_err(logits(base, ids), expected) > 4 * Q8_TOL  # measured 27 %: the adapter is in the files
    del base
    for gguf_type, tol in (("f16", F16_TOL), ("q8_0", Q8_TOL)):
        path = smollm2_export[gguf_type]
        assert (
            encode_prompt(AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name), format_prompt(QUESTION))
            == ids
        )
        model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32).eval()
        got = logits(model, ids)
        assert rel_err(got, expected) <= tol, gguf_type
        assert (got.argmax(-1) == expected.argmax(-1)).float().mean() >= 0.95  # the same next tokens (1.0 measured)
        del model


# ------------------------------------------------------------------------------------ llama.cpp, opt-in
llama_cpp = pytest.mark.skipif(
    os.environ.get("QLORA_LIGHTNING_LLAMA_CPP") != "1",
    reason="opt-in: set QLORA_LIGHTNING_LLAMA_CPP=1 with llama-cpp-py-sync installed (llama.cpp's CPU wheel)",
)


class LlamaCpp:
    """llama.cpp through `llama_cpp_py_sync` (the one PyPI wheel of llama.cpp that needs no compiler): the
    logits of a prompt's last token, and greedy generation, optionally with a LoRA applied."""

    def __init__(self, model: Path, lora: Path | None = None):
        from llama_cpp_py_sync import Llama

        self.llm = Llama(str(model), n_ctx=512, n_threads=2, seed=0, verbose=False)
        self.lib, self.ffi = self.llm._lib, self.llm._ffi
        if lora is not None:
            adapter = self.lib.llama_adapter_lora_init(self.llm._model, str(lora).encode())
            assert adapter != self.ffi.NULL, f"llama.cpp refused {lora}"
            adapters = self.ffi.new("struct llama_adapter_lora *[1]", [adapter])
            assert self.lib.llama_set_adapters_lora(self.llm._ctx, adapters, 1, self.ffi.new("float[1]", [1.0])) == 0

    def tokenize(self, text: str) -> list[int]:
        return self.llm.tokenize(text, add_special=True, parse_special=False)

    def last_logits(self, ids: list[int]) -> torch.Tensor:
        self.llm._clear_context_state()
        self.llm._eval_tokens(ids, 0)
        n = self.llm.n_vocab
        raw = self.ffi.buffer(self.lib.llama_get_logits_ith(self.llm._ctx, -1), 4 * n)
        return torch.from_numpy(np.frombuffer(raw, dtype=np.float32).copy())

    def greedy(self, ids: list[int], n: int) -> list[int]:
        out = []
        for _ in range(n):
            out.append(int(self.last_logits(ids + out).argmax()))
        return out


@llama_cpp
def test_llama_cpp_runs_the_tiny_export_and_applies_the_lora(gguf_file, lora_folder, merged_dir):
    tokenizer = AutoTokenizer.from_pretrained(merged_dir)
    prompt = format_prompt(QUESTION)
    ids = encode_prompt(tokenizer, prompt)
    expected = logits(AutoModelForCausalLM.from_pretrained(merged_dir, dtype=torch.float32).eval(), ids)[-1]
    merged = LlamaCpp(gguf_file("f16"))
    assert merged.tokenize(prompt) == ids
    for text in SAMPLES:
        assert merged.tokenize(text) == tokenizer(text)["input_ids"], text
    assert rel_err(merged.last_logits(ids), expected) < 2e-3  # measured 4e-4: llama.cpp rounds activations to f16
    lora = LlamaCpp(lora_folder / "adapter.base.gguf", lora_folder / "adapter.gguf")
    assert rel_err(lora.last_logits(ids), expected) < 1e-2  # measured 2.9e-3; without the adapter 57 %


@llama_cpp
def test_llama_cpp_splits_digits_as_smollm2_s_published_tokenizer_does(tiny_chat_llama_dir, chat_adapter, tmp_path):
    published = with_tokenizer_json(tiny_chat_llama_dir, tmp_path / "published", pre_tokenizer=DIGITS_THEN_GPT2)
    path = export(published, chat_adapter, tmp_path / "m.gguf", format="gguf", allow_other_base=True)
    tokenizer, llm = AutoTokenizer.from_pretrained(published), LlamaCpp(path)
    for text in SAMPLES:
        assert llm.tokenize(text) == tokenizer(text)["input_ids"], text
    assert len(tokenizer("0123456789")["input_ids"]) == 10  # the digits really are split one by one


@llama_cpp
def test_llama_cpp_tokenizes_as_a_llama2_style_tokenizer_does(llama2_style_export):
    """(Text starting with a space differs: llama.cpp always writes one "▁" first, transformers' Metaspace not
    before a space; LLaMA-2's own tokenizer.json, which prepends by a normalizer, agrees with llama.cpp.)"""
    base, merged, path = llama2_style_export
    tokenizer, llm = AutoTokenizer.from_pretrained(base), LlamaCpp(path)
    for text in SAMPLES:
        assert llm.tokenize(text) == tokenizer(text)["input_ids"], text
    ids = encode_prompt(tokenizer, SAMPLES[0])
    expected = logits(AutoModelForCausalLM.from_pretrained(merged, dtype=torch.float32).eval(), ids)[-1]
    assert rel_err(llm.last_logits(ids), expected) < 2e-3


@llama_cpp
@pytest.mark.slow
def test_llama_cpp_generates_what_transformers_generates_from_smollm2(smollm2_export):
    merged = smollm2_export["hf"]
    tokenizer = AutoTokenizer.from_pretrained(merged)
    ids = encode_prompt(tokenizer, format_prompt("What is the capital of France?"))
    model = AutoModelForCausalLM.from_pretrained(merged, dtype=torch.float32).eval()
    with torch.no_grad():
        reference = model.generate(torch.tensor([ids]), max_new_tokens=8, do_sample=False)[0, len(ids) :].tolist()
    llm = LlamaCpp(smollm2_export["f16"])
    assert llm.tokenize(format_prompt("What is the capital of France?")) == ids
    assert llm.greedy(ids, 8) == reference


node_llama_cpp = pytest.mark.skipif(
    not os.environ.get("QLORA_LIGHTNING_NODE_LLAMA_CPP"),
    reason="opt-in: set QLORA_LIGHTNING_NODE_LLAMA_CPP to a folder where `npm install node-llama-cpp` ran",
)

#: One chat turn through node-llama-cpp's chat API, which takes the GGUF's chat template and derives its stop
#: strings from it (argv: the folder where node-llama-cpp is installed, the model, the question, max tokens). It
#: prints the template's name, the stop triggers and prompt ids the chat derives, and the answer. An empty system
#: prompt: the session's own default would replace the template's system sentence.
NODE_CHAT = """
import {createRequire} from "node:module";
import {pathToFileURL} from "node:url";
const [folder, modelPath, question, maxTokens] = process.argv.slice(2);
const entry = createRequire(folder + "/").resolve("node-llama-cpp");
const {getLlama, LlamaChatSession} = await import(pathToFileURL(entry).href);
const llama = await getLlama({gpu: false, build: "never"});
const model = await llama.loadModel({modelPath});
const context = await model.createContext({contextSize: 512, threads: 1});
const session = new LlamaChatSession({contextSequence: context.getSequence(), systemPrompt: ""});
const wrapper = session.chatWrapper;
const state = wrapper.generateContextState({chatHistory: [{type: "user", text: question}, {type: "model", response: []}]});
const answer = await session.prompt(question, {maxTokens: Number(maxTokens)});
console.log(JSON.stringify({
    wrapper: wrapper.wrapperName,
    stops: state.stopGenerationTriggers.map((t) => t.toJSON()),
    prompt: Array.from(state.contextText.tokenize(model.tokenizer)),
    answer,
}));
"""


@node_llama_cpp
@pytest.mark.slow
def test_node_llama_cpp_chat_stops_at_eos_not_at_the_first_space(smollm2_export, tmp_path):
    """node-llama-cpp's chat stops at what the template writes after an answer: with " " there it answered "\\nThe"
    and stopped. Now its stops are EOS alone, its prompt is training's text, and its answer runs on past spaces.
    (Its prompt ids are not training's: it tokenizes the template's text and the question apart, " " then "What"
    where training has " What", which is why its answer is not compared with transformers' token by token.)"""
    script, question = tmp_path / "chat.mjs", "What is the capital of France?"
    script.write_text(NODE_CHAT)
    folder = os.environ["QLORA_LIGHTNING_NODE_LLAMA_CPP"]
    done = subprocess.run(
        ["node", str(script), folder, str(smollm2_export["f16"]), question, "16"],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    reply = json.loads(done.stdout.strip().splitlines()[-1])
    assert reply["wrapper"] == "JinjaTemplate"  # the GGUF's own template, not a built-in guess
    eos = [[{"type": "specialToken", "value": "EOS"}], [{"type": "specialTokensText", "value": "<|im_end|>"}]]
    assert reply["stops"] == eos
    assert AutoTokenizer.from_pretrained(smollm2_export["hf"]).decode(reply["prompt"]) == format_prompt(question)
    assert len(reply["answer"].split()) > 3 and "<|im_end|>" not in reply["answer"], reply["answer"]
