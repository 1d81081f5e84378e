"""One training run of one arm and seed through train.py's CLI (configs only): eval loss and answer-letter loss
before and after, tokens/s and peak memory, then MMLU of its adapter."""

from __future__ import annotations

import contextlib
import hashlib
import json
import shlex
import shutil
import statistics
import sys
import time
from pathlib import Path

from .evaluation import answer_letter_loss, evaluate
from .experiment import is_task, shown
from .models import free_memory


def metrics_summary(metrics_csv: Path, skip_steps: int) -> dict:
    """Median tokens/s (steps after `skip_steps`, the first ones warm up) and peak memory from a run's CSV."""
    import csv

    tokens, peak_gpu, peak_host = [], [], []
    with open(metrics_csv, newline="") as f:
        for row in csv.DictReader(f):
            if row.get("train/tokens_per_s") and int(row["step"]) >= skip_steps:
                tokens.append(float(row["train/tokens_per_s"]))
            if row.get("train/peak_mem_gib"):
                peak_gpu.append(float(row["train/peak_mem_gib"]))
            if row.get("train/peak_host_mem_gib"):
                peak_host.append(float(row["train/peak_host_mem_gib"]))
    return {
        "tokens_per_s_median": statistics.median(tokens) if tokens else None,
        "peak_gpu_mem_gib": max(peak_gpu) if peak_gpu else None,
        "peak_host_mem_gib": max(peak_host) if peak_host else None,
    }


def adapter_fingerprint(model) -> str:
    """A hash of every LoRA A/B value: equal for two arms iff their adapters start from the same numbers."""
    digest = hashlib.sha256()
    for name, p in sorted(model.named_parameters()):
        if name.endswith((".lora_A", ".lora_B")):
            digest.update(name.encode())
            digest.update(p.detach().float().cpu().numpy().tobytes())
    return digest.hexdigest()[:16]


