"""The command line: the paper's configs, overrides, a SIGKILL or SIGTERM mid-training then `--ckpt_path last`, DDP,
and settings refused before the model loads."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from qlora_testing import REPO, cli_args, make_tiny_llama
from safetensors.torch import load_file

from qlora_lightning.cli import main, run_lightning_cli
from qlora_lightning.optim import PagedAdamW32bitOneSync

PAPER = {  # size: (base model, lr, dropout, steps, micro-batch × accumulation)
    "7b": ("meta-llama/Llama-2-7b-hf", 2e-4, 0.1, 10000, 16),
    "13b": ("meta-llama/Llama-2-13b-hf", 2e-4, 0.1, 10000, 16),
    "33b": ("huggyllama/llama-30b", 1e-4, 0.05, 5000, 32),
    "65b": ("huggyllama/llama-65b", 1e-4, 0.05, 2500, 64),
    "70b": ("meta-llama/Llama-2-70b-hf", 1e-4, 0.05, 2500, 64),
}


@pytest.mark.parametrize("size", sorted(PAPER))
def test_paper_configs_parse_into_the_recipe(size, tmp_path):
    base, lr, dropout, steps, batch = PAPER[size]
    cli = run_lightning_cli(
        ["--config", str(REPO / "configs" / f"{size}.yaml"), "--trainer.default_root_dir", str(tmp_path)], run=False
    )
    model, data, trainer = cli.model, cli.datamodule, cli.trainer
    assert model.base_model == base and data.hparams.tokenizer == base  # linked: one key names the model
    assert (model.lora.r, model.lora.alpha, model.lora.dropout) == (64, 16, dropout)
    assert model.lora.target_modules == "all-linear"
    assert (model.quant.quantize, model.quant.double_quant, model.quant.compute_dtype) == ("nf4", True, "bfloat16")
    assert model.gradient_checkpointing and model.compile_layers
    assert model.offload_activations == (size in ("7b", "13b"))  # measured at 7B and 13B so far
    assert trainer.max_steps == steps and trainer.gradient_clip_val == 0.3
    assert data.hparams.batch_size * trainer.accumulate_grad_batches == batch
    assert (data.hparams.source_max_len, data.hparams.target_max_len) == (384, 128)
    assert data.hparams.max_examples == 240000 and not data.hparams.train_on_source
    optimizer = model.optimizer_factory([torch.nn.Parameter(torch.zeros(2))])
    assert isinstance(optimizer, PagedAdamW32bitOneSync)  # bitsandbytes' paged AdamW, one launch a step
    assert optimizer.defaults["lr"] == lr and optimizer.defaults["betas"] == (0.9, 0.999)
    # 70B keeps the Adam states in host memory to fit 42 GiB of a 48 GB card (measured at 70B only)
    assert getattr(optimizer, "states_on_host", False) == (size == "70b")


def test_any_key_is_overridable_on_the_command_line(tmp_path):
    cli = run_lightning_cli(
        [
            "--config",
            str(REPO / "configs" / "7b.yaml"),
            "--model.lora.r",
            "16",
            "--data.batch_size",
            "4",
            "--trainer.accumulate_grad_batches",
            "4",
            "--model.optimizer.init_args.lr",
            "1e-4",
            "--checkpoint.every_n_train_steps",
            "100",
            "--trainer.default_root_dir",
            str(tmp_path),
        ],
        run=False,
    )
    assert cli.model.lora.r == 16 and cli.datamodule.hparams.batch_size == 4
    assert cli.model.optimizer_factory([torch.nn.Parameter(torch.zeros(1))]).defaults["lr"] == 1e-4
    assert cli.trainer.checkpoint_callback._every_n_train_steps == 100


def test_sigkill_mid_training_then_resume_from_last_finishes(tiny_chat_llama_dir, tmp_path, capsys):
    """Kill -9 the training process right after a checkpoint, then `--ckpt_path last` finishes the run."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(
        cli_args(tiny_chat_llama_dir, tmp_path, max_steps=400, every=2),
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        cwd=tmp_path,
    )
    last = tmp_path / "checkpoints" / "last.ckpt"
    deadline = time.time() + 240
    while not (tmp_path / "checkpoints" / "step=4.ckpt").exists():
        assert proc.poll() is None, "training died before its first checkpoints"
        assert time.time() < deadline, "no checkpoint within 4 minutes"
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)  # may land in the middle of writing the next checkpoint
    proc.wait()
    killed_at = torch.load(last, weights_only=True)["global_step"]
    assert 2 <= killed_at < 400  # last.ckpt is the newest complete save: step 4 or, mid-save, step 2
    main(cli_args(tiny_chat_llama_dir, tmp_path, max_steps=killed_at + 4, every=2)[2:] + ["--ckpt_path", "last"])
    assert f"resuming from {last}" in capsys.readouterr().err
    resumed = torch.load(last, weights_only=True)
    assert resumed["global_step"] == killed_at + 4 and resumed["InstructionDataModule"]["consumed"] == 2 * (
        killed_at + 4
    )


