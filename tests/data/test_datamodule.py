"""InstructionDataModule: sources, the deterministic subset, bad input, caching, and exact resume in Lightning."""

from __future__ import annotations

import functools
import json
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path
from types import SimpleNamespace

import datasets
import lightning as L
import pandas as pd
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint

from qlora_lightning.data import BadRecordError, InstructionDataModule, datamodule, pick_subset, sources
from qlora_lightning.data.formats import Example
from qlora_lightning.data.sample import exact_match, main
from qlora_lightning.data.sources import Cut, Truncation, resolve_bundled
from qlora_lightning.data.templates import render_source
from qlora_lightning.data.tokenize import ExampleEncoder


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


def setup_dm(**kw) -> InstructionDataModule:
    dm = InstructionDataModule(**kw)
    dm.setup("fit")
    return dm


def examples_of(batch) -> list[tuple[int, ...]]:
    """The token ids of each example of a batch: a padded row's unmasked ids, or a packed row's sequences (split where
    the positions restart at 0; the padding after the last example is left out)."""
    if "attention_mask" in batch:
        return [tuple(ids[mask.bool()].tolist()) for ids, mask in zip(batch["input_ids"], batch["attention_mask"])]
    ids = batch["input_ids"][0].tolist()
    starts = (batch["position_ids"][0] == 0).nonzero().flatten().tolist() + [len(ids)]
    return [tuple(ids[a:b]) for a, b in zip(starts, starts[1:])][: int(batch["num_examples"])]


def decoded(dm, split="train"):
    data = dm.train_data if split == "train" else dm.val_data
    tok = dm.tokenizer
    return sorted(tok.decode(row["input_ids"][row["n_source"] :]) for row in data)


# ----------------------------------------------------------------------------------------- subset


def test_subset_is_fixed_by_seed_and_val_never_moves():
    train, val = pick_subset(1000, seed=42, max_examples=300, val_size=50)
    assert len(train) == 300 and len(val) == 50 and not set(train) & set(val)
    again_train, again_val = pick_subset(1000, seed=42, max_examples=300, val_size=50)
    assert (train == again_train).all() and (val == again_val).all()
    more_train, more_val = pick_subset(1000, seed=42, max_examples=600, val_size=50)
    assert (more_val == val).all() and set(train) <= set(more_train)  # a bigger budget extends the same subset
    other_train, _ = pick_subset(1000, seed=43, max_examples=300, val_size=50)
    assert set(other_train) != set(train)
    all_train, _ = pick_subset(1000, seed=42, max_examples=None, val_size=50)
    assert len(all_train) == 950
    with pytest.raises(ValueError, match="val_size"):
        pick_subset(10, seed=42, max_examples=None, val_size=10)


def test_datamodule_subset_is_deterministic(dm_args, write_jsonl, orca_records):
    path = str(write_jsonl(orca_records(40)))
    a = setup_dm(**{**dm_args, "dataset": path, "max_examples": 20, "val_size": 5})
    b = setup_dm(
        **{**dm_args, "dataset": path, "max_examples": 20, "val_size": 5, "cache_dir": dm_args["cache_dir"] + "2"}
    )
    assert len(a.train_data) == 20 and len(a.val_data) == 5
    assert decoded(a) == decoded(b) and decoded(a, "val") == decoded(b, "val")
    assert not set(decoded(a)) & set(decoded(a, "val"))
    c = setup_dm(**{**dm_args, "dataset": path, "max_examples": 20, "val_size": 5, "seed": 1})
    assert decoded(c) != decoded(a)


# ---------------------------------------------------------------------------------------- sources


def _orca_frame(n=6):
    return pd.DataFrame(
        {
            "system_prompt": [""] * n,
            "question": [f"What is {i} + 1?" for i in range(n)],
            "response": [str(i + 1) for i in range(n)],
        }
    )


def test_every_kind_of_source(dm_args, tmp_path, write_jsonl):
    frame = _orca_frame()
    records = frame.to_dict("records")
    expected = sorted(f" {r['response']}<|im_end|>" for r in records)
    (tmp_path / "array.json").write_text(json.dumps(records))
    frame.to_parquet(tmp_path / "data.parquet")
    frame.to_csv(tmp_path / "data.csv", index=False)
    datasets.Dataset.from_pandas(frame).save_to_disk(str(tmp_path / "saved"))
    datasets.DatasetDict({"train": datasets.Dataset.from_pandas(frame)}).save_to_disk(str(tmp_path / "saved_dict"))
    repo = tmp_path / "repo"  # a folder laid out like a hub dataset: read by load_dataset(name), the hub path
    repo.mkdir()
    frame.to_json(repo / "train.jsonl", orient="records", lines=True)
    frame.head(2).to_json(repo / "validation.jsonl", orient="records", lines=True)
    sources_ = [
        write_jsonl(records),
        tmp_path / "array.json",
        tmp_path / "data.parquet",
        tmp_path / "data.csv",
        tmp_path / "saved",
        tmp_path / "saved_dict",
        repo,
    ]
    for source in sources_:
        dm = setup_dm(**{**dm_args, "dataset": str(source)})
        assert sorted(decoded(dm) + decoded(dm, "val")) == expected, source

    dm = setup_dm(**{**dm_args, "dataset": str(repo), "val_dataset": str(repo), "val_size": 0})
    assert len(dm.train_data) == 6 and decoded(dm, "val") == [" 1<|im_end|>", " 2<|im_end|>"]
    with pytest.raises(ValueError, match=r"cannot load dataset '\S*no-such-org/no-such-dataset'"):
        setup_dm(**{**dm_args, "dataset": "no-such-org/no-such-dataset"})
    with pytest.raises(FileNotFoundError, match="does not exist"):
        setup_dm(**{**dm_args, "dataset": str(tmp_path / "missing.jsonl")})


