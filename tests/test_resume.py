"""Resume: `--ckpt_path last` finds the run or fails, a finished run extends exactly, the command line decides
over the checkpoint, and untrusted or damaged checkpoints are refused by name."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import textwrap
from pathlib import Path

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from qlora_testing import FP32, cli_args, cpu_trainer, make_tiny_llama, straight_run_adapters, tiny_module_and_data

from qlora_lightning import QLoRAModule
from qlora_lightning.adapters import STEP_KEY, adapter_state_dict, read_adapter
from qlora_lightning.atomic import WriteError
from qlora_lightning.cli import main
from qlora_lightning.resume import CheckpointError, find_last_checkpoint, read_checkpoint
from qlora_lightning.specs import LoraSpec


def fit(base, root, max_steps, every=2, *extra, **options):
    """`train.py fit` in this process (the same `cli.main` the command runs)."""
    main(cli_args(base, root, max_steps, every, **options)[2:] + list(extra))


@pytest.fixture(scope="module")
def two_step_run(tiny_chat_llama_dir, tmp_path_factory) -> Path:
    """The root of one `train.py fit` of 2 steps (its checkpoints in `<root>/checkpoints`), shared by the tests
    that read or edit its checkpoint; a test that trains on in it works on a copy."""
    root = tmp_path_factory.mktemp("two_step_run")
    fit(tiny_chat_llama_dir, root, 2)
    return root


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
    with pytest.raises(SystemExit, match=f"no checkpoint found \\(looked for last.ckpt or another .ckpt in {tmp_path}"):
        fit(tiny_chat_llama_dir, tmp_path, 2, 2, "--ckpt_path", "last", checkpoint_dir=False)
    assert not list(tmp_path.glob("**/*.ckpt"))
    with pytest.raises(CheckpointError, match="no checkpoint found"):
        find_last_checkpoint(tmp_path, tmp_path / "checkpoints")


def test_a_run_saved_with_bitsandbytes_optimizer_goes_on_bitwise_under_today_s_default(tiny_chat_llama_dir, tmp_path):
    """Checkpoints written before `PagedAdamW32bitOneSync` became the default optimizer hold the state of
    bitsandbytes' `PagedAdamW32bit` (the configs named it): extended under today's default, the run ends with the
    adapters of a straight run."""
    import bitsandbytes as bnb

    straight = straight_run_adapters(tiny_chat_llama_dir, tmp_path / "straight", 4, every=500)

    L.seed_everything(0)
    module, data = tiny_module_and_data(tiny_chat_llama_dir)
    module.optimizer_factory = lambda params: bnb.optim.PagedAdamW32bit(
        params, lr=2e-4, betas=(0.9, 0.999), weight_decay=0.0
    )  # what configs/*.yaml named before
    cpu_trainer(tmp_path / "cut", max_steps=2, every=500).fit(module, data)
    L.seed_everything(123)
    module, data = tiny_module_and_data(tiny_chat_llama_dir)
    trainer = cpu_trainer(tmp_path / "cut", max_steps=4, every=500)
    trainer.fit(module, data, ckpt_path=find_last_checkpoint(tmp_path / "cut", tmp_path / "cut" / "checkpoints"))
    assert type(trainer.optimizers[0]).__name__ == "PagedAdamW32bitOneSync"
    extended = adapter_state_dict(module.model)
    assert all(torch.equal(straight[k], extended[k]) for k in straight)  # Adam's moments came from the checkpoint


def test_last_resumes_a_newer_versioned_last_that_an_earlier_version_wrote(tmp_path, capsys):
    """A folder resumed by a version that kept Lightning's version counter has `last.ckpt` at the first run's step and
    the resumed run's later saves in `last-v1.ckpt`: `--ckpt_path last` takes the newer one, and says so."""
    folder = tmp_path / "checkpoints"
    folder.mkdir()
    for age, name in enumerate(["last-v1.ckpt", "last.ckpt", "step=10.ckpt"]):  # last-v1 newest, step=10 oldest
        (folder / name).write_bytes(b"")
        os.utime(folder / name, ns=(10**18 - age * 10**9, 10**18 - age * 10**9))
    assert find_last_checkpoint(tmp_path, folder) == folder / "last-v1.ckpt"
    assert f"taking {folder / 'last-v1.ckpt'}, written after last.ckpt" in capsys.readouterr().err
    os.utime(folder / "last.ckpt")  # now last.ckpt is the newest: the usual case, said nothing of
    assert find_last_checkpoint(tmp_path, folder) == folder / "last.ckpt"
    assert capsys.readouterr().err == ""
    (folder / "last.ckpt").unlink()
    (folder / "last-v1.ckpt").unlink()
    os.utime(folder / "step=10.ckpt")
    (folder / "last-v1.ckpt.tmp").write_bytes(b"")  # not a checkpoint name
    assert find_last_checkpoint(tmp_path, folder) == folder / "step=10.ckpt"


