"""DDP on N GPUs against one GPU at the same global batch: loss per step and tokens/s (scaling efficiency).

    python bench/ddp_scaling.py --devices 2 --tokenizer <folder with a tokenizer> [--hidden 2048 --layers 8]

Builds a random LLaMA-shaped bf16 checkpoint with the given tokenizer, then runs `train.py fit` twice on
the bundled sample with the same seed and global batch: 1 GPU × micro-batch B·N, and N GPUs × B. Each
rank holds its own 4-bit model on its own device. Prints the per-step losses of both runs and the
scaling efficiency (tokens/s on N GPUs ÷ N × one GPU's).
"""

from __future__ import annotations

import argparse
import csv
import statistics
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def make_model(folder: Path, tokenizer: str, hidden: int, layers: int) -> None:
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tok = AutoTokenizer.from_pretrained(tokenizer)
    config = LlamaConfig(
        hidden_size=hidden,
        intermediate_size=int(hidden * 2.6875),
        num_hidden_layers=layers,
        num_attention_heads=hidden // 128,
        num_key_value_heads=hidden // 128,
        vocab_size=len(tok),
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
    )
    torch.manual_seed(0)
    LlamaForCausalLM(config).to(torch.bfloat16).save_pretrained(folder)
    tok.save_pretrained(folder)


def run(model: Path, root: Path, devices: int, batch: int, steps: int) -> list[dict]:
    cmd = [
        sys.executable,
        str(REPO / "train.py"),
        "fit",
        "--model.base_model",
        str(model),
        "--data.dataset",
        "bundled:orca_sample_train",
        "--data.val_dataset",
        "bundled:orca_sample_val",
        "--data.max_examples",
        "null",
        "--data.batch_size",
        str(batch),
        "--trainer.devices",
        str(devices),
        "--trainer.strategy",
        "ddp" if devices > 1 else "auto",
        "--trainer.max_steps",
        str(steps),
        "--trainer.limit_val_batches",
        "0",
        "--trainer.log_every_n_steps",
        "1",
        "--seed_everything",
        "0",
        "--trainer.enable_progress_bar",
        "false",
        "--trainer.default_root_dir",
        str(root),
        "--checkpoint.every_n_train_steps",
        str(steps),
    ]
    subprocess.run(cmd, check=True)
    (metrics,) = root.glob("lightning_logs/version_*/metrics.csv")
    with metrics.open() as f:
        return [row for row in csv.DictReader(f) if row.get("train/loss")]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--devices", type=int, default=2)
    p.add_argument("--tokenizer", required=True)
    p.add_argument("--hidden", type=int, default=2048)
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--micro-batch", type=int, default=4, help="per GPU in the N-GPU run")
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--workdir", default="/tmp/ddp_scaling")
    args = p.parse_args()
    work = Path(args.workdir)
    model = work / "model"
    if not (model / "config.json").is_file():
        make_model(model, args.tokenizer, args.hidden, args.layers)
    one = run(model, work / "one", 1, args.micro_batch * args.devices, args.steps)
    many = run(model, work / f"n{args.devices}", args.devices, args.micro_batch, args.steps)
    print(f"| step | loss, 1 GPU | loss, {args.devices} GPUs |")
    print("|---|---|---|")
    for a, b in zip(one, many, strict=True):
        print(f"| {a['step']} | {float(a['train/loss']):.4f} | {float(b['train/loss']):.4f} |")
    tps = [statistics.median(float(r["train/tokens_per_s"]) for r in rows[len(rows) // 3 :]) for rows in (one, many)]
    print(
        f"\ntokens/s: 1 GPU {tps[0]:,.0f}; {args.devices} GPUs {tps[1]:,.0f}; "
        f"scaling efficiency {tps[1] / (args.devices * tps[0]):.2f}"
    )
    deltas = [abs(float(a["train/loss"]) - float(b["train/loss"])) for a, b in zip(one, many, strict=True)]
    print(f"mean |loss difference| over {len(deltas)} logged steps: {statistics.mean(deltas):.4f}")


if __name__ == "__main__":
    main()