def test_bundled_sample_is_what_the_script_generates(tmp_path):
    paths = {split: resolve_bundled(f"bundled:orca_sample_{split}") for split in ("train", "val")}
    main(["--out", str(tmp_path)])
    for split in ("train", "val"):
        assert (tmp_path / f"orca_sample_{split}.jsonl").read_bytes() == paths[split].read_bytes()
    train, val = ([json.loads(line) for line in paths[split].read_text().splitlines()] for split in ("train", "val"))
    assert len(train) == 400 and len(val) == 100
    assert not {r["question"] for r in train} & {r["question"] for r in val}
    assert {r["task"] for r in val} >= {"addition", "units", "reverse", "uppercase"}
    for r in train + val:
        assert set(r) == {"id", "task", "system_prompt", "question", "response"} and 0 < len(r["response"]) <= 12
        if r["task"] == "reverse":
            assert r["response"] == re.search(r"'(\w+)'", r["question"]).group(1)[::-1]


def test_exact_match_normalises_only_formatting():
    assert exact_match(" 42.\n### Human: next", "42")
    assert exact_match("'Paris'", "Paris") and exact_match("New  Delhi", "New Delhi")
    assert not exact_match("HELLO", "hello")  # case matters: the uppercase task differs only by case
    assert not exact_match("The answer is 42", "42") and not exact_match("", "42")


def test_bundled_sample(dm_args):
    dm = setup_dm(**{**dm_args, "dataset": "bundled:orca_sample_train", "val_dataset": "bundled:orca_sample_val"})
    assert len(dm.train_data) == 400 and len(dm.val_data) == 100
    with pytest.raises(FileNotFoundError, match="bundled: bundled:orca_sample_train, bundled:orca_sample_val"):
        setup_dm(**{**dm_args, "dataset": "bundled:nope"})


def test_formats_through_the_datamodule(dm_args, write_jsonl):
    alpaca = write_jsonl(
        [{"instruction": f"Count to {i}.", "input": "", "output": "1 2"} for i in range(5)], "alpaca.jsonl"
    )
    dm = setup_dm(**{**dm_args, "dataset": str(alpaca), "format": "alpaca", "template": "alpaca"})
    assert "### Instruction:\nCount to" in dm.tokenizer.decode(dm.train_data[0]["input_ids"])
    text = "### Human: Hi {i} ### Assistant: Hello ### Human: Bye ### Assistant: Ciao"
    oasst = write_jsonl([{"text": text.format(i=i)} for i in range(5)], "oasst.jsonl")
    dm = setup_dm(**{**dm_args, "dataset": str(oasst), "format": "oasst1", "val_size": 1})
    assert len(dm.train_data) == 8 and decoded(dm).count(" Ciao<|im_end|>") == 4  # 2 assistant turns per record
    generic = write_jsonl([{"input": f"ping {i}", "output": "pong"} for i in range(5)], "io.jsonl")
    dm = setup_dm(**{**dm_args, "dataset": str(generic), "format": "input_output", "template": "chat"})
    assert "<|im_start|>user\nping" in dm.tokenizer.decode(dm.train_data[0]["input_ids"])


@pytest.mark.parametrize("template", ["qlora", "chat"])
def test_special_token_strings_in_a_data_file_are_trained_on_as_text(dm_args, write_jsonl, template):
    """A response holding `<|im_end|>\n<|im_start|>user` (a pasted chat log) is a target like any other: every
    labelled row has one EOS, at its end, and no turn start; the text is learnt as written."""
    response = "Sure.<|im_end|>\n<|im_start|>user\nMore"
    records = [{"system_prompt": "", "question": "Repeat: <|im_end|>", "response": response}] + [GOOD] * 3
    dm = setup_dm(**{**dm_args, "dataset": str(write_jsonl(records)), "template": template, "val_size": 0})
    tok = dm.tokenizer
    batch = next(iter(dm.train_dataloader()))
    for labels in batch["labels"]:
        target = labels[labels != -100].tolist()
        assert target.count(tok.eos_token_id) == 1 and target[-1] == tok.eos_token_id
        assert tok.convert_tokens_to_ids("<|im_start|>") not in target
    separator = " " if template == "qlora" else ""
    assert decoded(dm).count(f"{separator}{response}<|im_end|>") == 1


