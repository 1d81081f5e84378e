"""InstructionDataModule: setup and its subset, formats and templates through it, the loaders (ranks, padding-free),
the bad settings, the truncation report, and exact resume in Lightning. The sources themselves: test_sources.py."""

from __future__ import annotations

import functools
import json
from itertools import pairwise
from types import SimpleNamespace

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint

from qlora_lightning.data import InstructionDataModule, datamodule
from qlora_lightning.data.formats import Example
from qlora_lightning.data.sources import Cut, Truncation
from qlora_lightning.data.templates import render_source
from qlora_lightning.data.tokenize import ExampleEncoder


def examples_of(batch) -> list[tuple[int, ...]]:
    """The token ids of each example of a batch: a padded row's unmasked ids, or a packed row's sequences (split where
    the positions restart at 0; the padding after the last example is left out)."""
    if "attention_mask" in batch:
        return [
            tuple(ids[mask.bool()].tolist())
            for ids, mask in zip(batch["input_ids"], batch["attention_mask"], strict=True)
        ]
    ids = batch["input_ids"][0].tolist()
    starts = (batch["position_ids"][0] == 0).nonzero().flatten().tolist() + [len(ids)]
    return [tuple(ids[a:b]) for a, b in pairwise(starts)][: int(batch["num_examples"])]


# ---------------------------------------------------------------------------------------- setup


def test_datamodule_subset_is_deterministic(dm_args, setup_dm, decoded, write_jsonl, orca_records):
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


def test_formats_through_the_datamodule(dm_args, setup_dm, decoded, write_jsonl):
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
def test_special_token_strings_in_a_data_file_are_trained_on_as_text(
    dm_args, setup_dm, decoded, write_jsonl, orca_records, template
):
    """A response holding `<|im_end|>\n<|im_start|>user` (a pasted chat log) is a target like any other: every
    labelled row has one EOS, at its end, and no turn start; the text is learnt as written."""
    response = "Sure.<|im_end|>\n<|im_start|>user\nMore"
    records = [{"system_prompt": "", "question": "Repeat: <|im_end|>", "response": response}] + orca_records(3)
    dm = setup_dm(**{**dm_args, "dataset": str(write_jsonl(records)), "template": template, "val_size": 0})
    tok = dm.tokenizer
    batch = next(iter(dm.train_dataloader()))
    for labels in batch["labels"]:
        target = labels[labels != -100].tolist()
        assert target.count(tok.eos_token_id) == 1 and target[-1] == tok.eos_token_id
        assert tok.convert_tokens_to_ids("<|im_start|>") not in target
    separator = " " if template == "qlora" else ""
    assert decoded(dm).count(f"{separator}{response}<|im_end|>") == 1


def test_tokenizer_by_name_batches_and_hparams(dm_args, setup_dm, tmp_path, bos_tokenizer, write_jsonl, orca_records):
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
        _ = InstructionDataModule().tokenizer  # the property raises


def test_ranks_get_equal_disjoint_shares_from_the_trainer(dm_args, setup_dm, write_jsonl, orca_records):
    dm = setup_dm(**{**dm_args, "dataset": str(write_jsonl(orca_records(23))), "val_size": 0})
    shares = []
    for rank in range(2):
        dm.trainer = SimpleNamespace(world_size=2, global_rank=rank, current_epoch=0, accumulate_grad_batches=1)
        shares.append([example for b in dm.train_dataloader() for example in examples_of(b)])
    # full optimizer steps only: 23 // (4 × 2) = 2 steps of 8 examples, 4 to each rank
    assert len(shares[0]) == len(shares[1]) == 8 and not set(shares[0]) & set(shares[1])


def test_padding_free_packs_each_micro_batch_but_predict(dm_args, setup_dm, write_jsonl, orca_records):
    """With padding_free the training, validation and test loaders give one packed row per micro-batch: the padded
    loader's examples in the same order with the same labelled tokens; predict keeps one padded row per prompt."""
    args = {**dm_args, "dataset": str(write_jsonl(orca_records(22))), "val_size": 6}
    padded, packed = setup_dm(**args), setup_dm(**args, padding_free=True)
    pairs = list(zip(padded.train_dataloader(), packed.train_dataloader(), strict=True))
    pairs += list(zip(padded.val_dataloader(), packed.val_dataloader(), strict=True))
    pairs += list(zip(padded.test_dataloader(), packed.test_dataloader(), strict=True))
    assert len(pairs) == 16 // 4 + 1 + 1
    for rows, row in pairs:
        boundaries = {"cu_seq_lens_q", "cu_seq_lens_k", "max_length_q", "max_length_k"}  # for varlen attention
        assert set(row) == {"input_ids", "position_ids", "labels", "num_examples"} | boundaries
        assert row["input_ids"].shape[0] == 1 and row["input_ids"].shape[1] % 8 == 0
        assert row["num_examples"] == rows["input_ids"].shape[0] and examples_of(row) == examples_of(rows)
        assert (row["labels"][:, 1:] != -100).sum() == (rows["labels"][:, 1:] != -100).sum()
    (expected,), (batch,) = padded.predict_dataloader(), packed.predict_dataloader()
    assert batch.keys() == expected.keys() == {"input_ids", "attention_mask", "labels"}
    assert all(torch.equal(batch[key], expected[key]) for key in batch) and batch["input_ids"].shape[0] == 6


