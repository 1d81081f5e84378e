"""Training throughput and peak memory of a QLoRA step: ours (QLoRAModule under a Lightning Trainer, as
`fit` runs it) beside the model card's stack (transformers 4-bit + PEFT + paged AdamW), on one GPU.

    python bench/train_throughput.py --shape 7b                 # writes a random bf16 7B to /tmp once
    python bench/train_throughput.py --shape 70b --stacks ours --batch 1
    python bench/train_throughput.py --shape 7b --stacks ours,ours-compiled,peer --profile
    python bench/train_throughput.py --shape 70b --stacks ours --batch 1 --devices 2 --strategy fsdp

With `--devices N` ours runs on N GPUs (DDP or FSDP, each rank its own micro-batch, so a step moves N times
the tokens) and the peak is the largest of the ranks'. Each stack runs in its own subprocess, one after the other on the same card, so peaks do not mix.
Both train on the same random batches (micro-batch × sequence, the last `--target` tokens labelled, as
source 384 + target 128) with r 64, alpha 16, dropout 0.1 on all 7 projections, paged AdamW 32-bit,
clipping 0.3 and non-reentrant gradient checkpointing. Warm-up steps are excluded; the median step
counts. Results are printed as a table and, with --record, appended to BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"  # CPU only for a dry run of the harness itself
STACKS = ["ours", "ours-compiled", "peer"]
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def batches(args, vocab: int, device) -> list[dict]:
    g = torch.Generator().manual_seed(0)
    out = []
    for _ in range(args.warmup + args.steps):
        ids = torch.randint(0, vocab, (args.batch, args.seq), generator=g)
        labels = ids.clone()
        labels[:, : args.seq - args.target] = -100
        out.append(
            {
                "input_ids": ids.to(device),
                "attention_mask": torch.ones_like(ids).to(device),
                "labels": labels.to(device),
            }
        )
    return out


def write_random_checkpoint(shape: str, folder: Path) -> None:
    """A random bf16 LLaMA-2-shaped checkpoint for the peer (which must load from disk), made on the GPU."""
    if (folder / "config.json").is_file():
        return
    from transformers import LlamaConfig, LlamaForCausalLM

    from qlora_lightning.model import RANDOM_SHAPES

    config = LlamaConfig(**RANDOM_SHAPES[shape], max_position_embeddings=4096, rms_norm_eps=1e-5)
    with torch.device(DEVICE):
        model = LlamaForCausalLM._from_config(config, dtype=torch.bfloat16)
    model.save_pretrained(folder, max_shard_size="5GB")
    del model
    torch.cuda.empty_cache()


def sync() -> None:
    if DEVICE == "cuda":
        torch.cuda.synchronize()


def peak_gib() -> float:
    return torch.cuda.max_memory_allocated() / 2**30 if DEVICE == "cuda" else float("nan")


def reset_peak() -> None:
    if DEVICE == "cuda":
        torch.cuda.reset_peak_memory_stats()


def run_ours(args, compile_layers: bool = False) -> dict:
    import lightning as L

    from qlora_lightning import AtomicCheckpointIO, QLoRAModule
    from qlora_lightning.fsdp import QLoRAFSDPStrategy
    from qlora_lightning.specs import LoraSpec, QuantSpec

    quant = QuantSpec(quant_storage="bfloat16") if args.strategy == "fsdp" else QuantSpec()
    strategy = (
        QLoRAFSDPStrategy(sharding_strategy="FULL_SHARD", cpu_offload=args.cpu_offload)
        if args.strategy == "fsdp"
        else args.strategy
    )
    module = QLoRAModule(
        args.model, quant=quant, lora=LoraSpec(r=64, alpha=16, dropout=0.1), compile_layers=compile_layers
    )
    t0 = time.perf_counter()
    times, losses = [], []
    extra = {}  # what the model holds at the first step, the CUDA profile table

    class Timer(L.Callback):
        prof = None

        def on_train_start(self, trainer, pl_module):
            if DEVICE == "cuda":
                extra["setup_peak_gib"] = peak_gib()  # loading and the strategy's set-up (FSDP sharding)
                extra["host_peak_gib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
                reset_peak()
                extra["allocated_at_start_gib"] = torch.cuda.memory_allocated() / 2**30
                storages = {
                    p.untyped_storage().data_ptr(): p.untyped_storage().nbytes() for p in trainer.model.parameters()
                }
                extra["parameter_gib"] = sum(storages.values()) / 2**30

        def on_train_batch_start(self, trainer, pl_module, batch, i):
            if args.profile and i == args.warmup:  # one profiled step, then timing as usual
                self.prof = torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA])
                self.prof.__enter__()
            sync()
            self.t = time.perf_counter()

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, i):
            sync()
            times.append(time.perf_counter() - self.t)
            losses.append(outputs["loss"].item())
            if self.prof is not None and i == args.warmup:
                self.prof.__exit__(None, None, None)
                extra["profile"] = self.prof.key_averages().table(sort_by="cuda_time_total", row_limit=30)

    data = batches(args, args.vocab, "cpu")
    loader = torch.utils.data.DataLoader(data, batch_size=None)
    trainer = L.Trainer(
        accelerator=DEVICE,
        devices=args.devices,
        strategy=strategy,
        max_steps=args.warmup + args.steps,
        precision="bf16-true",
        gradient_clip_val=0.3,
        plugins=[AtomicCheckpointIO()],
        callbacks=[Timer()],
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=tempfile.mkdtemp(prefix="train_throughput_"),  # the final adapter goes there
        limit_val_batches=0,
    )
    trainer.fit(module, train_dataloaders=loader)
    timed = times[args.warmup + (1 if args.profile else 0) :]
    name = "ours, compiled layers" if compile_layers else "ours"
    if args.devices > 1:
        name += f", {args.devices} GPUs {args.strategy}" + (" + CPU offload" if args.cpu_offload else "")
    return {
        "stack": name,
        "rank": trainer.global_rank,
        "step_s": timed,
        "losses": losses,
        "first_step_s": time.perf_counter() - t0 - sum(times[1:]),
        "peak_gib": peak_gib(),
        **extra,
    }


def run_peer(args) -> dict:
    import bitsandbytes as bnb
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    t0 = time.perf_counter()
    quant = BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=torch.bfloat16,
    )
    model = AutoModelForCausalLM.from_pretrained(
        args.model, quantization_config=quant, dtype=torch.bfloat16, device_map={"": 0} if DEVICE == "cuda" else DEVICE
    )
    model = prepare_model_for_kbit_training(
        model, use_gradient_checkpointing=True, gradient_checkpointing_kwargs={"use_reentrant": False}
    )
    model = get_peft_model(
        model,
        LoraConfig(r=64, lora_alpha=16, lora_dropout=0.1, target_modules=TARGETS, bias="none", task_type="CAUSAL_LM"),
    )
    model.train()
    optimizer = bnb.optim.PagedAdamW32bit(
        [p for p in model.parameters() if p.requires_grad], lr=2e-4, betas=(0.9, 0.999), weight_decay=0.0
    )
    times, losses = [], []
    reset_peak()
    for batch in batches(args, args.vocab, DEVICE):
        sync()
        t = time.perf_counter()
        with torch.autocast(DEVICE, dtype=torch.bfloat16):  # HF Trainer's bf16=True
            loss = model(**batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 0.3)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        sync()
        times.append(time.perf_counter() - t)
        losses.append(loss.item())
    return {
        "stack": "peer",
        "step_s": times[args.warmup :],
        "losses": losses,
        "first_step_s": time.perf_counter() - t0 - sum(times[1:]),
        "peak_gib": peak_gib(),
    }


def summary(ranks: list[dict], tokens: int) -> dict:
    """Rank 0's step times; tokens are those of all ranks; the peak is the largest rank's."""
    r = min(ranks, key=lambda x: x.get("rank", 0))
    step = statistics.median(r["step_s"])
    return {
        **r,
        "median_step_s": step,
        "tokens_per_s": tokens * len(ranks) / step,
        "peak_gib": max(x["peak_gib"] for x in ranks),
        "peak_gib_per_rank": [x["peak_gib"] for x in ranks],
    }


def record(rows: list[dict], args) -> str:
    import bitsandbytes
    import peft
    import transformers

    lines = [
        f"\n### {args.shape or args.model}, micro-batch {args.batch} × {args.seq} tokens per GPU "
        f"({dt.date.today().isoformat()})",
        f"{torch.cuda.get_device_name() if DEVICE == 'cuda' else 'CPU'}; torch {torch.__version__}, transformers {transformers.__version__}, "
        f"peft {peft.__version__}, bitsandbytes {bitsandbytes.__version__}; {args.steps} timed steps after "
        f"{args.warmup} warm-up; r 64 / α 16 / dropout 0.1, all 7 projections, paged AdamW 32-bit, clip 0.3, "
        "gradient checkpointing.",
        "",
        "| stack | s/step (median) | tokens/s (all GPUs) | peak GiB (largest GPU) | time to first step s | first-step loss |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['stack']} | {r['median_step_s']:.3f} | {r['tokens_per_s']:,.0f} | {r['peak_gib']:.1f} | "
            f"{r['first_step_s']:.0f} | {r['losses'][0]:.4f} |"
        )
    peer = next((r for r in rows if r["stack"] == "peer"), None)
    for ours in (r for r in rows if peer is not None and r is not peer):
        lines.append(
            f"\n{ours['stack']} / peer: {ours['tokens_per_s'] / peer['tokens_per_s']:.2f}× tokens/s, "
            f"{ours['peak_gib'] / peer['peak_gib']:.2f}× peak memory; first-step loss differs by "
            f"{abs(ours['losses'][0] - peer['losses'][0]) / abs(peer['losses'][0]):.1e} (relative)"
        )
    return "\n".join(lines) + "\n"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shape", choices=["7b", "13b", "70b"], help="LLaMA-2 shape with random weights")
    p.add_argument("--model", help="a checkpoint folder instead of --shape (both stacks load it)")
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--seq", type=int, default=512)
    p.add_argument("--target", type=int, default=128, help="labelled tokens at the end of each row")
    p.add_argument("--vocab", type=int, default=32000, help="token ids are drawn below this (LLaMA-2: 32000)")
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument(
        "--stacks",
        default="ours,peer",
        help="comma list of: ours, ours-compiled (compile_layers), peer (needs a checkpoint on disk)",
    )
    p.add_argument("--devices", type=int, default=1, help="GPUs for ours (the peer always runs on one)")
    p.add_argument("--strategy", choices=["auto", "ddp", "fsdp"], default="auto", help="Lightning strategy for ours")
    p.add_argument("--cpu-offload", action="store_true", help="with --strategy fsdp: keep the shards in host memory")
    p.add_argument("--profile", action="store_true", help="print the CUDA kernels of one of our steps (after warm-up)")
    p.add_argument("--record", action="store_true", help="append the table to BENCHMARKS.md")
    p.add_argument("--only", choices=STACKS, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.only:
        result = run_peer(args) if args.only == "peer" else run_ours(args, compile_layers=args.only == "ours-compiled")
        print("RESULT " + json.dumps(result))
        return
    stacks = args.stacks.split(",")
    if unknown := set(stacks) - set(STACKS):
        raise SystemExit(f"--stacks: unknown {sorted(unknown)}; choose from {STACKS}")
    if args.devices > 1 and "peer" in stacks:
        raise SystemExit("--devices applies to ours only: run the peer in a single-device call (--stacks peer)")
    if args.model is None:
        if "peer" not in stacks:
            args.model = f"random:{args.shape}"
        else:
            args.model = f"/tmp/random-{args.shape}"
            write_random_checkpoint(args.shape, Path(args.model))
    rows = []
    for stack in stacks:
        cmd = (
            [
                sys.executable,
                __file__,
                "--only",
                stack,
                "--model",
                args.model,
                "--batch",
                str(args.batch),
                "--seq",
                str(args.seq),
                "--target",
                str(args.target),
                "--steps",
                str(args.steps),
                "--vocab",
                str(args.vocab),
                "--warmup",
                str(args.warmup),
                "--devices",
                str(args.devices),
                "--strategy",
                args.strategy,
            ]
            + (["--profile"] if args.profile else [])
            + (["--cpu-offload"] if args.cpu_offload else [])
        )
        out = subprocess.run(
            cmd,
            capture_output=True,
            text=True,
            env={**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))},
        )
        results = [json.loads(line[len("RESULT ") :]) for line in out.stdout.splitlines() if line.startswith("RESULT ")]
        if out.returncode != 0 or not results:
            print(out.stdout[-3000:], out.stderr[-5000:], file=sys.stderr)
            raise SystemExit(f"{stack} failed (exit {out.returncode})")
        rows.append(summary(results, args.batch * args.seq))
        if rows[-1].get("profile"):
            print(f"CUDA kernels of one step, {rows[-1]['stack']}:\n{rows[-1].pop('profile')}")
    table = record(rows, args)
    print(table)
    for r in rows:
        if r.get("allocated_at_start_gib") is not None:
            print(
                f"{r['stack']}: per-GPU peaks {['%.1f' % g for g in r['peak_gib_per_rank']]} GiB; rank 0 holds "
                f"{r['allocated_at_start_gib']:.1f} GiB at the first step, {r['parameter_gib']:.1f} GiB of it parameters; "
                f"loading and set-up peaked at {r['setup_peak_gib']:.1f} GiB on the GPU, "
                f"{r['host_peak_gib']:.1f} GiB of host memory (rank 0's process)"
            )
    if args.record:
        with open(REPO / "BENCHMARKS.md", "a") as f:
            f.write(table)


if __name__ == "__main__":
    main()
