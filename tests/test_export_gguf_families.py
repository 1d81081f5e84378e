"""GGUF export of every family llama.cpp runs (Llama 3, Mistral, Qwen 2.5, Qwen 3, Gemma 2, Gemma 3, Phi-3), on tiny
random models: the merged f16 file read back by transformers with the merged folder's logits, each family's metadata
and weight conventions, the LoRA adapter's tensor names and values, settings llama.cpp cannot reproduce refused, and
(opt-in) llama.cpp itself through node-llama-cpp. Skipped as a whole where the `gguf` package is missing."""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
from pathlib import Path
from typing import NamedTuple

import numpy as np
import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

gguf = pytest.importorskip("gguf", reason="the GGUF export needs the `gguf` package (pip install gguf)")

from family_models import FAMILY_SPECS  # noqa: E402
from test_export_gguf import F16_TOL, Q8_TOL, export, logits, random_adapter, read_gguf, rel_err  # noqa: E402


@pytest.fixture(scope="module", autouse=True)
def gguf_files_parsed_once():
    """Each GGUF file is parsed once in this module, by one shared `gguf.GGUFReader` (read-only, memory-mapped) that
    the tests and transformers' loader (which imports `GGUFReader` when it loads) all get. transformers parses a
    file again for its tokenizer, its config and its weights, and gguf's reader takes about 20 s for a 262k-entry
    vocabulary on 2 cores: Gemma's read-back alone took 68 s. The same bytes give the same parse, so nothing checked
    changes; a file rewritten in between (another size or time) is parsed anew."""
    readers: dict[tuple, object] = {}
    parse = gguf.GGUFReader

    def shared_reader(path, mode="r"):
        stat = os.stat(path)
        key = (os.path.realpath(path), stat.st_size, stat.st_mtime_ns, mode)
        if key not in readers:
            readers[key] = parse(path, mode)
        return readers[key]

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(gguf, "GGUFReader", shared_reader)
        yield
    readers.clear()


#: Text whose ids and logits are compared: words, digits (split differently by each family), punctuation, accents.
TEXT = "Hello world, this is a test of 12345 tokens: café, naïve."

#: llama.cpp's architecture for each family (llama.cpp runs Llama 3 and Mistral with its LLaMA graph).
ARCH = {
    "llama3": "llama",
    "mistral": "llama",
    "qwen2": "qwen2",
    "qwen3": "qwen3",
    "gemma2": "gemma2",
    "gemma3": "gemma3",
    "phi3": "phi3",
}
FAMILIES = list(ARCH)
#: llama.cpp's pre-tokenizer of the byte-level BPE families (the others are SentencePiece-style, "llama" kind).
PRE = {"llama3": "llama-bpe", "qwen2": "qwen2", "qwen3": "qwen2"}
#: The matrices an adapter on every linear layer adapts, by their GGUF names: Phi-3's are fused (q, k, v in
#: `attn_qkv`; gate and up in `ffn_up`), as llama.cpp keeps them.
ADAPTED = {
    family: ("attn_qkv", "attn_output", "ffn_up", "ffn_down")
    if family == "phi3"
    else ("attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up", "ffn_down")
    for family in FAMILIES
}


#: Gemma 3 as llama.cpp runs it: every sixth layer global (its fixed pattern), so both tiny layers are local.
LLAMA_CPP_GEMMA3 = {"layer_types": ["sliding_attention", "sliding_attention"]}


def _edited(folder: Path, dst: Path, **changes) -> Path:
    """A copy of a model folder whose config.json has `changes`."""
    shutil.copytree(folder, dst)
    config = json.loads((dst / "config.json").read_text())
    config.update(changes)
    (dst / "config.json").write_text(json.dumps(config))
    return dst


def family_base(family_model_dir, family: str, root: Path) -> Path:
    """`family`'s tiny model with its real tokenizer (tests/family_models.py); Gemma 3's in llama.cpp's layer
    pattern (its tiny model alternates local and global layers, which llama.cpp's Gemma 3 graph cannot)."""
    folder = family_model_dir(family)
    return _edited(folder, root / folder.name, **LLAMA_CPP_GEMMA3) if family == "gemma3" else folder


class Exported(NamedTuple):
    family: str
    base: Path
    adapter: Path
    merged: Path
    model: Path
    lora: Path