@pytest.mark.slow
def test_ddp_two_cpu_processes_with_compiled_checkpointed_layers_train_and_write_checkpoints_once(
    tiny_chat_llama_dir, tmp_path
):
    """The README's DDP line with the GPU configs' compiled and checkpointed layers, on CPU processes. Rank 256
    makes each layer's adapters larger than the 1 MB first gradient bucket, after which dynamo's DDPOptimizer
    would split a layer's graph (`module.compile_decoder_layers`; the GPU twin is below)."""
    done = subprocess.run(
        cli_args(
            tiny_chat_llama_dir,
            tmp_path,
            max_steps=4,
            every=2,
            trainer__devices=2,
            trainer__strategy="ddp",
            model__compile_layers="true",
            model__gradient_checkpointing="true",
            model__lora__r=256,
        ),
        capture_output=True,
        text=True,
        cwd=tmp_path,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    ckpts = sorted(p.name for p in (tmp_path / "checkpoints").iterdir())
    assert ckpts == ["last", "last.ckpt", "step=2", "step=2.ckpt", "step=4", "step=4.ckpt"]
    state = torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=True)
    assert state["global_step"] == 4
    # the saved position counts the samples of both ranks: 4 steps × micro-batch 2 × 2 ranks
    data_state = state["InstructionDataModule"]
    assert data_state["num_replicas"] == 2 and data_state["consumed"] == 4 * 2 * 2


@pytest.mark.gpu
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 CUDA GPUs")
def test_the_readme_ddp_line_with_the_7b_config_on_two_gpus(smollm2_tokenizer, tmp_path):
    """`train.py fit --config configs/7b.yaml --trainer.devices 2 --trainer.strategy ddp --data.batch_size 4` as
    the README writes it (compiled and checkpointed layers, bf16, paged AdamW), on a model whose layers hold
    more than the 1 MB first gradient bucket of adapters (hidden 1024, r 64), so that dynamo's DDPOptimizer
    would split them: that crashed the first backward (recomputed-metadata error) before the fix."""
    base = make_tiny_llama(tmp_path / "base", hidden=1024, intermediate=2816, tokenizer=smollm2_tokenizer, shard="50MB")
    args = [
        sys.executable,
        str(REPO / "train.py"),
        "fit",
        "--config",
        str(REPO / "configs" / "7b.yaml"),
        "--trainer.devices",
        "2",
        "--trainer.strategy",
        "ddp",
        "--data.batch_size",
        "4",
        "--model.base_model",
        str(base),
        "--data.dataset",
        "bundled:orca_sample_train",
        "--data.val_dataset",
        "bundled:orca_sample_val",
        "--data.max_examples",
        "null",
        "--trainer.max_steps",
        "3",
        "--trainer.limit_val_batches",
        "2",
        "--trainer.val_check_interval",
        "2",
        "--checkpoint.every_n_train_steps",
        "2",
        "--trainer.default_root_dir",
        str(tmp_path / "run"),
        "--trainer.enable_progress_bar",
        "false",
    ]
    done = subprocess.run(args, capture_output=True, text=True, cwd=tmp_path, timeout=900)
    assert done.returncode == 0, done.stderr[-4000:]
    (last,) = (tmp_path / "run").glob("lightning_logs/version_0/checkpoints/last.ckpt")
    state = torch.load(last, weights_only=True)
    assert state["global_step"] == 3 and all(torch.isfinite(v).all() for v in state["state_dict"].values())