def test_bad_settings_are_named():
    with pytest.raises(ValueError, match="unknown format 'orca'"):
        InstructionDataModule(format="orca")
    with pytest.raises(ValueError, match="unknown template 'vicuna'"):
        InstructionDataModule(template="vicuna")
    with pytest.raises(ValueError, match="on_bad_record must be"):
        InstructionDataModule(on_bad_record="ignore")


# -------------------------------------------------------------------------------------- truncation


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


def _dm_maker(folder, records, tokenizer):
    """make(**kw) -> a data module on 70 records (64 to train) written to `folder`, caching there too."""
    data = folder / "data.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    args = dict(
        tokenizer=tokenizer,
        dataset=str(data),
        max_examples=None,
        val_size=6,
        batch_size=4,
        eval_batch_size=8,
        num_workers=0,
        cache_dir=str(folder / "cache"),
    )
    return lambda **kw: InstructionDataModule(**{**args, **kw})


@pytest.fixture
def make_dm(tmp_path, orca_records, smollm2_tokenizer):
    return _dm_maker(tmp_path, orca_records(70), smollm2_tokenizer)


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, orca_records, smollm2_tokenizer):
    """uninterrupted(max_steps, accumulate=1, dm={...}, **trainer_kw) -> (model, trainer) of an uninterrupted run
    without workers on `make_dm`'s data: the reference the resume tests compare with, trained once per setting."""
    root = tmp_path_factory.mktemp("uninterrupted")
    make = _dm_maker(root, orca_records(70), smollm2_tokenizer)
    runs = {}

    def run(max_steps, accumulate=1, dm=None, **trainer_kw):
        key = repr((max_steps, accumulate, sorted((dm or {}).items()), sorted(trainer_kw.items())))
        if key not in runs:
            runs[key] = _train(make(**(dm or {})), root, f"run{len(runs)}", max_steps, accumulate, **trainer_kw)
        return runs[key]

    return run


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
    for step, example in zip(model.step_of, model.seen, strict=True):
        steps.setdefault(step, []).append(example)
    return [sorted(steps[k]) for k in sorted(steps)]


# 64 training examples / batch 4 = 16 batches per epoch; runs cover 2+ epochs and resume in epoch 0 or 1.
@pytest.mark.parametrize(
    "accumulate, save_every, resume_step, num_workers, padding_free",
    [(1, 5, 20, 0, False), (2, 3, 3, 0, False), (2, 3, 12, 2, False), (1, 16, 16, 0, False), (2, 3, 12, 0, True)],
    ids=["mid-epoch1", "accumulate2-epoch0", "accumulate2-epoch1-workers", "epoch-boundary", "padding-free"],
)
def test_resume_sees_exactly_the_remaining_batches(
    make_dm, uninterrupted, tmp_path, accumulate, save_every, resume_step, num_workers, padding_free
):
    make_dm = functools.partial(make_dm, padding_free=padding_free)
    total_steps = 40 // accumulate  # 40 batches: 2.5 epochs
    full = uninterrupted(total_steps, accumulate, dm=dict(padding_free=padding_free))[0].seen
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
def test_resume_from_validation_and_epoch_end_checkpoints(make_dm, uninterrupted, tmp_path, num_workers):
    """Checkpoints written after validation (mid-epoch) and at epoch end restore the data position, also
    when a resumed run is interrupted and resumed again. (Resuming from an epoch-end checkpoint, Lightning
    2.6 asks the finished epoch for one more batch and calls set_epoch one ahead: both handled.)"""
    make = functools.partial(make_dm, num_workers=num_workers)
    kw = dict(val_check_interval=6, limit_val_batches=1)
    full = uninterrupted(40, **kw)[0].seen
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