#: Families whose real vocabularies (128k to 262k tokens) make one export + read-back take minutes on 2 cores
#: (measured on a loaded machine: 3-6 min a family, writing and parsing the vocabulary and merges in Python): in the
#: slow tier. Mistral's and Phi-3's 32k vocabularies keep the default tier's round trips under a minute a family.
LARGE_VOCABULARY = {"llama3", "qwen2", "qwen3", "gemma2", "gemma3"}
FAMILY_PARAMS = [pytest.param(f, marks=pytest.mark.slow) if f in LARGE_VOCABULARY else f for f in FAMILIES]


@pytest.fixture(scope="module", params=FAMILY_PARAMS)
def exported(request, family_model_dir, tmp_path_factory) -> Exported:
    """One family's tiny model, a random adapter on every linear layer, the merged HF folder, the merged f16 GGUF
    (chat template: the tokenizer's own) and the adapter as a GGUF LoRA (its base named, not written)."""
    family = request.param
    root = tmp_path_factory.mktemp(family)
    base = family_base(family_model_dir, family, root)
    adapter = random_adapter(base, root / "adapter")
    merged = export(base, adapter, root / "merged")
    for folder in ("gguf", "lora"):
        (root / folder).mkdir()
    model = export(base, adapter, root / "gguf" / "model.gguf", format="gguf", template="chat")
    lora = export(base, adapter, root / "lora" / "adapter.gguf", format="gguf-lora", base_gguf="base.gguf")
    return Exported(family, base, adapter, merged, model, lora)


# ------------------------------------------------------------------------------------------ round trip
#: Settings of each family that transformers' GGUF loader does not read back (it takes its config class's default
#: instead); there the test gives it the folder's config, and test_metadata_and_conventions_are_the_family_s checks
#: that the file states them as llama.cpp reads them.
NOT_READ_BACK = {
    "llama3": "the llama3 RoPE scaling (llama.cpp's rope_freqs tensor)",
    "qwen3": "head_dim (its qwen3 mapping reads no attention.key_length; Qwen3Config's default is 128)",
    "gemma2": "query_pre_attn_scalar (Gemma2Config's default is 256)",
    "gemma3": "query_pre_attn_scalar and layer_types (Gemma3TextConfig's defaults are 256 and 5 local : 1 global)",
}


def test_f16_gguf_reads_back_in_transformers_with_the_merged_model_s_logits(exported):
    """transformers reads every family's file with its own GGUF loader, undoing llama.cpp's conventions (Q/K rows,
    Gemma's w + 1): the tokenizer gives the folder's ids and the model the merged folder's logits."""
    path = exported.model
    tokenizer = AutoTokenizer.from_pretrained(exported.merged)
    ids = tokenizer(TEXT)["input_ids"]
    assert AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)(TEXT)["input_ids"] == ids
    expected = logits(AutoModelForCausalLM.from_pretrained(exported.merged, dtype=torch.float32).eval(), ids)
    config = {"config": AutoConfig.from_pretrained(exported.merged)} if exported.family in NOT_READ_BACK else {}
    model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32, **config)
    assert rel_err(logits(model.eval(), ids), expected) <= F16_TOL
    base = AutoModelForCausalLM.from_pretrained(exported.base, dtype=torch.float32).eval()
    assert rel_err(logits(base, ids), expected) > 4 * Q8_TOL  # the adapter is in the file: a real check


# ------------------------------------------------------------------------------------- family conventions
def llama3_rope_factors(config) -> list[float]:
    """llama.cpp's `rope_freqs` for a "llama3" RoPE scaling, as its convert_hf_to_gguf.py computes them
    (`LlamaModel.generate_extra_tensors`): 1 for high frequencies, `factor` for low ones, smoothed between."""
    rope = config.rope_parameters
    dim = config.head_dim
    base, factor = rope["rope_theta"], rope["factor"]
    low, high, old = rope["low_freq_factor"], rope["high_freq_factor"], rope["original_max_position_embeddings"]
    factors = []
    for i in range(0, dim, 2):
        wavelen = 2 * math.pi * base ** (i / dim)
        if wavelen < old / high:
            factors.append(1.0)
        elif wavelen > old / low:
            factors.append(factor)
        else:
            smooth = (old / wavelen - low) / (high - low)
            factors.append(1 / ((1 - smooth) / factor + smooth))
    return factors


