"""Resume: `--ckpt_path last` finds the run or fails, a finished run extends exactly, the command line decides
over the checkpoint, and untrusted or damaged checkpoints are refused by name."""

from __future__ import annotations

import json
import shutil
import textwrap

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from qlora_testing import FP32, cli_args, cpu_trainer, make_tiny_llama, tiny_module_and_data

from qlora_lightning import QLoRAModule
from qlora_lightning.adapters import adapter_state_dict
from qlora_lightning.cli import main
from qlora_lightning.resume import CheckpointError, find_last_checkpoint, read_checkpoint
from qlora_lightning.specs import LoraSpec


def fit(base, root, max_steps, every=2, *extra, **options):
    """`train.py fit` in this process (the same `cli.main` the command runs)."""
    main(cli_args(base, root, max_steps, every, **options)[2:] + list(extra))


def test_the_readme_resume_line_with_default_folders_continues_the_run(tiny_chat_llama_dir, tmp_path, capsys):
    """Without a fixed checkpoint folder each run gets a new `lightning_logs/version_<N>`: `last` must be found
    in the earlier one, not looked up in the new one (which trained from step 0 with exit code 0)."""
    fit(tiny_chat_llama_dir, tmp_path, 2, 2, checkpoint_dir=False)
    first = tmp_path / "lightning_logs" / "version_0" / "checkpoints"
    assert read_checkpoint(first / "last.ckpt")["global_step"] == 2
    fit(tiny_chat_llama_dir, tmp_path, 4, 2, "--ckpt_path", "last", checkpoint_dir=False)
    assert f"resuming from {first / 'last.ckpt'}" in capsys.readouterr().err
    assert read_checkpoint(first / "last.ckpt")["global_step"] == 4  # saves continue in the run's own folder
    assert sorted(p.name for p in first.iterdir() if p.suffix == ".ckpt") == ["last.ckpt", "step=2.ckpt", "step=4.ckpt"]
    assert not list(tmp_path.glob("lightning_logs/version_1/checkpoints"))


def test_resume_with_nothing_to_resume_fails_loudly(tiny_chat_llama_dir, tmp_path):
    with pytest.raises(SystemExit, match=f"no last.ckpt found .*{tmp_path}"):
        fit(tiny_chat_llama_dir, tmp_path, 2, 2, "--ckpt_path", "last", checkpoint_dir=False)
    assert not list(tmp_path.glob("**/*.ckpt"))
    with pytest.raises(CheckpointError, match="no last.ckpt"):
        find_last_checkpoint(tmp_path, tmp_path / "checkpoints")


@pytest.mark.parametrize("max_examples", [48, 16], ids=["mid-epoch", "epoch-end"])
def test_a_finished_run_extended_equals_the_straight_run_bitwise(tiny_chat_llama_dir, tmp_path, max_examples):
    """Train 4 steps to the end, extend `last` to 8: the adapters of 8 straight. The final step is no periodic
    save here (every 500), so `last.ckpt` is the end-of-training save. With 16 examples the 4 steps are one
    whole epoch, validated at its end."""
    L.seed_everything(0)
    module, data = tiny_module_and_data(tiny_chat_llama_dir, max_examples=max_examples)
    cpu_trainer(tmp_path / "straight", max_steps=8, every=500, val_check_interval=1.0).fit(module, data)
    straight = adapter_state_dict(module.model)

    L.seed_everything(0)
    module, data = tiny_module_and_data(tiny_chat_llama_dir, max_examples=max_examples)
    cpu_trainer(tmp_path / "cut", max_steps=4, every=500, val_check_interval=1.0).fit(module, data)
    last = find_last_checkpoint(tmp_path / "cut", tmp_path / "cut" / "checkpoints")
    assert read_checkpoint(last)["global_step"] == 4
    L.seed_everything(123)
    module, data = tiny_module_and_data(tiny_chat_llama_dir, max_examples=max_examples)
    cpu_trainer(tmp_path / "cut", max_steps=8, every=500, val_check_interval=1.0).fit(module, data, ckpt_path=last)
    extended = adapter_state_dict(module.model)
    assert all(torch.equal(straight[k], extended[k]) for k in straight)


def test_lightnings_own_end_of_training_save_would_not_extend_exactly(tiny_chat_llama_dir, tmp_path):
    """Why `ResumableCheckpoint` exists: with Lightning's `ModelCheckpoint` the same extension differs."""

    def trainer(root, max_steps):
        ckpt = ModelCheckpoint(dirpath=root / "checkpoints", filename="{step}", every_n_train_steps=500, save_last=True)
        return L.Trainer(
            default_root_dir=root,
            max_steps=max_steps,
            precision="32-true",
            accelerator="cpu",
            callbacks=[ckpt],
            enable_progress_bar=False,
            enable_model_summary=False,
            limit_val_batches=0,
            logger=False,
        )

    L.seed_everything(0)
    module, data = tiny_module_and_data(tiny_chat_llama_dir)
    trainer(tmp_path / "straight", 8).fit(module, data)
    straight = adapter_state_dict(module.model)
    L.seed_everything(0)
    module, data = tiny_module_and_data(tiny_chat_llama_dir)
    trainer(tmp_path / "cut", 4).fit(module, data)
    module, data = tiny_module_and_data(tiny_chat_llama_dir)
    trainer(tmp_path / "cut", 8).fit(module, data, ckpt_path=tmp_path / "cut" / "checkpoints" / "last.ckpt")
    extended = adapter_state_dict(module.model)
    assert not all(torch.equal(straight[k], extended[k]) for k in straight)