@pytest.mark.parametrize("max_examples", [48, 16], ids=["mid-epoch", "epoch-end"])
def test_a_finished_run_extended_equals_the_straight_run_bitwise(tiny_chat_llama_dir, tmp_path, max_examples):
    """Train 4 steps to the end, extend `last` to 8: the adapters of 8 straight. The final step is no periodic
    save here (every 500), so `last.ckpt` is the end-of-training save. With 16 examples the 4 steps are one
    whole epoch, validated at its end."""
    straight = straight_run_adapters(
        tiny_chat_llama_dir, tmp_path / "straight", 8, max_examples=max_examples, every=500, val_check_interval=1.0
    )

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


@pytest.mark.parametrize("folders", ["absolute", "relative-default"])
def test_a_run_whose_first_save_is_its_own_keeps_one_last_checkpoint_for_every_later_resume(
    tiny_chat_llama_dir, tmp_path, monkeypatch, folders
):
    """A run's first save was its final step (or a SIGTERM) before any periodic save: `last.ckpt` recorded no last
    checkpoint, so the resumed run wrote `last-v1.ckpt` beside it and a later `--ckpt_path last` went back to the
    first run's step (seen with the demo: SIGTERM at step 14, resumed to 40, `last.ckpt` still at step 14). With the
    demo's relative `default_root_dir` and default checkpoint folder, Lightning did not reload the record at all (the
    folder reads back absolute)."""
    monkeypatch.chdir(tmp_path)
    root = tmp_path if folders == "absolute" else Path("run")
    options = {} if folders == "absolute" else {"checkpoint_dir": False}
    fit(tiny_chat_llama_dir, root, 3, 5, **options)  # step 3 is no periodic step: its save is our own
    fit(tiny_chat_llama_dir, root, 6, 5, "--ckpt_path", "last", **options)  # periodic at 5, the final save at 6
    (folder,) = {p.parent for p in tmp_path.glob("**/step=6.ckpt")}
    assert sorted(p.name for p in folder.glob("last*")) == ["last", "last.ckpt"]
    assert read_checkpoint(find_last_checkpoint(tmp_path / root, folder))["global_step"] == 6
    assert read_adapter(folder / "last").metadata[STEP_KEY] == "6"  # its adapter folder too
    fit(tiny_chat_llama_dir, root, 7, 5, "--ckpt_path", "last", **options)
    assert read_checkpoint(folder / "last.ckpt")["global_step"] == 7 and not list(folder.glob("last-v*"))


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


def test_an_edited_checkpoint_cannot_switch_on_remote_code(tiny_chat_llama_dir, two_step_run, tmp_path):
    """A checkpoint whose hyper_parameters say trust_remote_code and name a base whose config ships code: the
    command line says no, so the code must never run (LightningCLI used to merge those over the command line)."""
    edited, marker = edited_checkpoint_asking_for_remote_code(tiny_chat_llama_dir, two_step_run, tmp_path)
    fit(tiny_chat_llama_dir, tmp_path / "run", 3, 2, "--ckpt_path", str(edited), "--model.trust_remote_code", "false")
    assert not marker.exists()
    assert read_checkpoint(tmp_path / "run" / "checkpoints" / "last.ckpt")["global_step"] == 3  # resumed our base


def test_a_lora_flag_that_contradicts_the_checkpoint_is_a_clear_error(tiny_chat_llama_dir, two_step_run, tmp_path):
    """`--model.lora.r 16` on an r 8 checkpoint used to train r 8 without a word."""
    run = shutil.copytree(two_step_run, tmp_path / "run")
    with pytest.raises(SystemExit, match="model.lora.r: checkpoint 8, this run 16"):
        fit(tiny_chat_llama_dir, run, 4, 2, "--ckpt_path", "last", "--model.lora.r", "16")
    assert read_checkpoint(run / "checkpoints" / "last.ckpt")["global_step"] == 2


def test_resume_checks_the_base_weights_not_their_name(tiny_chat_llama_dir, two_step_run, tmp_path, smollm2_tokenizer):
    checkpoint = read_checkpoint(two_step_run / "checkpoints" / "last.ckpt")

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


def edited_checkpoint_asking_for_remote_code(base, run: Path, tmp_path):
    """`run`'s last checkpoint with its `hyper_parameters` edited to say `trust_remote_code: true` and to name a
    copy of the base whose config maps AutoConfig to a .py that writes the returned marker file when it runs."""
    evil = shutil.copytree(base, tmp_path / "evil_base")
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
    checkpoint = read_checkpoint(run / "checkpoints" / "last.ckpt")
    checkpoint["hyper_parameters"].update(trust_remote_code=True, base_model=str(evil))
    torch.save(checkpoint, tmp_path / "edited.ckpt")
    return tmp_path / "edited.ckpt", marker