def train_arm(
    arm: str,
    seed: int,
    spec: dict,
    base: str,
    records: dict,
    work: Path,
    out: Path,
    arm_args: list,
    sharing: int = 1,
    own_cache: bool = False,
) -> dict:
    """One training run through train.py's CLI (configs only), its eval loss before and after, then MMLU (or, in
    the task experiment, the held-out exact match that the configs' `DemoReport` measured before and after).
    `sharing`: how many runs share its device at once (`--jobs`), recorded beside tokens/s; `own_cache`: tokenize
    into a cache of its own, for runs that go at the same time (`--jobs`), which would otherwise write one file."""
    import torch

    from qlora_lightning.cli import run_lightning_cli

    root = work / f"{arm}_seed{seed}"
    shutil.rmtree(root, ignore_errors=True)
    configs = spec["train"] + spec["arms"][arm] + spec["overlays"]
    args = [a for c in configs for a in ("--config", c)] + [
        "--seed_everything",
        str(seed),
        "--data.seed",
        str(seed),
        "--model.base_model",
        base,
        "--data.dataset",
        str(records["train"]),
        "--data.val_dataset",
        str(records["held_out"]),
        "--data.cache_dir",
        str(work / "data_cache" / (f"{arm}_seed{seed}" if own_cache else "")),
        "--trainer.default_root_dir",
        str(root),
        *arm_args,
    ]
    free_memory()
    print(f"== {arm}, seed {seed}: train.py fit {' '.join(shlex.quote(a) for a in args)}", flush=True)
    with _argv_alone():
        cli = run_lightning_cli(args, run=False)
    trainer, module, data = cli.trainer, cli.model, cli.datamodule
    start = time.perf_counter()
    (before,) = trainer.validate(module, data, verbose=False)
    init = adapter_fingerprint(module.model)
    task = is_task(spec)  # the answer letter and MMLU are the MMLU experiment's measures
    letter_before = None if task else answer_letter_loss(module, data, trainer.strategy.root_device)
    if torch.cuda.is_available():  # the logged peak is then this run's training alone
        torch.cuda.reset_peak_memory_stats()
    fit_start = time.perf_counter()
    trainer.fit(module, data)
    fit_seconds = time.perf_counter() - fit_start
    (after,) = trainer.validate(module, data, verbose=False)
    # bf16 before 004562d (off by ~2 %), float32 until the module summed through `held_out.LabelledLossSum`
    summed_in = str(module._held_out.sums().dtype).removeprefix("torch.")
    letter_after = None if task else answer_letter_loss(module, data, trainer.strategy.root_device)
    log_dir = Path(trainer.log_dir)
    quant, lora = module.quant, module.lora
    settings = {
        "quantize": quant.quantize,
        "double_quant": quant.double_quant if quant.quantize != "none" else None,
        "compute_dtype": quant.compute_dtype,
        "precision": str(trainer.precision),
        "lora": {"r": lora.r, "alpha": lora.alpha, "dropout": lora.dropout, "targets": str(lora.target_modules)},
        "lr": trainer.optimizers[0].defaults.get("lr"),
        "optimizer": type(trainer.optimizers[0]).__name__,
        "max_steps": trainer.max_steps,
        "batch_size": data.hparams.batch_size,
        "accumulate_grad_batches": trainer.accumulate_grad_batches,
        "template": data.hparams.template,
        "format": data.hparams.format,
        "source_max_len": data.hparams.source_max_len,
        "target_max_len": data.hparams.target_max_len,
        "gradient_checkpointing": module.gradient_checkpointing,
        "compile_layers": module.compile_layers,
        "train_records": len(data.train_data),
        "held_out_records": len(data.val_data),
        "configs": [shown(c) for c in configs],
        "extra_args": arm_args,
    }
    steps = trainer.global_step
    device = str(module.device)
    del cli, trainer, module, data
    free_memory()
    curves = out / "curves" / f"{arm}_seed{seed}"
    curves.mkdir(parents=True, exist_ok=True)
    shutil.copy(log_dir / "metrics.csv", curves / "metrics.csv")
    summary = metrics_summary(log_dir / "metrics.csv", skip_steps=min(10, steps // 4))
    if task:
        measured = task_measures(log_dir)
    else:
        mmlu = evaluate(
            base,
            str(log_dir / "adapter"),
            _quant_spec(settings),
            spec,
            out / f"mmlu_{arm}_seed{seed}.json",
            work / f"mmlu_{arm}_seed{seed}.log",
        )
        measured = {
            "answer_letter_loss_before": letter_before,
            "answer_letter_loss_after": letter_after,
            "mmlu_accuracy_mean_over_subjects": mmlu["accuracy_mean_over_subjects"],
        }
    result = {
        "arm": arm,
        "seed": seed,
        "device": device,
        "device_name": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
        "steps": steps,
        "eval_loss_before": before["val/loss"],
        "eval_loss_after": after["val/loss"],
        "eval_loss_summed_in": summed_in,
        "adapter_init_fingerprint": init,
        "fit_seconds": round(fit_seconds, 1),
        "runs_sharing_the_device": sharing,
        "run_seconds": round(time.perf_counter() - start, 1),
        **summary,
        **measured,
        "settings": settings,
        "log_dir": str(log_dir),
    }
    (out / f"run_{arm}_seed{seed}.json").write_text(json.dumps(result, indent=2) + "\n")
    print(
        f"  eval loss {result['eval_loss_before']:.4f} -> {result['eval_loss_after']:.4f}; fit {fit_seconds:.0f} s, "
        f"{summary['tokens_per_s_median'] or 0:,.0f} tokens/s",
        flush=True,
    )
    return result


def task_measures(log_dir: Path) -> dict:
    """Held-out exact match before and after training, as the run's `DemoReport` callback wrote them
    (`demo_report.json`), with the number of questions and one answer after training."""
    path = log_dir / "demo_report.json"
    if not path.is_file():
        raise FileNotFoundError(
            f"{path}: missing; the task experiment's train configs must add the qlora_lightning.demo.DemoReport "
            "callback (configs/fidelity/tasks-train.yaml does)"
        )
    report = json.loads(path.read_text())
    before, after = report["before"], report["after"]
    return {
        "exact_match_before": before["exact_match"],
        "exact_match_after": after["exact_match"],
        "exact_match_examples": after["n"],
        "example_after": {k: after[k] for k in ("question", "reference", "answer")},
    }


def _quant_spec(settings: dict):
    from qlora_lightning.specs import QuantSpec

    if settings["quantize"] == "none":
        return QuantSpec(quantize="none", compute_dtype=settings["compute_dtype"])
    return QuantSpec(
        quantize=settings["quantize"], double_quant=settings["double_quant"], compute_dtype=settings["compute_dtype"]
    )


def arm_quant(arm: str, spec: dict, base: str, arm_args: list, work: Path):
    """The arm's base storage (`QuantSpec`) as its configs resolve (parsed only: no model is loaded)."""
    from qlora_lightning.cli import run_lightning_cli

    configs = spec["train"] + spec["arms"][arm] + spec["overlays"]
    args = [a for c in configs for a in ("--config", c)] + ["--model.base_model", base, *arm_args]
    args += ["--trainer.accelerator", "cpu", "--trainer.logger", "false", "--trainer.precision", "32-true"]
    args += ["--trainer.default_root_dir", str(work / "parse")]
    with _argv_alone():
        return run_lightning_cli(args, run=False).model.quant


@contextlib.contextmanager
def _argv_alone():
    """LightningCLI given `args` warns when the process also has command-line arguments (this script's)."""
    saved = sys.argv
    sys.argv = saved[:1]
    try:
        yield
    finally:
        sys.argv = saved