def test_the_final_step_is_saved_like_a_periodic_one(tiny_chat_llama_dir, tmp_path):
    module, data = tiny_module_and_data(tiny_chat_llama_dir)
    cpu_trainer(tmp_path, max_steps=4, every=3).fit(module, data)
    ckpt_dir = tmp_path / "checkpoints"
    assert sorted(p.name for p in ckpt_dir.iterdir()) == [
        "last",
        "last.ckpt",
        "step=3",
        "step=3.ckpt",
        "step=4",
        "step=4.ckpt",
    ]
    last = read_checkpoint(ckpt_dir / "last.ckpt")
    assert last["global_step"] == 4 and last["InstructionDataModule"]["consumed"] == 4 * 4
    progress = last["loops"]["fit_loop"]["epoch_loop.batch_progress"]["current"]
    assert progress["completed"] == progress["processed"] - 1  # taken inside the step, as a periodic save


def test_an_edited_checkpoint_cannot_switch_on_remote_code(tiny_chat_llama_dir, tmp_path):
    """A checkpoint whose hyper_parameters say trust_remote_code and name a base whose config ships code: the
    command line says no, so the code must never run (LightningCLI used to merge those over the command line)."""
    fit(tiny_chat_llama_dir, tmp_path / "run", 2)
    evil = tmp_path / "evil_base"
    shutil.copytree(tiny_chat_llama_dir, evil)
    marker = tmp_path / "code_ran"
    (evil / "evil.py").write_text(
        textwrap.dedent(f"""
        import pathlib
        pathlib.Path({str(marker)!r}).write_text("ran")
        from transformers import LlamaConfig
        class EvilConfig(LlamaConfig):
            pass
    """)
    )
    config = json.loads((evil / "config.json").read_text())
    config["auto_map"] = {"AutoConfig": "evil.EvilConfig"}
    (evil / "config.json").write_text(json.dumps(config))
    checkpoint = torch.load(tmp_path / "run" / "checkpoints" / "last.ckpt", weights_only=True)
    checkpoint["hyper_parameters"].update(trust_remote_code=True, base_model=str(evil))
    torch.save(checkpoint, tmp_path / "edited.ckpt")

    fit(
        tiny_chat_llama_dir,
        tmp_path / "run",
        3,
        2,
        "--ckpt_path",
        str(tmp_path / "edited.ckpt"),
        "--model.trust_remote_code",
        "false",
    )
    assert not marker.exists()
    assert read_checkpoint(tmp_path / "run" / "checkpoints" / "last.ckpt")["global_step"] == 3  # resumed our base


def test_a_lora_flag_that_contradicts_the_checkpoint_is_a_clear_error(tiny_chat_llama_dir, tmp_path):
    """`--model.lora.r 16` on an r 8 checkpoint used to train r 8 without a word."""
    fit(tiny_chat_llama_dir, tmp_path, 2)
    with pytest.raises(SystemExit, match="model.lora.r: checkpoint 8, this run 16"):
        fit(tiny_chat_llama_dir, tmp_path, 4, 2, "--ckpt_path", "last", "--model.lora.r", "16")
    assert read_checkpoint(tmp_path / "checkpoints" / "last.ckpt")["global_step"] == 2


def test_resume_checks_the_base_weights_not_their_name(tiny_chat_llama_dir, tmp_path, smollm2_tokenizer):
    module, data = tiny_module_and_data(tiny_chat_llama_dir)
    cpu_trainer(tmp_path / "run", max_steps=2).fit(module, data)
    checkpoint = read_checkpoint(tmp_path / "run" / "checkpoints" / "last.ckpt")

    same_weights = shutil.copytree(tiny_chat_llama_dir, tmp_path / "renamed")
    QLoRAModule(str(same_weights), quant=FP32, lora=LoraSpec(r=8)).on_load_checkpoint(checkpoint)

    other = make_tiny_llama(tmp_path / "other", tokenizer=smollm2_tokenizer, shard="2MB", seed=1)  # same shapes
    with pytest.raises(CheckpointError, match="model.base_model: the checkpoint trained on"):
        QLoRAModule(str(other), quant=FP32, lora=LoraSpec(r=8)).on_load_checkpoint(checkpoint)

    with pytest.warns(UserWarning, match="model.lora.dropout: checkpoint 0.1, this run 0.05"):
        QLoRAModule(str(tiny_chat_llama_dir), quant=FP32, lora=LoraSpec(r=8, dropout=0.05)).on_load_checkpoint(
            checkpoint
        )


@pytest.mark.parametrize("content", [b"", b"\x93NUMPY not a checkpoint at all" * 10], ids=["empty", "random-bytes"])
def test_a_damaged_checkpoint_is_named_before_the_model_loads(tiny_chat_llama_dir, tmp_path, content):
    bad = tmp_path / "bad.ckpt"
    bad.write_bytes(content)
    with pytest.raises(SystemExit, match=f"{bad}: (the file is empty|not a checkpoint this toolkit can read)"):
        fit(tiny_chat_llama_dir, tmp_path, 2, 2, "--ckpt_path", str(bad))