def test_load_from_checkpoint_takes_trust_remote_code_from_the_caller_only(
    tiny_chat_llama_dir, two_step_run, tmp_path, monkeypatch
):
    """`QLoRAModule.load_from_checkpoint(ckpt)`, Lightning's API that research scripts use, applied the stored
    `trust_remote_code`: the edited checkpoint's code ran. Only the caller may switch it on (shown last, so that
    the marker is known to work)."""
    edited, marker = edited_checkpoint_asking_for_remote_code(tiny_chat_llama_dir, two_step_run, tmp_path)
    module = QLoRAModule.load_from_checkpoint(edited)
    assert not marker.exists() and module.trust_remote_code is False
    assert module.base_model.endswith("evil_base")  # the checkpoint's base, loaded without its code
    trained = read_checkpoint(edited)["state_dict"]
    assert all(torch.equal(module.state_dict()[k], v) for k, v in trained.items())

    monkeypatch.setattr("transformers.dynamic_module_utils.HF_MODULES_CACHE", str(tmp_path / "hf_modules"))
    with contextlib.suppress(ValueError):  # the code ran; transformers builds no model of its config class
        QLoRAModule.load_from_checkpoint(edited, trust_remote_code=True)
    assert marker.read_text() == "ran"


def test_load_from_checkpoint_reads_the_file_with_weights_only_whatever_the_caller_says(tmp_path):
    """A `.ckpt` whose pickle calls a function when unpickled: refused by name, the function never called."""
    import pathlib

    marker = tmp_path / "unpickled"

    class Payload:
        def __reduce__(self):
            return pathlib.Path.write_text, (marker, "ran")

    torch.save({"state_dict": {}, "hyper_parameters": {"base_model": "x"}, "payload": Payload()}, tmp_path / "p.ckpt")
    with pytest.raises(CheckpointError, match="p.ckpt: not a checkpoint this toolkit can read"):
        QLoRAModule.load_from_checkpoint(tmp_path / "p.ckpt", weights_only=False)
    assert not marker.exists()


class Killed(BaseException):
    """What a SIGKILL at this point of a save does: nothing after it runs (and nothing catches it)."""


def test_an_adapter_folder_a_kill_left_behind_its_checkpoint_is_rewritten_when_the_run_starts_again(
    tiny_chat_llama_dir, tmp_path, monkeypatch, capsys
):
    """Killed between `last.ckpt` (step 4) and its `last/` folder: `last/` held step 2, only its metadata said so.
    Run again with `--ckpt_path last`, the folder is rewritten from the `.ckpt` (and, nothing being left to
    train, `last.ckpt` itself stays the file the run resumed from)."""
    from qlora_lightning import checkpoint as checkpoint_io

    write_folder = checkpoint_io._write_adapter_folder

    def killed_before_last_of_step_4(checkpoint, state, folder):
        if folder.name == "last" and checkpoint["global_step"] == 4:
            raise Killed
        write_folder(checkpoint, state, folder)

    monkeypatch.setattr(checkpoint_io, "_write_adapter_folder", killed_before_last_of_step_4)
    with pytest.raises(Killed):
        fit(tiny_chat_llama_dir, tmp_path, 4, 2)
    monkeypatch.undo()
    ckpts = tmp_path / "checkpoints"
    assert read_adapter(ckpts / "last").metadata[STEP_KEY] == "2"  # what the kill left
    last_ckpt = (ckpts / "last.ckpt").read_bytes()

    fit(tiny_chat_llama_dir, tmp_path, 4, 2, "--ckpt_path", "last")
    assert f"{ckpts / 'last'}: rewritten from last.ckpt (step 4)" in capsys.readouterr().err
    repaired, saved = read_adapter(ckpts / "last"), read_checkpoint(ckpts / "last.ckpt")["state_dict"]
    assert repaired.metadata[STEP_KEY] == "4" and repaired.state.keys() == {k[6:] for k in saved}
    assert all(torch.equal(repaired.state[k.removeprefix("model.")], v) for k, v in saved.items())
    assert (ckpts / "last.ckpt").read_bytes() == last_ckpt


def test_after_a_failed_first_save_of_last_the_resume_takes_the_run_s_newest_checkpoint(
    tiny_chat_llama_dir, tmp_path, monkeypatch, capsys
):
    """A full disk at the first save wrote `step=2.ckpt` but not `last.ckpt`; `--ckpt_path last` then said there
    was nothing to resume."""
    from qlora_lightning import checkpoint as checkpoint_io

    write_file = checkpoint_io.write_file

    def disk_full_at_last(path, write):
        if Path(path).name == "last.ckpt":
            raise WriteError(f"cannot write {path}: [Errno 28] No space left on device; nothing was written")
        return write_file(path, write)

    monkeypatch.setattr(checkpoint_io, "write_file", disk_full_at_last)
    with pytest.raises(WriteError):
        fit(tiny_chat_llama_dir, tmp_path, 4, 2, checkpoint_dir=False)
    monkeypatch.undo()
    ckpts = tmp_path / "lightning_logs" / "version_0" / "checkpoints"
    assert sorted(p.name for p in ckpts.glob("*.ckpt")) == ["step=2.ckpt"]

    fit(tiny_chat_llama_dir, tmp_path, 4, 2, "--ckpt_path", "last", checkpoint_dir=False)
    err = capsys.readouterr().err
    assert f"{ckpts} holds no last.ckpt; taking its newest checkpoint, step=2.ckpt" in err
    assert f"resuming from {ckpts / 'step=2.ckpt'}" in err
    assert read_checkpoint(ckpts / "last.ckpt")["global_step"] == 4