def test_tokenizer_by_name_batches_and_hparams(dm_args, tmp_path, bos_tokenizer, write_jsonl, orca_records):
    bos_tokenizer.save_pretrained(tmp_path / "tok")
    dm = setup_dm(
        **{**dm_args, "tokenizer": str(tmp_path / "tok"), "dataset": str(write_jsonl(orca_records(9))), "val_size": 0}
    )
    assert dm.tokenizer.pad_token_id is not None  # given by load_tokenizer
    batch = next(iter(dm.train_dataloader()))
    assert set(batch) == {"input_ids", "attention_mask", "labels"} and batch["input_ids"].shape[0] == 4
    assert (batch["input_ids"][:, 0] == bos_tokenizer.bos_token_id).all()
    assert dm.val_dataloader() == [] and dm.hparams.tokenizer == str(tmp_path / "tok")
    obj = InstructionDataModule(tokenizer=bos_tokenizer)
    assert obj.hparams.tokenizer == bos_tokenizer.name_or_path and obj.tokenizer is bos_tokenizer
    with pytest.raises(ValueError, match="needs `tokenizer`"):
        InstructionDataModule().tokenizer


def test_ranks_get_equal_disjoint_shares_from_the_trainer(dm_args, write_jsonl, orca_records):
    dm = setup_dm(**{**dm_args, "dataset": str(write_jsonl(orca_records(23))), "val_size": 0})
    shares = []
    for rank in range(2):
        dm.trainer = SimpleNamespace(world_size=2, global_rank=rank, current_epoch=0, accumulate_grad_batches=1)
        shares.append([example for b in dm.train_dataloader() for example in examples_of(b)])
    # full optimizer steps only: 23 // (4 × 2) = 2 steps of 8 examples, 4 to each rank
    assert len(shares[0]) == len(shares[1]) == 8 and not set(shares[0]) & set(shares[1])


def test_padding_free_packs_each_micro_batch_but_predict(dm_args, write_jsonl, orca_records):
    """With padding_free the training, validation and test loaders give one packed row per micro-batch: the padded
    loader's examples in the same order with the same labelled tokens; predict keeps one padded row per prompt."""
    args = {**dm_args, "dataset": str(write_jsonl(orca_records(22))), "val_size": 6}
    padded, packed = setup_dm(**args), setup_dm(**args, padding_free=True)
    pairs = list(zip(padded.train_dataloader(), packed.train_dataloader(), strict=True))
    pairs += list(zip(padded.val_dataloader(), packed.val_dataloader(), strict=True))
    pairs += list(zip(padded.test_dataloader(), packed.test_dataloader(), strict=True))
    assert len(pairs) == 16 // 4 + 1 + 1
    for rows, row in pairs:
        assert set(row) == {"input_ids", "position_ids", "labels", "num_examples"}
        assert row["input_ids"].shape[0] == 1 and row["input_ids"].shape[1] % 8 == 0
        assert row["num_examples"] == rows["input_ids"].shape[0] and examples_of(row) == examples_of(rows)
        assert (row["labels"][:, 1:] != -100).sum() == (rows["labels"][:, 1:] != -100).sum()
    (expected,), (batch,) = padded.predict_dataloader(), packed.predict_dataloader()
    assert batch.keys() == expected.keys() == {"input_ids", "attention_mask", "labels"}
    assert all(torch.equal(batch[key], expected[key]) for key in batch) and batch["input_ids"].shape[0] == 6


# -------------------------------------------------------------------------------------- bad input

GOOD = {"system_prompt": "", "question": "What is 1 + 1?", "response": "2"}


@pytest.mark.parametrize(
    "lines, where, problem",
    [
        ([GOOD, GOOD, '{"question": "q", "response": "r"', GOOD], "line 3", "malformed JSON"),
        ([GOOD, {"response": "2"}, GOOD], "line 2", "field 'question': missing"),
        ([GOOD, GOOD, {**GOOD, "response": 2}], "line 3", "field 'response': must be a string, got int"),
        ([GOOD, {**GOOD, "response": ""}, GOOD, GOOD], "line 2", "field 'response': is empty"),
        ([GOOD, "", GOOD, '["a list"]'], "line 4", "expected a JSON object"),  # blank lines keep numbering
        # valid JSON that json.loads accepts, but a lone surrogate is no text a tokenizer can take
        ([GOOD, '{"question": "caf\\ud800", "response": "r"}'], "line 2", "field 'question': is not valid text"),
        ([GOOD, "[" * 100_000 + "]" * 100_000, GOOD], "line 2", "JSON nested too deeply to parse"),
    ],
)
def test_bad_jsonl_records_name_file_line_and_field(dm_args, write_jsonl, lines, where, problem):
    path = write_jsonl(lines)
    with pytest.raises(BadRecordError, match=re.escape(f"{path}: {where}: ") + ".*" + re.escape(problem)):
        setup_dm(**{**dm_args, "dataset": str(path), "val_size": 0})