def test_csv_logs_by_default_and_a_chosen_logger_is_kept(tmp_path):
    from lightning.pytorch.loggers import CSVLogger

    cli = run_lightning_cli(
        ["--config", str(REPO / "configs" / "7b.yaml"), "--trainer.default_root_dir", str(tmp_path)], run=False
    )
    assert isinstance(cli.trainer.logger, CSVLogger) and cli.trainer.logger.save_dir == str(tmp_path)
    cli = run_lightning_cli(
        [
            "--config",
            str(REPO / "configs" / "7b.yaml"),
            "--trainer.logger",
            "false",
            "--trainer.default_root_dir",
            str(tmp_path),
        ],
        run=False,
    )
    assert cli.trainer.logger is None


def test_a_setting_that_trains_nothing_is_refused_on_the_command_line(tiny_chat_llama_dir, tmp_path):
    with pytest.raises(ValueError, match="lora.alpha must be a positive number"):
        main(cli_args(tiny_chat_llama_dir, tmp_path, max_steps=1, every=1, model__lora__alpha=0)[2:])
    assert not list(tmp_path.glob("**/*.ckpt"))


def fails_before_the_model_loads(monkeypatch):
    """Make loading the model an error, so that a test sees its check come first."""

    def load_model(*args, **kwargs):
        raise AssertionError("the model was loaded before the settings were checked")

    monkeypatch.setattr("qlora_lightning.module.load_model", load_model)


LR = ["--model.optimizer", "bitsandbytes.optim.PagedAdamW32bit", "--model.optimizer.init_args.lr"]


@pytest.mark.parametrize(
    "flags, message",
    [
        (LR + ["0"], r"model.optimizer.init_args.lr \(the optimizer's learning rate\) is 0: it must be positive"),
        (LR + ["-1e-3"], r"model.optimizer.init_args.lr .*refuses its settings \(Invalid learning rate: -0.001\)"),
        (["--trainer.max_steps", "0"], "trainer.max_steps is 0, a run that trains nothing"),
        (["--trainer.max_epochs", "0"], "trainer.max_epochs is 0, a run that trains nothing"),
        (["--trainer.gradient_clip_val", "-1"], "trainer.gradient_clip_val is -1: Lightning then clips nothing"),
    ],
    ids=["lr-0", "lr-negative", "max_steps-0", "max_epochs-0", "clip-negative"],
)
def test_settings_that_would_train_nothing_are_refused_before_the_model_loads(
    tiny_chat_llama_dir, tmp_path, monkeypatch, flags, message
):
    """These ran, exited 0 and wrote a "final adapter"; a negative clip value switched clipping off silently, and
    `lr -1e-3` (not a plain decimal, so argparse took it for an option) got "expected one argument"."""
    fails_before_the_model_loads(monkeypatch)
    with pytest.raises(SystemExit, match=f"error: .*{message}"):
        main(cli_args(tiny_chat_llama_dir, tmp_path, max_steps=2, every=1)[2:] + flags)
    assert not list(tmp_path.glob("**/*.ckpt")) and not list(tmp_path.glob("**/adapter"))


@pytest.mark.parametrize("compute_dtype", ["float32", "float16"])
def test_mixed_precision_with_another_compute_dtype_is_refused_naming_both_keys(
    tiny_chat_llama_dir, tmp_path, monkeypatch, compute_dtype
):
    """`bf16-mixed` with float32 compute failed at the first step with "self and mat2 must have the same dtype"
    from lora_autograd.py, with float16 compute in torch's autocast. (`16-mixed` is the same rule with float16;
    on the CPU Lightning runs it as `bf16-mixed`.)"""
    fails_before_the_model_loads(monkeypatch)
    args = cli_args(tiny_chat_llama_dir, tmp_path, 2, 1, trainer__precision="bf16-mixed")
    with pytest.raises(
        SystemExit,
        match=f"trainer.precision 'bf16-mixed' computes in bfloat16 but model.quant.compute_dtype is '{compute_dtype}'",
    ):
        main(args[2:] + ["--model.quant.compute_dtype", compute_dtype])


def test_more_cpu_processes_than_cores_are_refused_before_any_starts(tiny_chat_llama_dir, tmp_path, monkeypatch):
    """`--trainer.devices 64` on 2 cores started 64 processes, 9 GB in 20 s, without a word."""
    import multiprocessing

    fails_before_the_model_loads(monkeypatch)
    devices = len(os.sched_getaffinity(0)) + 1
    args = cli_args(tiny_chat_llama_dir, tmp_path, 2, 1, trainer__devices=devices, trainer__strategy="ddp")
    with pytest.raises(SystemExit, match=f"trainer.devices {devices} on the CPU starts {devices} processes.*use "):
        main(args[2:])
    assert not multiprocessing.active_children() and not list(tmp_path.glob("lightning_logs/*"))