def family_keys(family: str, config) -> dict:
    """The keys beyond the common ones that llama.cpp's converter writes for `family` (convert_hf_to_gguf.py)."""
    arch = ARCH[family]
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    keys = {}
    if family == "gemma2":
        keys[f"{arch}.attn_logit_softcapping"] = config.attn_logit_softcapping
        keys[f"{arch}.final_logit_softcapping"] = config.final_logit_softcapping
    if family.startswith("gemma"):
        keys[f"{arch}.attention.sliding_window"] = config.sliding_window
    if family == "phi3":
        keys[f"{arch}.attention.sliding_window"] = config.sliding_window or 0
        keys[f"{arch}.rope.scaling.original_context_length"] = config.original_max_position_embeddings
    if head_dim != config.hidden_size // config.num_attention_heads or family.startswith("gemma"):
        keys |= {f"{arch}.attention.key_length": head_dim, f"{arch}.attention.value_length": head_dim}
    return keys


def read_keys(path: Path, keys) -> tuple[dict, dict]:
    """(the values of `keys` that the file has, its tensors by name): `read_gguf` without decoding the vocabulary."""
    reader = gguf.GGUFReader(path)
    fields = {key: reader.fields[key].contents() for key in keys if key in reader.fields}
    return fields, {tensor.name: tensor for tensor in reader.tensors}


def test_metadata_and_conventions_are_the_family_s(exported):
    config = AutoConfig.from_pretrained(exported.base)
    tokenizer = AutoTokenizer.from_pretrained(exported.base)
    end_of_turn = tokenizer.convert_tokens_to_ids(FAMILY_SPECS[exported.family].end_of_turn)
    arch = ARCH[exported.family]
    expected = {
        "general.architecture": arch,
        f"{arch}.block_count": config.num_hidden_layers,
        f"{arch}.embedding_length": config.hidden_size,
        f"{arch}.feed_forward_length": config.intermediate_size,
        f"{arch}.attention.head_count": config.num_attention_heads,
        f"{arch}.attention.head_count_kv": config.num_key_value_heads,
        f"{arch}.context_length": config.max_position_embeddings,
        "tokenizer.chat_template": tokenizer.chat_template,
        "tokenizer.ggml.model": "gpt2" if exported.family in PRE else "llama",
        "tokenizer.ggml.pre": PRE.get(exported.family),
        "tokenizer.ggml.eos_token_id": tokenizer.eos_token_id,
        "tokenizer.ggml.eot_token_id": None if end_of_turn == tokenizer.eos_token_id else end_of_turn,
        "tokenizer.ggml.add_bos_token": tokenizer("a")["input_ids"][0] == tokenizer.bos_token_id,
    } | family_keys(exported.family, config)
    kv, tensors = read_keys(exported.model, [*expected, f"{arch}.rope.freq_base"])
    assert {key: kv.get(key) for key in expected} == expected
    # Ollama stops at EOS and at the family's end of turn
    stops = [
        line for line in (exported.model.parent / "Modelfile").read_text().splitlines() if "PARAMETER stop" in line
    ]
    turn = {FAMILY_SPECS[exported.family].end_of_turn, tokenizer.eos_token}
    assert sorted(stops) == sorted(f"PARAMETER stop {json.dumps(token)}" for token in turn)
    theta = config.rope_parameters.get("full_attention", config.rope_parameters)["rope_theta"]
    assert kv[f"{arch}.rope.freq_base"] == pytest.approx(theta)
    # a tied head is the embedding: llama.cpp then has no output.weight
    assert ("output.weight" in tensors) == (not config.tie_word_embeddings)
    first = {name.removeprefix("blk.0.") for name in tensors if name.startswith("blk.0.")}
    if exported.family == "phi3":  # fused projections stay fused
        assert {"attn_qkv.weight", "ffn_up.weight"} <= first and "ffn_gate.weight" not in first
        assert list(tensors["blk.0.ffn_up.weight"].shape) == [config.hidden_size, 2 * config.intermediate_size]
    if exported.family == "qwen2":  # attention biases
        assert {"attn_q.bias", "attn_k.bias", "attn_v.bias"} <= first
    if exported.family in ("qwen3", "gemma3"):
        assert {"attn_q_norm.weight", "attn_k_norm.weight"} <= first
    if exported.family.startswith("gemma"):  # Gemma's RMSNorm scales by 1 + w; llama.cpp's by w
        from qlora_lightning.checkpoint_files import CheckpointTensors

        norm = CheckpointTensors(exported.merged)("model.layers.0.input_layernorm.weight").float().numpy()
        assert np.allclose(tensors["blk.0.attn_norm.weight"].data, norm + 1, atol=1e-6)
    if exported.family == "llama3":
        assert np.allclose(tensors["rope_freqs.weight"].data, llama3_rope_factors(config), rtol=1e-5)
    else:
        assert "rope_freqs.weight" not in tensors


