"""The command line: the paper's configs, overrides, a SIGKILL mid-training then `--ckpt_path last`, DDP."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import bitsandbytes as bnb
import pytest
import torch
from qlora_testing import REPO, cli_args, make_tiny_llama

from qlora_lightning.cli import run_lightning_cli

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
    assert isinstance(optimizer, bnb.optim.PagedAdamW32bit)
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


def test_sigkill_mid_training_then_resume_from_last_finishes(tiny_chat_llama_dir, tmp_path):
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
    done = subprocess.run(
        cli_args(tiny_chat_llama_dir, tmp_path, max_steps=killed_at + 4, every=2) + ["--ckpt_path", "last"],
        env=env,
        capture_output=True,
        text=True,
        cwd=tmp_path,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert "Restored all states" in done.stderr + done.stdout
    assert torch.load(last, weights_only=True)["global_step"] == killed_at + 4


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


def test_no_advice_to_install_a_package_that_fetches_code_from_a_hub(tmp_path):
    """bitsandbytes logs "Failed to load CPU gemm_4bit_forward from kernels-community … pip install kernels" at
    import on CPUs with AVX512-BF16; the `kernels` package fetches code at run time, so our commands drop it."""
    plain = subprocess.run([sys.executable, "-c", "import bitsandbytes"], capture_output=True, text=True, timeout=300)
    if "kernels-community" not in plain.stderr:
        pytest.skip("bitsandbytes gives that advice only on CPUs with AVX512-BF16")
    done = subprocess.run(
        [sys.executable, str(REPO / "train.py"), "fit", "--print_config"],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert "kernels" not in done.stderr + done.stdout


def test_a_setting_that_trains_nothing_is_refused_on_the_command_line(tiny_chat_llama_dir, tmp_path):
    done = subprocess.run(
        cli_args(tiny_chat_llama_dir, tmp_path, max_steps=1, every=1, model__lora__alpha=0),
        capture_output=True,
        text=True,
        cwd=tmp_path,
        timeout=300,
    )
    assert done.returncode != 0 and "lora.alpha must be a positive number" in done.stderr
    assert not list(tmp_path.glob("**/*.ckpt"))