def test_bad_table_rows_and_json_arrays(dm_args, tmp_path):
    frame = _orca_frame()
    frame["response"] = list(range(6))  # ints: a non-string field in every row
    frame.to_parquet(tmp_path / "bad.parquet")
    with pytest.raises(
        BadRecordError,
        match=re.escape(f"{tmp_path / 'bad.parquet'}: row ") + r"\d: field 'response': must be a string, got int",
    ):
        setup_dm(**{**dm_args, "dataset": str(tmp_path / "bad.parquet")})
    frame = _orca_frame()
    frame.loc[3, "response"] = None
    frame.to_csv(tmp_path / "bad.csv", index=False)
    with pytest.raises(BadRecordError, match=re.escape(f"{tmp_path / 'bad.csv'}: row 3: field 'response': is null")):
        setup_dm(**{**dm_args, "dataset": str(tmp_path / "bad.csv"), "val_size": 0})
    (tmp_path / "bad.json").write_text('[\n{"question": "q", "response": "r"},\n{"question": }\n]')
    with pytest.raises(BadRecordError, match=re.escape(f"{tmp_path / 'bad.json'}: line 3: malformed JSON")):
        setup_dm(**{**dm_args, "dataset": str(tmp_path / "bad.json")})
    (tmp_path / "arr.json").write_text(json.dumps([GOOD, {**GOOD, "question": ""}, GOOD]))
    with pytest.raises(
        BadRecordError, match=re.escape(f"{tmp_path / 'arr.json'}: record 1: field 'question': is empty")
    ):
        setup_dm(**{**dm_args, "dataset": str(tmp_path / "arr.json"), "val_size": 0})


@pytest.mark.parametrize("lines_before", [0, 200], ids=["in-the-first-4KB", "far-past-them"])
def test_bytes_that_are_not_utf8_name_the_line(dm_args, tmp_path, lines_before):
    good = (json.dumps(GOOD) + "\n").encode()
    latin1 = '{"question": "Caf\xe9?", "response": "Oui."}\n'.encode("latin-1")  # é is byte 0xe9, not UTF-8
    problem = f"line {lines_before + 1}: not UTF-8 text: byte 0xe9 at column 18"
    path = tmp_path / "data.jsonl"
    path.write_bytes(good * lines_before + latin1 + good * 5)
    with pytest.raises(BadRecordError, match=re.escape(f"{path}: {problem}; save the file as UTF-8")):
        setup_dm(**{**dm_args, "dataset": str(path), "val_size": 0})
    skipped = f"skipped 1 bad records (on_bad_record: skip); the first: {path}: {problem}"
    with pytest.warns(UserWarning, match=re.escape(skipped)):
        dm = setup_dm(**{**dm_args, "dataset": str(path), "val_size": 0, "on_bad_record": "skip"})
    assert len(dm.train_data) == lines_before + 5

    array = tmp_path / "array.json"  # one JSON array: no record can be skipped, the line is still named
    records = [good.strip()] * lines_before + [latin1.strip(), good.strip()]
    array.write_bytes(b"[\n" + b",\n".join(records) + b"\n]\n")
    with pytest.raises(BadRecordError, match=re.escape(f"{array}: line {lines_before + 2}: not UTF-8 text: byte 0xe9")):
        setup_dm(**{**dm_args, "dataset": str(array), "val_size": 0, "on_bad_record": "skip"})


def test_a_text_file_named_jsonl_is_named_as_not_json(dm_args, write_jsonl):
    """Lines that are no JSON were reported as "val_size must be smaller than the number of records"."""
    path = write_jsonl(["Hello there.", "", "Some notes, not JSON."])
    problem = f"{path}: line 1: not a JSON object: 'Hello there.'; a JSON Lines file holds one JSON object"
    with pytest.raises(BadRecordError, match=re.escape(problem)):
        setup_dm(**{**dm_args, "dataset": str(path), "val_size": 1024})


def _dataset_folder(root: Path, *files: list[str]) -> Path:
    """A local folder laid out like a hub dataset repository: `data/train-0000i-of-0000n.jsonl`, one per file."""
    (root / "data").mkdir(parents=True)
    for i, lines in enumerate(files):
        (root / "data" / f"train-{i:05d}-of-{len(files):05d}.jsonl").write_text("\n".join(lines) + "\n")
    return root


def test_a_dataset_folder_names_the_file_and_line_of_a_bad_record(dm_args, tmp_path):
    """A folder laid out like a hub repository is read file by file as a single file is: a bad line is named by its
    file and line (datasets named neither), and one field of the wrong type blames its own record (datasets made the
    whole column that type: good row 0 was blamed and `skip` dropped all 40)."""
    good = [json.dumps({**GOOD, "question": f"What is {i} + 1?"}) for i in range(40)]
    typed = _dataset_folder(
        tmp_path / "typed", good[:20], good[20:27] + [json.dumps({**GOOD, "response": 2})] + good[28:]
    )
    problem = f"{typed / 'data' / 'train-00001-of-00002.jsonl'}: line 8: field 'response': must be a string, got int"
    with pytest.raises(BadRecordError, match=re.escape(problem)):
        setup_dm(**{**dm_args, "dataset": str(typed)})
    with pytest.warns(
        UserWarning, match=re.escape(f"skipped 1 bad records (on_bad_record: skip); the first: {problem}")
    ):
        dm = setup_dm(**{**dm_args, "dataset": str(typed), "on_bad_record": "skip"})
    assert len(dm.train_data) + len(dm.val_data) == 39
    malformed = _dataset_folder(tmp_path / "malformed", good[:5] + ['{"question": "q", "response": '] + good[6:])
    with pytest.raises(
        BadRecordError, match=re.escape(f"{malformed / 'data' / 'train-00000-of-00001.jsonl'}: line 6: malformed JSON")
    ):
        setup_dm(**{**dm_args, "dataset": str(malformed)})
    with pytest.raises(ValueError, match=re.escape(f"{malformed}: no split 'validation'; splits: train")):
        setup_dm(**{**dm_args, "dataset": str(malformed), "split": "validation"})


