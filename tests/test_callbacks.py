"""The training callbacks (callbacks.py): added by the module and the CLI, logged metrics, the RNG stream's state."""

from __future__ import annotations

import csv
from pathlib import Path

import lightning as L
import torch
from qlora_testing import cli_args, cpu_trainer, straight_run_adapters, tiny_module_and_data

from qlora_lightning import cli
from qlora_lightning.adapters import adapter_state_dict
from qlora_lightning.callbacks import NonFiniteGuard, TrainingRngStream
from qlora_lightning.resume import read_checkpoint


def test_a_plain_trainer_gets_the_guard_and_the_rng_stream_without_listing_them(tiny_chat_llama_dir, tmp_path):
    module, data = tiny_module_and_data(tiny_chat_llama_dir)
    t = cpu_trainer(tmp_path, max_steps=2)
    t.fit(module, data)
    kinds = [type(c) for c in t.callbacks]
    assert kinds.count(NonFiniteGuard) == 1 and kinds.count(TrainingRngStream) == 1
    saved = read_checkpoint(tmp_path / "checkpoints" / "last.ckpt")["callbacks"]["TrainingRngStream"]
    assert torch.equal(saved["cpu"], t.callbacks[kinds.index(TrainingRngStream)].state_dict()["cpu"])


def test_a_checkpoint_with_the_rng_state_at_its_top_level_resumes_bitwise(tiny_chat_llama_dir, tmp_path):
    """Checkpoints written before `TrainingRngStream` keep the stream's state as `rng_state` at their top level: a
    resume from one draws the masks the uninterrupted run drew."""
    straight = straight_run_adapters(tiny_chat_llama_dir, tmp_path / "straight", 4, every=2)

    L.seed_everything(0)
    module, data = tiny_module_and_data(tiny_chat_llama_dir)
    cpu_trainer(tmp_path / "cut", max_steps=2, every=2).fit(module, data)
    path = tmp_path / "cut" / "checkpoints" / "step=2.ckpt"
    checkpoint = read_checkpoint(path)
    checkpoint["rng_state"] = checkpoint["callbacks"].pop("TrainingRngStream")  # as the earlier version wrote it
    earlier = tmp_path / "earlier.ckpt"
    torch.save(checkpoint, earlier)

    L.seed_everything(123)
    module, data = tiny_module_and_data(tiny_chat_llama_dir)
    cpu_trainer(tmp_path / "cut", max_steps=4, every=2).fit(module, data, ckpt_path=earlier)
    resumed = adapter_state_dict(module.model)
    assert all(torch.equal(straight[k], resumed[k]) for k in straight)


def test_the_cli_logs_lr_throughput_and_memory_by_default(tiny_chat_llama_dir, tmp_path):
    cli.main(
        cli_args(
            tiny_chat_llama_dir, tmp_path, max_steps=3, every=3, checkpoint_dir=False, trainer__log_every_n_steps=1
        )[2:]
    )
    (metrics,) = Path(tmp_path).glob("lightning_logs/version_*/metrics.csv")
    rows = list(csv.DictReader(metrics.open()))
    for column in ("train/lr", "train/tokens_per_s", "train/peak_host_mem_gib"):
        values = [float(r[column]) for r in rows if r.get(column)]
        assert len(values) == 3 and all(v > 0 for v in values), column