@pytest.mark.parametrize("key", ["checkpoint.dirpath", "trainer.default_root_dir"])
def test_a_folder_that_cannot_be_written_is_named_before_the_model_loads(
    tiny_chat_llama_dir, tmp_path, monkeypatch, key
):
    """A read-only checkpoint folder gave a raw PermissionError after training. The superuser (here and in CI)
    may write anywhere, so the folder here is one nobody can create: its parent is a file."""
    fails_before_the_model_loads(monkeypatch)
    (tmp_path / "a_file").write_text("")
    folder = tmp_path / "a_file" / "run"
    args = cli_args(
        tiny_chat_llama_dir, tmp_path / "root", 2, 1, checkpoint_dir=False, **{key.replace(".", "__"): folder}
    )
    with pytest.raises(SystemExit, match=f"error: cannot write {folder} \\({key}\\): .*Not a directory"):
        main(args[2:])


def test_sigterm_saves_then_exits_non_zero_and_the_resume_equals_the_straight_run_bitwise(
    tiny_chat_llama_dir, tmp_path
):
    """SIGTERM, what SLURM and Kubernetes send before they stop a job, ended the run with exit code 0 and nothing
    saved since the last periodic save: a scheduler recorded a pre-empted run as a success."""
    run, straight = tmp_path / "preempted", tmp_path / "straight"
    proc = subprocess.Popen(
        cli_args(tiny_chat_llama_dir, run, max_steps=100000, every=5),
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        cwd=tmp_path,
    )
    deadline = time.time() + 240
    while not (run / "checkpoints" / "step=5.ckpt").exists():
        assert proc.poll() is None, proc.stderr.read()[-3000:]
        assert time.time() < deadline, "no checkpoint within 4 minutes"
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    stderr = proc.communicate(timeout=120)[1]
    assert proc.returncode == 143, stderr[-3000:]
    stopped_at = torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)["global_step"]
    assert f"SIGTERM: training stopped after step {stopped_at}" in stderr and "--ckpt_path last" in stderr
    assert (run / "checkpoints" / f"step={stopped_at}.ckpt").is_file()  # saved as a periodic save would be
    assert not list(run.glob("lightning_logs/*/adapter"))  # not finished: no final adapter

    main(cli_args(tiny_chat_llama_dir, run, stopped_at + 3, 5)[2:] + ["--ckpt_path", "last"])
    main(cli_args(tiny_chat_llama_dir, straight, stopped_at + 3, 5)[2:])
    resumed = load_file(run / "lightning_logs" / "version_1" / "adapter" / "adapter_model.safetensors")
    expected = load_file(straight / "lightning_logs" / "version_0" / "adapter" / "adapter_model.safetensors")
    assert resumed.keys() == expected.keys() and all(torch.equal(resumed[k], expected[k]) for k in expected)


@pytest.mark.parametrize("exit_code", [None, 143])
def test_the_cli_ends_the_process_group_a_run_started_before_the_interpreter_exits(tmp_path, monkeypatch, exit_code):
    """A multi-process run's gloo group left to interpreter exit aborted the process now and then after a finished
    run ("terminate called without an active exception"): the CLI ends it itself, after a finished run and after
    a deliberate exit (SIGTERM's 143), but not after an unexpected error (another rank may be waiting)."""
    import torch.distributed as dist

    def a_run(args):  # stands in for a DDP run: the group Lightning starts, then the run's end
        dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
        if exit_code is not None:
            raise SystemExit(exit_code)

    monkeypatch.setattr("qlora_lightning.cli.run_lightning_cli", a_run)
    if exit_code is None:
        main(["fit"])
    else:
        with pytest.raises(SystemExit) as stopped:
            main(["fit"])
        assert stopped.value.code == exit_code
    assert not dist.is_initialized()


def test_the_cli_leaves_the_process_group_alone_after_an_unexpected_error(tmp_path, monkeypatch):
    import torch.distributed as dist

    def a_failing_run(args):
        dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
        raise RuntimeError("a rank failed")

    monkeypatch.setattr("qlora_lightning.cli.run_lightning_cli", a_failing_run)
    with pytest.raises(RuntimeError, match="a rank failed"):
        main(["fit"])
    assert dist.is_initialized()
    dist.destroy_process_group()