def test_a_file_size_limit_hit_while_caching_is_named_as_a_write_failure(tmp_path, bos_tokenizer):
    """A real write past `ulimit -f` (RLIMIT_FSIZE, the same EFBIG as a full disk) while caching the data was reported
    as "cannot be read as jsonl". The file read takes 137 kB of cache, its tokens 595 kB: a limit of 60 kB stops the
    first write, one of 300 kB the second."""
    bos_tokenizer.save_pretrained(tmp_path / "tokenizer")
    data = tmp_path / "data.jsonl"
    record = {**GOOD, "question": "What is 1 + 1? " + "x" * 200}
    data.write_text("".join(json.dumps(record) + "\n" for _ in range(500)))
    cache = tmp_path / "cache"
    script = textwrap.dedent(f"""
        import resource, signal
        from qlora_lightning.data import InstructionDataModule
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        for limit in (60_000, 300_000):
            resource.setrlimit(resource.RLIMIT_FSIZE, (limit, resource.RLIM_INFINITY))
            data = InstructionDataModule({str(tmp_path / "tokenizer")!r}, dataset={str(data)!r}, val_size=10,
                                         cache_dir={str(cache)!r})
            try:
                data.setup()
            except OSError as e:
                print(type(e).__name__, e)
    """)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    advice = "MiB free there); free disk space, raise the file-size limit (ulimit -f), or set data.cache_dir"
    failures = done.stdout.splitlines()
    assert len(failures) == 2 and all(advice in line for line in failures), done.stdout
    for line, (folder, during) in zip(failures, [(cache, "reading"), (cache / "qlora_lightning", "tokenizing")]):
        assert line.startswith(
            f"CacheWriteError cannot write the data cache in {folder} while {during} {data}: File too large ("
        )


def test_too_deep_json_arrays_and_skipping_unreadable_lines(dm_args, tmp_path, write_jsonl):
    deep = tmp_path / "deep.json"
    deep.write_text("[" + json.dumps(GOOD) + ", " + "[" * 100_000 + "]" * 100_000 + "]")
    with pytest.raises(BadRecordError, match=re.escape(f"{deep}: JSON nested too deeply to parse")):
        setup_dm(**{**dm_args, "dataset": str(deep), "val_size": 0})
    path = write_jsonl([GOOD, "[" * 100_000 + "]" * 100_000, '{"question": "\\udfff", "response": "r"}', GOOD, GOOD])
    with pytest.warns(UserWarning, match="skipped 2 bad records .*line 2: JSON nested too deeply"):
        dm = setup_dm(**{**dm_args, "dataset": str(path), "val_size": 0, "on_bad_record": "skip"})
    assert len(dm.train_data) == 3


def test_a_cache_folder_that_cannot_be_written_is_named(dm_args, tmp_path, write_jsonl):
    data = str(write_jsonl([GOOD] * 4))
    (tmp_path / "a_file").write_text("")
    unwritable = [tmp_path / "a_file" / "cache"]  # mkdir fails under a file, even for root
    if os.geteuid() != 0:  # root ignores permissions
        (tmp_path / "readonly").mkdir(mode=0o500)
        unwritable.append(tmp_path / "readonly")
    for folder in unwritable:
        problem = re.escape(f"the cache folder {folder} is not writable (") + r"[^)]+\): "
        advice = re.escape("set data.cache_dir (or HF_DATASETS_CACHE, used when data.cache_dir is unset)")
        with pytest.raises(PermissionError, match=problem + advice):
            setup_dm(**{**dm_args, "dataset": data, "cache_dir": str(folder)})


def test_empty_files_and_bad_settings(dm_args, tmp_path):
    (tmp_path / "empty.jsonl").write_text("")
    with pytest.raises(BadRecordError, match=re.escape(f"{tmp_path / 'empty.jsonl'}: the file is empty")):
        setup_dm(**{**dm_args, "dataset": str(tmp_path / "empty.jsonl")})
    (tmp_path / "blank.jsonl").write_text("\n  \n")
    with pytest.raises(BadRecordError, match=re.escape(f"{tmp_path / 'blank.jsonl'}: no records")):
        setup_dm(**{**dm_args, "dataset": str(tmp_path / "blank.jsonl")})
    (tmp_path / "broken.parquet").write_bytes(b"not parquet at all")
    with pytest.raises(BadRecordError, match=re.escape(f"{tmp_path / 'broken.parquet'}: cannot be read as parquet")):
        setup_dm(**{**dm_args, "dataset": str(tmp_path / "broken.parquet")})
    (tmp_path / "data.txt").write_text("x")
    with pytest.raises(ValueError, match="unsupported file type '.txt'"):
        setup_dm(**{**dm_args, "dataset": str(tmp_path / "data.txt")})
    with pytest.raises(ValueError, match="unknown format 'orca'"):
        InstructionDataModule(format="orca")
    with pytest.raises(ValueError, match="unknown template 'vicuna'"):
        InstructionDataModule(template="vicuna")
    with pytest.raises(ValueError, match="on_bad_record must be"):
        InstructionDataModule(on_bad_record="ignore")


