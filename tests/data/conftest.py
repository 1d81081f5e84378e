"""Fixtures of the data tests: small tokenizers built here, writers of instruction data files, and the settings and
set-up of a small data module.

The real SmolLM2 tokenizer comes from the session fixture `smollm2_tokenizer` in tests/conftest.py.
"""

from __future__ import annotations

import json

import pytest
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import PreTrainedTokenizerFast

from qlora_lightning.data import InstructionDataModule

CORPUS = [
    "A chat between a curious human and an artificial intelligence assistant.",
    "What is 2 + 2? 4",
    "### Human: ### Assistant:",
]


def _train(pre_tokenizer, decoder, post_processor=None) -> PreTrainedTokenizerFast:
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizer
    tok.decoder = decoder
    alphabet = pre_tokenizers.ByteLevel.alphabet() if isinstance(pre_tokenizer, pre_tokenizers.ByteLevel) else []
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=["<unk>", "<s>", "</s>"], initial_alphabet=alphabet)
    tok.train_from_iterator(CORPUS * 5, trainer)
    if post_processor:
        tok.post_processor = post_processor(tok)
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>")


@pytest.fixture(scope="session")
def bos_tokenizer() -> PreTrainedTokenizerFast:
    """A LLaMA-like byte-level tokenizer that puts <s> (BOS) before text, as LLaMA's does; no pad token."""
    return _train(
        pre_tokenizers.ByteLevel(add_prefix_space=False),
        decoders.ByteLevel(),
        lambda t: processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", t.token_to_id("<s>"))]),
    )


@pytest.fixture(scope="session")
def sentencepiece_like_tokenizer() -> PreTrainedTokenizerFast:
    """A tokenizer that marks every text's first word with '▁' (SentencePiece's dummy prefix)."""
    return _train(pre_tokenizers.Metaspace(), decoders.Metaspace())


@pytest.fixture
def write_jsonl(tmp_path):
    """write_jsonl(records, name) -> path: JSON Lines (strings are written as given, dicts as JSON)."""

    def write(records, name="data.jsonl"):
        path = tmp_path / name
        path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records), encoding="utf-8")
        return path

    return write


@pytest.fixture(scope="session")
def orca_records():
    """orca_records(n, start=0) -> `n` distinct OpenOrca-format records with short answers."""
    return _orca_records


def _orca_records(n: int, start: int = 0) -> list[dict]:
    return [
        {
            "id": str(i),
            "system_prompt": "" if i % 2 else "Be brief.",
            "question": f"What is {i} + {i % 7}?" + " Think." * (i % 5),
            "response": str(i + i % 7),
        }
        for i in range(start, start + n)
    ]


@pytest.fixture
def dm_args(tmp_path, smollm2_tokenizer):
    """Small-run defaults: the real SmolLM2 tokenizer, a private cache, no workers."""
    return dict(
        tokenizer=smollm2_tokenizer,
        max_examples=None,
        val_size=2,
        batch_size=4,
        num_workers=0,
        cache_dir=str(tmp_path / "cache"),
    )


@pytest.fixture(scope="session")
def setup_dm():
    """setup_dm(**kwargs) -> an `InstructionDataModule(**kwargs)` set up for fitting."""
    return _setup_dm


def _setup_dm(**kw) -> InstructionDataModule:
    dm = InstructionDataModule(**kw)
    dm.setup("fit")
    return dm


@pytest.fixture(scope="session")
def decoded():
    """decoded(dm, split="train") -> the decoded targets (the text after each row's source) of a split, sorted."""
    return _decoded


def _decoded(dm: InstructionDataModule, split: str = "train") -> list[str]:
    data = dm.train_data if split == "train" else dm.val_data
    tok = dm.tokenizer
    return sorted(tok.decode(row["input_ids"][row["n_source"] :]) for row in data)