# ------------------------------------------------------------------------------------------------- LoRA
def converter_permute(weight: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's convert_hf_to_gguf.py `LlamaModel.permute`: Q/K rows from Hugging Face's RoPE pairing to its
    LLaMA graph's (what the adapter's B must follow on llama-architecture models)."""
    return (
        weight.reshape(n_head, 2, weight.shape[0] // n_head // 2, *weight.shape[1:])
        .swapaxes(1, 2)
        .reshape(weight.shape)
    )


def test_gguf_lora_has_the_family_s_tensor_names_and_applies_as_the_merge_does(exported):
    """The adapter's tensors are named after the family's base tensors (llama.cpp matches them by name and checks
    a is r x in, b out x r), and base + alpha/r * b @ a is the merged file's matrix, in llama.cpp's row order."""
    from qlora_lightning.checkpoint_files import CheckpointTensors

    kv, lora = read_gguf(exported.lora)
    _, model = read_keys(exported.model, [])
    adapter_config = json.loads((exported.adapter / "adapter_config.json").read_text())
    config = AutoConfig.from_pretrained(exported.base)
    arch, r = ARCH[exported.family], adapter_config["r"]
    assert kv["general.architecture"] == arch and kv["general.type"] == "adapter"
    assert kv["adapter.type"] == "lora" and kv["adapter.lora.alpha"] == adapter_config["lora_alpha"]
    names = {f"blk.{i}.{m}.weight" for i in range(config.num_hidden_layers) for m in ADAPTED[exported.family]}
    assert set(lora) == {f"{name}.lora_{ab}" for name in names for ab in "ab"}
    scale = adapter_config["lora_alpha"] / r
    arch_id = next(a for a, n in gguf.MODEL_ARCH_NAMES.items() if n == arch)
    gguf_names = gguf.TensorNameMap(arch_id, config.num_hidden_layers)  # llama.cpp's names
    checkpoint = CheckpointTensors(exported.base)
    base = {gguf_names.get_name(k, try_suffixes=(".weight", ".bias")): k for k in checkpoint.shapes}
    for name in sorted(names):
        a, b, merged = lora[f"{name}.lora_a"], lora[f"{name}.lora_b"], model[name]
        assert list(a.shape) == [merged.shape[0], r] and list(b.shape) == [r, merged.shape[1]]  # ne order
        weight = checkpoint(base[name]).float().numpy()
        if arch == "llama" and ".attn_q." in name:
            weight = converter_permute(weight, config.num_attention_heads)
        if arch == "llama" and ".attn_k." in name:
            weight = converter_permute(weight, config.num_key_value_heads)
        delta = scale * (b.data.astype(np.float32) @ a.data.astype(np.float32))
        err = np.abs(weight + delta - merged.data.astype(np.float32)).max()
        assert err <= 2**-7 * np.abs(weight + delta).max() < np.abs(delta).max() / 4, name  # bf16 rounding


# ------------------------------------------------------------------------------------------ refusals
REFUSED = [  # (family, config.json changes, the error's words)
    ("gemma2", {"query_pre_attn_scalar": 144}, r"Gemma 2 model cannot be exported to GGUF: query_pre_attn_scalar"),
    ("gemma3", {"layer_types": ["sliding_attention", "full_attention"]}, r"Gemma 3 model .*every sixth layer global"),
    ("gemma2", {"attn_logit_softcapping": None}, r"Gemma 2 model .*always caps attention logits"),
    ("qwen2", {"use_sliding_window": True}, r"Qwen 2 model .*use_sliding_window is true"),
    (
        "phi3",
        {"rope_scaling": {"type": "longrope", "long_factor": [1.0] * 8, "short_factor": [1.0] * 8}},
        r"Phi-3 model cannot be exported to GGUF: RoPE scaling 'longrope' is not one the export writes",
    ),
    (
        "gemma3",
        {"architectures": ["Gemma3ForConditionalGeneration"]},
        r"'Gemma3ForConditionalGeneration' cannot be exported to GGUF; .*export its text model",
    ),
]


@pytest.mark.parametrize("family, changes, match", REFUSED, ids=[f"{f}-{next(iter(c))}" for f, c, _ in REFUSED])
@pytest.mark.parametrize("format", ["gguf", "gguf-lora"])
def test_what_llama_cpp_would_run_differently_is_refused_naming_the_family(
    family, changes, match, format, family_model_dir, tmp_path
):
    base = _edited(family_model_dir(family), tmp_path / "edited", **changes)
    adapter = random_adapter(base, tmp_path / "adapter")
    (tmp_path / "out").mkdir()
    with pytest.raises(ValueError, match=match) as refused:
        export(base, adapter, tmp_path / "out" / "m.gguf", format=format)
    assert "--format hf" in str(refused.value) and not list((tmp_path / "out").iterdir())


# ------------------------------------------------------------------------------------ llama.cpp, opt-in
node_llama_cpp = pytest.mark.skipif(
    not os.environ.get("QLORA_LIGHTNING_NODE_LLAMA_CPP"),
    reason="opt-in: set QLORA_LIGHTNING_NODE_LLAMA_CPP to a folder where `npm install node-llama-cpp` ran",
)

#: The next-token logits llama.cpp computes after a prompt's ids, through node-llama-cpp (argv: the folder where
#: node-llama-cpp is installed, the model, the ids as JSON, a text to tokenize, optionally a LoRA to apply). Prints
#: llama.cpp's ids for the text, whether it puts BOS first, and the logits by token id.
NODE_LOGITS = """
import {createRequire} from "node:module";
import {pathToFileURL} from "node:url";
const [folder, modelPath, idsJson, text, loraPath] = process.argv.slice(2);
const entry = createRequire(folder + "/").resolve("node-llama-cpp");
const {getLlama} = await import(pathToFileURL(entry).href);
const llama = await getLlama({gpu: false, build: "never"});
const model = await llama.loadModel({modelPath});
const lora = loraPath ? {lora: {adapters: [{filePath: loraPath}]}} : {};
const context = await model.createContext({contextSize: 256, threads: 1, ...lora});
const ids = JSON.parse(idsJson);
const input = ids.slice(0, -1).concat([[ids[ids.length - 1], {generateNext: {logits: true}}]]);
const out = await context.getSequence().controlledEvaluate(input);
const logits = [];
for (const [token, value] of out[out.length - 1].next.logits) logits[token] = value;
const bos = model.tokens.shouldPrependBosToken ? [model.tokens.bos] : [];
console.log(JSON.stringify({ids: bos.concat(Array.from(model.tokenize(text))), logits}));
"""


def llama_cpp_logits(model: Path, ids: list[int], folder: Path, lora: Path | None = None) -> tuple[list, torch.Tensor]:
    """(llama.cpp's ids for TEXT, BOS included where it adds one; its next-token logits after `ids`) through
    node-llama-cpp."""
    script = folder / "logits.mjs"
    script.write_text(NODE_LOGITS)
    argv = ["node", str(script), os.environ["QLORA_LIGHTNING_NODE_LLAMA_CPP"], str(model), json.dumps(ids), TEXT]
    done = subprocess.run(argv + ([str(lora)] if lora else []), capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    reply = json.loads(done.stdout.strip().splitlines()[-1])
    return reply["ids"], torch.tensor([math.nan if x is None else x for x in reply["logits"]])


@node_llama_cpp
@pytest.mark.parametrize("family", FAMILY_PARAMS)
def test_llama_cpp_tokenizes_and_computes_as_the_merged_model_and_applies_the_lora(family, family_model_dir, tmp_path):
    """llama.cpp loads each family's f16 file, tokenizes as the folder's tokenizer does (BOS included) and gives the
    merged model's next-token logits (it rounds activations to f16); the LoRA on the unmerged base file gives them
    too."""
    base = family_base(family_model_dir, family, tmp_path)
    adapter = random_adapter(base, tmp_path / "adapter")
    merged = export(base, adapter, tmp_path / "merged")
    (tmp_path / "gguf").mkdir()
    model = export(base, adapter, tmp_path / "gguf" / "model.gguf", format="gguf", template="chat")
    lora = export(base, adapter, tmp_path / "gguf" / "adapter.gguf", format="gguf-lora", overwrite=True)
    ids = AutoTokenizer.from_pretrained(merged)(TEXT)["input_ids"]
    expected = logits(AutoModelForCausalLM.from_pretrained(merged, dtype=torch.float32).eval(), ids)[-1]
    llama_ids, got = llama_cpp_logits(model, ids, tmp_path)
    assert llama_ids == ids
    assert rel_err(got, expected) < 5e-3
    _, with_lora = llama_cpp_logits(lora.with_name("adapter.base.gguf"), ids, tmp_path, lora)
    assert rel_err(with_lora, expected) < 1e-2