def test_skip_drops_bad_records_and_warns_once(dm_args, write_jsonl):
    lines = [GOOD, "{oops", {**GOOD, "response": None}, {**GOOD, "question": "What is 2 + 2?"}, {"question": 3}] + [
        GOOD
    ] * 5
    path = write_jsonl(lines)
    with pytest.warns(UserWarning) as caught:
        dm = setup_dm(**{**dm_args, "dataset": str(path), "on_bad_record": "skip", "val_size": 1})
    messages = [str(w.message) for w in caught if "skipped" in str(w.message)]
    assert len(messages) == 1 and messages[0].startswith("skipped 3 bad records") and str(path) in messages[0]
    assert len(dm.train_data) + len(dm.val_data) == 7
    assert sum(b["input_ids"].shape[0] for b in dm.train_dataloader()) == len(dm.train_data) // 4 * 4  # full batches
    with pytest.raises(BadRecordError, match=r"line 2: malformed JSON.*\(2 more bad records\)"):
        setup_dm(**{**dm_args, "dataset": str(path), "val_size": 1})
    only_bad = write_jsonl(["{oops", {"question": 3}], "bad.jsonl")
    with pytest.raises(BadRecordError, match="no usable records left for training: skipped 2 bad records"):
        setup_dm(**{**dm_args, "dataset": str(only_bad), "on_bad_record": "skip", "val_size": 0})


# -------------------------------------------------------------------------------------- caching


def test_tokenization_is_cached_and_keyed(dm_args, write_jsonl, orca_records, monkeypatch):
    path = str(write_jsonl(orca_records(30)))
    first = setup_dm(**{**dm_args, "dataset": path})
    cache = sorted((Path(dm_args["cache_dir"]) / "qlora_lightning").glob("tokenized-*.arrow"))
    assert len(cache) == 2  # train and val

    def fail(self, examples):
        raise AssertionError("tokenized again although cached")

    with monkeypatch.context() as m:
        m.setattr(ExampleEncoder, "encode", fail)
        again = setup_dm(**{**dm_args, "dataset": path})
    assert again.train_data["input_ids"] == first.train_data["input_ids"]
    other = setup_dm(**{**dm_args, "dataset": path, "template": "alpaca", "target_max_len": 2})
    assert other.train_data["input_ids"] != first.train_data["input_ids"]
    assert max(r["length"] - r["n_source"] for r in other.train_data) == 2


def _expected_truncation(tok, records, source_max_len, target_max_len) -> Truncation:
    """What the limits cut from OpenOrca records without a system prompt, counted from their full tokenization."""
    sources_ = [len(tok(render_source(Example(r["question"], r["response"]), "qlora"))["input_ids"]) for r in records]
    targets = [len(tok(" " + r["response"])["input_ids"]) + 1 for r in records]  # + EOS

    def cut(lengths, limit):
        over = [n - limit for n in lengths if n > limit]
        return Cut(len(over), sum(over), max(over, default=0))

    return Truncation(len(records), cut(sources_, source_max_len), cut(targets, target_max_len))


def test_truncation_is_counted_reported_once_and_cached(dm_args, write_jsonl, monkeypatch):
    train = [
        {"question": f"What is {i} + 1?" + " Think." * (i % 4 * 12), "response": f"{i + 1}" + " yes" * (i % 3 * 3)}
        for i in range(12)
    ]
    val = [{"question": f"Name {i}.", "response": "Blue" + ", green" * i} for i in range(5)]
    args = {
        **dm_args,
        "dataset": str(write_jsonl(train)),
        "val_dataset": str(write_jsonl(val, "val.jsonl")),
        "val_size": 0,
        "source_max_len": 60,
        "target_max_len": 6,
    }
    expected = {
        "train": _expected_truncation(dm_args["tokenizer"], train, 60, 6),
        "val": _expected_truncation(dm_args["tokenizer"], val, 60, 6),
    }
    assert expected["train"].source.examples and expected["train"].target.examples and expected["val"].target.examples
    line = (
        f"length limits (source_max_len 60, target_max_len 6): training: {expected['train'].describe()}; "
        f"validation: {expected['val'].describe()}"
    )

    def fail(self, examples):
        raise AssertionError("tokenized again although cached")

    for cached in (False, True):
        with monkeypatch.context() as m:
            if cached:  # the numbers come out of the cache, not from tokenizing again
                m.setattr(ExampleEncoder, "encode", fail)
            logged = []
            m.setattr(datamodule, "rank_zero_info", logged.append)
            dm = InstructionDataModule(**args)
            dm.prepare_data()
            dm.setup("fit")
        assert dm.truncation == expected and logged == [line]
    assert Cut(2, 7, 5).describe("source", 10) == "source cut in 2/10 examples (mean 3.5, max 5 tokens)"
    assert Truncation(10, Cut(2, 7, 5), Cut(0, 0, 0)).describe() == (
        "source cut in 2/10 examples (mean 3.5, max 5 tokens), no target cut"
    )


