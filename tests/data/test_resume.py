"""Lightning-level resume: interrupted + resumed training sees exactly the batches of one uninterrupted run."""

from __future__ import annotations

import functools

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint

from qlora_lightning.data import InstructionDataModule


class Recorder(L.LightningModule):
    """A toy model that records every training example it is given (as its unpadded token ids)."""

    def __init__(self):
        super().__init__()
        self.lin = torch.nn.Linear(1, 1)
        self.seen: list[tuple[int, ...]] = []

    def training_step(self, batch, batch_idx):
        for ids, mask in zip(batch["input_ids"], batch["attention_mask"]):
            self.seen.append(tuple(ids[mask.bool()].tolist()))
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
        args = dict(tokenizer=smollm2_tokenizer, dataset=str(data), max_examples=None, val_size=6, batch_size=4,
                    eval_batch_size=8, num_workers=0, cache_dir=str(tmp_path / "cache"))
        return InstructionDataModule(**{**args, **kw})

    return make


def _fit(dm, tmp_path, name, max_steps, accumulate=1, ckpt_path=None, callbacks=(), **trainer_kw):
    model = Recorder()
    trainer = L.Trainer(
        default_root_dir=tmp_path / name, max_steps=max_steps, accumulate_grad_batches=accumulate,
        callbacks=list(callbacks), logger=False, enable_progress_bar=False, enable_model_summary=False,
        num_sanity_val_steps=0, **{"enable_checkpointing": bool(callbacks), **trainer_kw},
    )
    trainer.fit(model, datamodule=dm, ckpt_path=ckpt_path)
    return model.seen


# 64 training examples / batch 4 = 16 batches per epoch; runs cover 2+ epochs and resume in epoch 0 or 1.
@pytest.mark.parametrize(
    "accumulate, save_every, resume_step, num_workers",
    [(1, 5, 20, 0), (2, 3, 3, 0), (2, 3, 12, 2), (1, 16, 16, 0)],
    ids=["mid-epoch1", "accumulate2-epoch0", "accumulate2-epoch1-workers", "epoch-boundary"],
)
def test_resume_sees_exactly_the_remaining_batches(make_dm, tmp_path, accumulate, save_every, resume_step, num_workers):
    total_steps = 40 // accumulate  # 40 batches: 2.5 epochs
    full = _fit(make_dm(num_workers=num_workers), tmp_path, "full", total_steps, accumulate)
    assert len(full) == 40 * 4 and len(set(full[:64])) == 64  # every example once per epoch

    ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpt", filename="{step}", every_n_train_steps=save_every, save_top_k=-1)
    first = _fit(make_dm(num_workers=num_workers), tmp_path, "first", resume_step + 2, accumulate, callbacks=[ckpt])
    consumed = resume_step * accumulate * 4
    assert first == full[: len(first)]
    second = _fit(make_dm(num_workers=num_workers), tmp_path, "second", total_steps, accumulate,
                  ckpt_path=tmp_path / "ckpt" / f"step={resume_step}.ckpt")
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
    on_epoch_end = ModelCheckpoint(dirpath=tmp_path / "ckpt", filename="end-{step}", save_top_k=-1, save_on_train_epoch_end=True)
    first = _fit(make(), tmp_path, "first", 30, callbacks=[on_val, on_epoch_end], **kw)
    assert first == full[: len(first)]
    for name, step in (("end-step=16.ckpt", 16), ("val-step=12.ckpt", 12), ("val-step=28.ckpt", 28)):
        second = _fit(make(), tmp_path, f"resume{step}", 40, ckpt_path=tmp_path / "ckpt" / name, **kw)
        assert first[: step * 4] + second == full, name

    again = ModelCheckpoint(dirpath=tmp_path / "again", filename="{step}", every_n_train_steps=5, save_top_k=-1)
    second = _fit(make(), tmp_path, "second", 22, ckpt_path=tmp_path / "ckpt" / "end-step=16.ckpt", callbacks=[again], **kw)
    third = _fit(make(), tmp_path, "third", 40, ckpt_path=tmp_path / "again" / "step=20.ckpt", **kw)
    assert first[:64] + second[:16] + third == full


def test_resume_rejects_changed_settings(make_dm, tmp_path):
    ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpt", filename="{step}", every_n_train_steps=3, save_top_k=-1)
    _fit(make_dm(), tmp_path, "first", 3, callbacks=[ckpt])
    state = torch.load(tmp_path / "ckpt" / "step=3.ckpt", weights_only=False)["InstructionDataModule"]
    assert state == {"epoch": 0, "consumed": 12, "seed": 42, "num_replicas": 1, "batch_size": 4, "num_examples": 64,
                     "group_by_length": True}
    with pytest.raises(ValueError, match=r"batch_size: 4 -> 8.*same data, seed, batch size and devices"):
        _fit(make_dm(batch_size=8), tmp_path, "second", 6, ckpt_path=tmp_path / "ckpt" / "step=3.ckpt")