def test_parallel_tokenization_equals_serial(dm_args, write_jsonl, orca_records, monkeypatch):
    path = str(write_jsonl(orca_records(60)))
    serial = setup_dm(**{**dm_args, "dataset": path, "num_proc": None})
    monkeypatch.setattr(sources, "PARALLEL_MIN_RECORDS", 0)
    parallel = setup_dm(**{**dm_args, "dataset": path, "num_proc": 2, "cache_dir": dm_args["cache_dir"] + "-par"})
    assert parallel.train_data["input_ids"] == serial.train_data["input_ids"]
    assert list((Path(dm_args["cache_dir"] + "-par") / "qlora_lightning").glob("*_of_00002.arrow"))


# -------------------------------------------------------------------------------- resume (Lightning)


class Recorder(L.LightningModule):
    """A toy model that records every training example it is given (as its unpadded token ids; padded or packed)."""

    def __init__(self):
        super().__init__()
        self.lin = torch.nn.Linear(1, 1)
        self.seen: list[tuple[int, ...]] = []
        self.step_of: list[int] = []  # the optimizer step each example of `seen` went into

    def training_step(self, batch, batch_idx):
        for example in examples_of(batch):
            self.seen.append(example)
            self.step_of.append(self.trainer.global_step)
        x = batch["input_ids"].float().mean(dim=1, keepdim=True)
        return (self.lin(x / 1000) ** 2).mean()

    def validation_step(self, batch, batch_idx):
        self.log("val_loss", (self.lin(batch["input_ids"].float().mean(dim=1, keepdim=True) / 1000) ** 2).mean())

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.01)


@pytest.fixture
def make_dm(tmp_path, write_jsonl, orca_records, smollm2_tokenizer):
    data = write_jsonl(orca_records(70))

    def make(**kw):
        args = dict(
            tokenizer=smollm2_tokenizer,
            dataset=str(data),
            max_examples=None,
            val_size=6,
            batch_size=4,
            eval_batch_size=8,
            num_workers=0,
            cache_dir=str(tmp_path / "cache"),
        )
        return InstructionDataModule(**{**args, **kw})

    return make


def _train(dm, tmp_path, name, max_steps, accumulate=1, ckpt_path=None, callbacks=(), **trainer_kw):
    model = Recorder()
    trainer = L.Trainer(
        default_root_dir=tmp_path / name,
        max_steps=max_steps,
        accumulate_grad_batches=accumulate,
        callbacks=list(callbacks),
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        **{"enable_checkpointing": bool(callbacks), **trainer_kw},
    )
    trainer.fit(model, datamodule=dm, ckpt_path=ckpt_path)
    return model, trainer


def _fit(*args, **kwargs):
    return _train(*args, **kwargs)[0].seen


def _steps(model):
    """The examples of each optimizer step (sorted: the split into micro-batches may order them otherwise)."""
    steps: dict[int, list] = {}
    for step, example in zip(model.step_of, model.seen):
        steps.setdefault(step, []).append(example)
    return [sorted(steps[k]) for k in sorted(steps)]


# 64 training examples / batch 4 = 16 batches per epoch; runs cover 2+ epochs and resume in epoch 0 or 1.
@pytest.mark.parametrize(
    "accumulate, save_every, resume_step, num_workers, padding_free",
    [(1, 5, 20, 0, False), (2, 3, 3, 0, False), (2, 3, 12, 2, False), (1, 16, 16, 0, False), (2, 3, 12, 0, True)],
    ids=["mid-epoch1", "accumulate2-epoch0", "accumulate2-epoch1-workers", "epoch-boundary", "padding-free"],
)
def test_resume_sees_exactly_the_remaining_batches(
    make_dm, tmp_path, accumulate, save_every, resume_step, num_workers, padding_free
):
    make_dm = functools.partial(make_dm, padding_free=padding_free)
    total_steps = 40 // accumulate  # 40 batches: 2.5 epochs
    full = _fit(make_dm(num_workers=num_workers), tmp_path, "full", total_steps, accumulate)
    assert len(full) == 40 * 4 and len(set(full[:64])) == 64  # every example once per epoch

    ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpt", filename="{step}", every_n_train_steps=save_every, save_top_k=-1)
    first = _fit(make_dm(num_workers=num_workers), tmp_path, "first", resume_step + 2, accumulate, callbacks=[ckpt])
    consumed = resume_step * accumulate * 4
    assert first == full[: len(first)]
    second = _fit(
        make_dm(num_workers=num_workers),
        tmp_path,
        "second",
        total_steps,
        accumulate,
        ckpt_path=tmp_path / "ckpt" / f"step={resume_step}.ckpt",
    )
    assert first[:consumed] + second == full


@pytest.mark.parametrize("num_workers", [0, 2])
def test_resume_from_validation_and_epoch_end_checkpoints(make_dm, tmp_path, num_workers):
    """Checkpoints written after validation (mid-epoch) and at epoch end restore the data position, also
    when a resumed run is interrupted and resumed again. (Resuming from an epoch-end checkpoint, Lightning
    2.6 asks the finished epoch for one more batch and calls set_epoch one ahead: both handled.)"""
    make = functools.partial(make_dm, num_workers=num_workers)
    kw = dict(val_check_interval=6, limit_val_batches=1)
    full = _fit(make(), tmp_path, "full", 40, **kw)
    on_val = ModelCheckpoint(dirpath=tmp_path / "ckpt", filename="val-{step}", save_top_k=-1, monitor="val_loss")
    on_epoch_end = ModelCheckpoint(
        dirpath=tmp_path / "ckpt", filename="end-{step}", save_top_k=-1, save_on_train_epoch_end=True
    )
    first = _fit(make(), tmp_path, "first", 30, callbacks=[on_val, on_epoch_end], **kw)
    assert first == full[: len(first)]
    for name, step in (("end-step=16.ckpt", 16), ("val-step=12.ckpt", 12), ("val-step=28.ckpt", 28)):
        second = _fit(make(), tmp_path, f"resume{step}", 40, ckpt_path=tmp_path / "ckpt" / name, **kw)
        assert first[: step * 4] + second == full, name

    again = ModelCheckpoint(dirpath=tmp_path / "again", filename="{step}", every_n_train_steps=5, save_top_k=-1)
    second = _fit(
        make(), tmp_path, "second", 22, ckpt_path=tmp_path / "ckpt" / "end-step=16.ckpt", callbacks=[again], **kw
    )
    third = _fit(make(), tmp_path, "third", 40, ckpt_path=tmp_path / "again" / "step=20.ckpt", **kw)
    assert first[:64] + second[:16] + third == full


# 64 examples, global batch 8 = 8 steps per epoch; 20 steps cover 2.5 epochs.
@pytest.mark.parametrize(
    "saved, resumed, resume_step",
    [((4, 2), (2, 4), 3), ((2, 4), (8, 1), 8), ((8, 1), (4, 2), 11)],
    ids=["mid-epoch0", "epoch-boundary", "mid-epoch1"],
)
def test_resume_on_another_micro_batch_split_sees_the_same_steps(make_dm, tmp_path, saved, resumed, resume_step):
    """Saved with (micro-batch, accumulation) `saved`, resumed with `resumed` of the same global batch (what a
    change of device count does per device): every optimizer step sees the uninterrupted run's examples, and
    Lightning's batch counters end as that run's (they were converted to the new micro-batches)."""
    (micro, accumulate), (new_micro, new_accumulate) = saved, resumed
    full, full_trainer = _train(make_dm(batch_size=new_micro), tmp_path, "full", 20, new_accumulate)
    ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpt", filename="{step}", every_n_train_steps=resume_step)
    first, _ = _train(make_dm(batch_size=micro), tmp_path, "first", resume_step, accumulate, callbacks=[ckpt])
    second, trainer = _train(
        make_dm(batch_size=new_micro),
        tmp_path,
        "second",
        20,
        new_accumulate,
        ckpt_path=tmp_path / "ckpt" / f"step={resume_step}.ckpt",
    )
    assert len(_steps(full)) == 20 and all(len(step) == 8 for step in _steps(full))
    assert _steps(first) == _steps(full)[:resume_step]
    assert _steps(second) == _steps(full)[resume_step:]
    assert (trainer.global_step, trainer.current_epoch) == (full_trainer.global_step, full_trainer.current_epoch)
    # every loop counter (batch progress included) as the uninterrupted run's, but for `epoch_progress`, which
    # Lightning 2.6 itself leaves one short in `ready`/`started` after resuming at an epoch end, whatever the split
    resumed_loops, full_loops = trainer.fit_loop.state_dict(), full_trainer.fit_loop.state_dict()
    del resumed_loops["epoch_progress"], full_loops["epoch_progress"]
    assert resumed_loops == full_loops


def test_resume_rejects_changed_settings(make_dm, tmp_path):
    ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpt", filename="{step}", every_n_train_steps=3, save_top_k=-1)
    _fit(make_dm(), tmp_path, "first", 3, callbacks=[ckpt])
    state = torch.load(tmp_path / "ckpt" / "step=3.ckpt", weights_only=False)["InstructionDataModule"]
    assert state == {
        "epoch": 0,
        "consumed": 12,
        "global_batch": 4,
        "seed": 42,
        "num_examples": 64,
        "group_by_length": True,
        "num_replicas": 1,
        "batch_size": 4,
        "accumulate": 1,
    }
    with pytest.raises(ValueError, match=r"global_batch: 4 -> 8\).*same data, seed and global batch"):
        _fit(make_dm(batch_size=8), tmp_path, "second", 6, ckpt_path=tmp_path / "ckpt" / "step=3.ckpt")
