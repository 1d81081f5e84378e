"""Training throughput and peak memory of a QLoRA step on one GPU: ours (QLoRAModule under a Lightning Trainer,
as `fit` runs it) beside the model card's stack (transformers 4-bit + PEFT + paged AdamW) and Unsloth.

    python bench/train_throughput.py --shape 7b                 # writes a random bf16 7B to /tmp once
    python bench/train_throughput.py --shape 70b --stacks ours --batch 1
    python bench/train_throughput.py --shape 7b --stacks ours,ours-compiled,peer --profile
    python bench/train_throughput.py --shape 7b --stacks ours-compiled,peer,unsloth --warmup 3
    python bench/train_throughput.py --shape 7b,13b --lengths orca --warmup 6 --steps 5 \
        --stacks ours-compiled-offload-packed,unsloth-packed,unsloth,ours-compiled-offload,peer,unsloth-packed
    python bench/train_throughput.py --shape 70b --stacks ours-compiled,ours-compiled-hoststates --batch 1 \
        --accumulate 8 --warmup 8 --steps 16 --device-memory     # 70B on one card: memory with the paged states
    python bench/train_throughput.py --shape 70b --stacks ours --batch 4 --devices 2 --strategy fsdp \
        --device-memory                                         # add --no-forward-prefetch for the plain path
    python bench/train_throughput.py --shape 70b --stacks ours --batch 4 --devices 2 --strategy one,fsdp,fsdp2 \
        --device-memory                         # one GPU, FSDP1 and FSDP2 on 2 GPUs, the same micro-batch per GPU
    python bench/train_throughput.py --shape 7b --stacks ours-compiled-offload --memory-peak /tmp/peaks  # what the
                                                # peak holds, by allocation site (bench/memory_peak.py)
    python bench/train_throughput.py --shape 7b --stacks ours-compiled-offload --inductor fallback_random=False
                                                # A/B of a compiler setting of our compiled layers
    python bench/train_throughput.py --shape tiny --stacks ours,peer --batch 2 --seq 64 --target 16  # CPU dry run

Stacks: `ours` with any of `-compiled` (compile_layers), `-offload` (offload_activations), `-packed`
(padding-free batches, below), `-onesync` (`qlora_lightning.optim.PagedAdamW32bitOneSync` named explicitly: the
module's default optimizer since 2026-12-02, so the same steps as without; earlier rows without it used bitsandbytes'
`PagedAdamW32bit`), `-hoststates` (the same with `states_on_host`: the optimizer states wait in host memory
between steps) and, with `-offload`, projection names (`-o_proj`, `-v_proj`, ...: `offload_outputs`, their outputs
kept in host memory for the recomputation, which skips their frozen matmul), e.g.
`ours-compiled-offload` or `ours-compiled-offload-o_proj-v_proj`; `peer` (the model
card's transformers + PEFT + bitsandbytes), `unsloth` (FastLanguageModel: NF4 + double quant, its fused LoRA
kernels and offloaded gradient checkpointing, `use_gradient_checkpointing="unsloth"`) and `unsloth-packed` (the same
on the packed rows ours gets, in its padding-free mode: `packed_seq_lengths` beside the row, as its SFTTrainer
collator adds them, which its attention runs through varlen kernels). Each stack runs in its own
subprocess, one after the other on the same card, so peaks do not mix and Unsloth's global patching of
transformers stays in its own process. The peer and Unsloth load a random bf16 LLaMA-2-shaped checkpoint that is
written to /tmp once (in a call over several shapes, `--shape 7b,13b`, it is deleted after its shape), with an
offline tokenizer beside it (Unsloth always loads one); ours loads the same folder when either of them runs, else
builds random weights directly in 4-bit. A stack named twice in `--stacks` runs twice ("run 2"): its spread within
one call. Unsloth is kept off the hub (offline
variables set before its import) and compiles into /tmp/unsloth_compiled_cache; its first step compiles for
~45 s, so keep >= 2 warm-up steps. Its wheels: `../shared/tools/gpu-wheels --unsloth`. `pip install unsloth` also
brings xformers on Linux x86-64, but xformers 0.0.35 from PyPI is built for torch 2.10 + CUDA 12.8 and cannot load
its CUDA kernels under the GPU image's torch 2.11 + CUDA 13 (`memory_efficient_attention` raises "xFormers wasn't
build with CUDA support"; it declares torch >= 2.10, so pip keeps torch 2.11 beside it), the image has no flash-attn,
and Unsloth's torch varlen path needs `enable_gqa` in `varlen_attn` (torch 2.12). So on torch 2.11 Unsloth's packed
rows run one SDPA call per example: the path its users on this torch get. Its row's note says which kernels it found
(`unsloth_attention`).

All stacks train on the same random batches with r 64, alpha 16, dropout 0.1 on all 7 projections, paged
AdamW 32-bit (lr 2e-4), clipping 0.3 and gradient checkpointing; the peer and Unsloth in one plain loop under
bf16 autocast (HF Trainer's bf16=True, which Unsloth's notebooks set). `--lengths fixed` (default): micro-batch ×
`--seq` tokens, the last `--target` labelled (as source 384 + target 128). `--lengths orca`: each micro-batch
holds `--batch` examples of OpenOrca-shaped lengths (bench/orca_shapes.py, cut to `--seq` - `--target` source
and `--target` target tokens), right-padded to the longest (attention_mask 0 and labels -100 on padding), the
last min(`--target`, length - 1) tokens of each labelled; the table then adds non-padding tokens/s and
examples/s. A `-packed` stack of ours gets the same examples end to end in one row instead: `position_ids` restart at 0
with each example, no attention_mask, no padding. `--lengths orca` batches the examples in random order, as a trainer
without length grouping does (HF's and TRL's default): about 30 % of a padded batch is padding. `--lengths
orca-grouped` batches them as the recipe's `group_by_length` does (the data module's sampler), where padding is about
1 %: the warm-up steps take the largest micro-batches, the timed ones a micro-batch at each of `--steps` quantiles of
the sizes, and rates are pooled over the timed steps (total ÷ time) instead of the median of per-step rates.

With `--devices N` ours runs on N GPUs (DDP, FSDP1 or FSDP2, each rank its own micro-batch, so a step moves N
times the tokens) and the peak is the largest of the ranks'. `--strategy` may list several (`one` is one GPU):
each of ours' stacks then runs under each, and each row is printed as it finishes. Warm-up steps are excluded; rates are the median of the
timed steps' rates (with fixed lengths and an odd step count: tokens per step / the median step time). Each row
is compared with the peer's and Unsloth's (non-padding tokens/s, peak memory, first-step loss). Results are
printed as a table and, with --record, appended to BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import datetime as dt
import importlib.metadata as md
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import torch
from orca_shapes import example_lengths

REPO = Path(__file__).resolve().parents[1]
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"  # CPU only for a dry run of the harness itself
# compile_layers, offload_activations, padding-free batches, qlora_lightning.optim.PagedAdamW32bitOneSync, and the
# same with states_on_host
OURS_OPTIONS = ("compiled", "offload", "packed", "onesync", "hoststates")
#: `--shape` values: the keys of `qlora_lightning.model.RANDOM_SHAPES` (tiny for a CPU dry run), named here because
#: the subprocesses must not import transformers before Unsloth
SHAPES = ("tiny", "7b", "13b", "70b")

#: `--strategy` values: Lightning's names, our two FSDP strategies, and one GPU
STRATEGIES = ("auto", "ddp", "fsdp", "fsdp2", "one")


def ours_options(stack: str) -> set[str] | None:
    """The options of an `ours[-compiled][-offload][-packed][-onesync][-hoststates][-o_proj]...` stack name (None
    otherwise); a projection's name (`-o_proj`, `-v_proj`, ...) keeps its output for the recomputation
    (`offload_outputs`, with `-offload`)."""
    name, *options = stack.split("-")
    return set(options) if name == "ours" and set(options) <= {*OURS_OPTIONS, *TARGETS} else None


def offload_outputs(options: set[str]) -> tuple[str, ...]:
    """`QLoRAModule(offload_outputs=...)` for the projection names among a stack's options, in `TARGETS`' order."""
    return tuple(
        ("mlp." if t in ("gate_proj", "up_proj", "down_proj") else "self_attn.") + t for t in TARGETS if t in options
    )


FROM_DISK = {"peer", "unsloth", "unsloth-packed"}  # stacks that load the checkpoint folder (so ours loads it too)
REFERENCES = ["peer", "unsloth", "unsloth-packed"]  # every row's rates and losses are compared with these rows'
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
PAD_ID = 0  # LLaMA-2 pads with <unk>, id 0
# Set before Unsloth is imported: it reaches for the hub and sends statistics otherwise, and compiles into the cwd.
UNSLOTH_ENV = {
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "HF_DATASETS_OFFLINE": "1",
    "HF_HUB_DISABLE_TELEMETRY": "1",
    "DO_NOT_TRACK": "1",
    "UNSLOTH_DISABLE_STATISTICS": "1",
    "UNSLOTH_COMPILE_LOCATION": "/tmp/unsloth_compiled_cache",
}


#: OpenOrca-shaped examples the `orca-grouped` micro-batches are drawn from: 4 mega-batches of 50 batches of 16, the
#: fewest the sampler groups in full mega-batches (its cap is a quarter of the examples).
GROUPED_POOL = 4 * 50 * 16


def step_lengths(args) -> list[list[int]]:
    """The example lengths of every step's micro-batch: `--batch` × `--seq`; OpenOrca-shaped (`--lengths orca`: in
    random order, as a trainer without length grouping batches them); or `orca-grouped`: micro-batches of the
    recipe's `group_by_length` order (the data module's `LengthGroupedSampler` over a pool of examples), the timed
    steps one micro-batch at each of `--steps` evenly spaced quantiles of their sizes, shuffled, so that a few timed
    steps stand for the whole epoch's mix. With OpenOrca-shaped lengths the warm-up runs the timed shapes first
    (`warmup_batches`)."""
    source_max = args.seq - args.target
    if args.lengths == "orca":
        lengths = example_lengths(args.steps * args.batch, source_max=source_max, target_max=args.target)
        timed = [lengths[i * args.batch : (i + 1) * args.batch] for i in range(args.steps)]
    elif args.lengths == "orca-grouped":
        from qlora_lightning.data.sampler import LengthGroupedSampler

        pool = example_lengths(GROUPED_POOL, source_max=source_max, target_max=args.target)
        batches = [
            [pool[i] for i in b]
            for b in LengthGroupedSampler(pool, args.batch, seed=0).indices(0).reshape(-1, args.batch)
        ]
        by_size = sorted(batches, key=sum)
        timed = [by_size[int((i + 0.5) * len(by_size) / args.steps)] for i in range(args.steps)]  # size quantiles
        np.random.default_rng(0).shuffle(timed)
        return warmup_batches(timed, args.warmup, largest=by_size[-1]) + timed  # the epoch's largest sets the peak
    else:
        return [[args.seq] * args.batch for _ in range(args.warmup + args.steps)]
    return warmup_batches(timed, args.warmup) + timed


def warmup_batches(timed: list[list[int]], n: int, largest: list[int] | None = None) -> list[list[int]]:
    """`n` warm-up micro-batches for timed steps of varying shapes: `largest` (default: the largest timed one) first,
    for the peak memory at once, then the timed ones in order, repeated as needed. Every stack pays for a shape it
    has not seen: compiled layers specialise and recompile (ours, Unsloth's compiled parts), pinned and device memory
    pools grow. A long run has seen them all after its first steps, so with `--warmup` above `--steps` the timed
    steps measure that steady state; warming up on one shape left those costs inside the timed steps (Unsloth 22.4
    against 27.5 examples/s at 7B, 2026-12-02)."""
    largest = largest or max(timed, key=sum)
    return ([largest] + [timed[i % len(timed)] for i in range(n - 1)])[:n]


def step_examples(args, vocab: int) -> list[list[torch.Tensor]]:
    """Every step's examples as 1-D tensors of random token ids, the same for every stack and layout (with fixed
    lengths, the ids the harness always drew: one (batch, seq) draw per step)."""
    g = torch.Generator().manual_seed(0)
    return [list(torch.randint(0, vocab, (sum(n),), generator=g).split(n)) for n in step_lengths(args)]


def labelled(n: int, target: int) -> int:
    """How many trailing tokens of an `n`-token example are labelled: `target`, but never its first token, which
    nothing in the example predicts (the padded layout's shift drops that label anyway; packed, the previous
    example's last token would predict it), so padded and packed batches have the same loss."""
    return min(target, n - 1)


def padded_batch(examples: list[torch.Tensor], target: int) -> dict[str, torch.Tensor]:
    """One row per example, right-padded to the longest: attention_mask 0 and labels -100 on the padding, labels
    on each example's last `labelled` tokens only."""
    width = max(len(x) for x in examples)
    input_ids = torch.full((len(examples), width), PAD_ID, dtype=torch.long)
    attention_mask = torch.zeros_like(input_ids)
    labels = torch.full_like(input_ids, -100)
    for i, x in enumerate(examples):
        n = len(x)
        start = n - labelled(n, target)
        input_ids[i, :n] = x
        attention_mask[i, :n] = 1
        labels[i, start:n] = x[start:]
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


def packed_batch(examples: list[torch.Tensor], target: int, max_length: int) -> dict[str, torch.Tensor]:
    """The padding-free layout: one (1, T) row of the examples end to end, `position_ids` restarting at 0 with each
    example, no attention_mask, labels on each example's last `labelled` tokens only (-100 on its source),
    `num_examples` (a 0-d tensor) and the boundaries for varlen attention (bounded by `max_length`, the longest an
    example can be), as the data module's `padding_free` collator gives it (without its rounding up)."""
    from qlora_lightning.data.tokenize import sequence_boundaries

    input_ids = torch.cat(examples)
    position_ids = torch.cat([torch.arange(len(x)) for x in examples])
    bounds = sequence_boundaries([len(x) for x in examples])
    labels = torch.full_like(input_ids, -100)
    end = 0
    for x in examples:
        end += len(x)
        k = labelled(len(x), target)
        labels[end - k : end] = x[len(x) - k :]
    return {
        "input_ids": input_ids[None],
        "position_ids": position_ids[None],
        "labels": labels[None],
        "num_examples": torch.tensor(len(examples)),
        "cu_seq_lens_q": bounds,
        "cu_seq_lens_k": bounds,
        "max_length_q": max_length,
        "max_length_k": max_length,
    }


def batches(args, vocab: int, device, packed: bool = False) -> list[dict]:
    """Every step's micro-batch on `device`: padded rows (`padded_batch`) or one packed row (`packed_batch`)."""
    from lightning.fabric.utilities.apply_func import move_data_to_device

    build = (lambda x, target: packed_batch(x, target, args.seq)) if packed else padded_batch
    return [move_data_to_device(build(x, args.target), device) for x in step_examples(args, vocab)]


def unsloth_packed_batch(batch: dict) -> dict[str, torch.Tensor]:
    """A packed row as Unsloth's padding-free path takes it: what TRL's padding-free collator gives (`input_ids`,
    `position_ids`, `labels` with each example's first token unlabelled) plus `packed_seq_lengths`, the examples'
    lengths, which Unsloth's own collator wrapper adds (`unsloth.utils.packing.enable_padding_free_metadata`) and
    its attention reads to run varlen kernels. The padding tail, if any, is a sequence of its own, as in ours."""
    bounds = batch["cu_seq_lens_q"]
    return {
        "input_ids": batch["input_ids"],
        "position_ids": batch["position_ids"],
        "labels": batch["labels"],
        "packed_seq_lengths": (bounds[1:] - bounds[:-1]).to(torch.int32),
    }


def batch_counts(batch: dict[str, torch.Tensor]) -> list[int]:
    """[tokens, non-padding tokens, examples] of a padded or packed micro-batch."""
    if "attention_mask" in batch:
        return [batch["input_ids"].numel(), int(batch["attention_mask"].sum()), len(batch["input_ids"])]
    if "packed_seq_lengths" in batch:  # Unsloth's packed row: no padding tail in the harness's rows
        return [batch["input_ids"].numel()] * 2 + [len(batch["packed_seq_lengths"])]
    return [batch["input_ids"].numel()] * 2 + [int(batch["num_examples"])]


def write_offline_tokenizer(folder: Path, vocab: int) -> None:
    """A `vocab`-entry WordLevel tokenizer beside the weights, once (<unk> = pad 0, <s> 1, </s> 2, as LLaMA-2):
    Unsloth's `from_pretrained` always loads one and the hub is out of reach. The harness itself feeds token ids."""
    if (folder / "tokenizer.json").is_file():
        return
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    specials = ["<unk>", "<s>", "</s>"]
    tokens = specials + [f"t{i}" for i in range(len(specials), vocab)]
    core = Tokenizer(models.WordLevel(vocab={t: i for i, t in enumerate(tokens)}, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=core,
        unk_token="<unk>",
        pad_token="<unk>",
        bos_token="<s>",
        eos_token="</s>",
        model_max_length=4096,
    )
    tokenizer.save_pretrained(folder)


def write_random_checkpoint(shape: str, folder: Path) -> bool:
    """A random bf16 LLaMA-2-shaped checkpoint for the stacks that load from disk, made on the GPU, and an offline
    tokenizer beside it; each written once. Whether the checkpoint was written now (not found from before)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from qlora_lightning.model import RANDOM_SHAPES

    config = LlamaConfig(**RANDOM_SHAPES[shape], max_position_embeddings=4096, rms_norm_eps=1e-5)
    written = not (folder / "config.json").is_file()
    if written:
        with torch.device(DEVICE):
            model = LlamaForCausalLM._from_config(config, dtype=torch.bfloat16)
        model.save_pretrained(folder, max_shard_size="5GB")
        del model
        torch.cuda.empty_cache()
    write_offline_tokenizer(folder, config.vocab_size)
    return written


def sync() -> None:
    """Wait for the GPU's queued work (nothing on the CPU)."""
    if DEVICE == "cuda":
        torch.cuda.synchronize()


class DeviceMemorySampler:
    """The card's memory in use (cudaMemGetInfo: total − free) above its level when this was made, sampled every
    `interval` s on a thread between `start()` and `stop()` (`--device-memory`). Unlike `max_memory_allocated` it
    counts what PyTorch's allocator does not hand out: bitsandbytes' paged optimizer states while they are on the
    card, the allocator's cache, library workspaces. Sampled, so a peak shorter than `interval` can be missed."""

    def __init__(self, enabled: bool, interval: float = 0.002) -> None:
        self.enabled = enabled and DEVICE == "cuda"
        self.interval, self.peak_gib, self._thread = interval, float("nan"), None
        if self.enabled:
            free, total = torch.cuda.mem_get_info()
            self._base, self._peak = total - free, 0

    def _sample(self) -> None:
        while not self._done.is_set():
            free, total = torch.cuda.mem_get_info()
            self._peak = max(self._peak, total - free - self._base)
            self._done.wait(self.interval)

    def start(self) -> None:
        if self.enabled and self._thread is None:
            self._done = threading.Event()
            self._thread = threading.Thread(target=self._sample, daemon=True)
            self._thread.start()

    def stop(self) -> float:
        """Stop sampling; the peak in GiB (NaN when not enabled)."""
        if self._thread is not None:
            self._done.set()
            self._thread.join()
            self._thread = None
            self.peak_gib = self._peak / 2**30
        return self.peak_gib


def peak_gib() -> float:
    """Peak memory PyTorch allocated on the GPU since the last reset, in GiB (NaN on the CPU)."""
    return torch.cuda.max_memory_allocated() / 2**30 if DEVICE == "cuda" else float("nan")


def reset_peak() -> None:
    """Start a new peak-memory measurement."""
    if DEVICE == "cuda":
        torch.cuda.reset_peak_memory_stats()


#: Kernel classes of a profiled step, first match wins (names as CUDA and Triton report them on Hopper).
KERNEL_CLASSES = (
    ("copies", ("memcpy", "memset")),  # host<->device (offloaded activations) and device copies
    ("fused elementwise (compiled, Triton)", ("triton",)),  # first: inductor's names quote the ops they fuse
    ("NF4 dequantization", ("dequantize",)),
    ("optimizer", ("optimizer", "adam")),
    ("attention", ("flash", "fmha", "attention", "cudnn")),
    ("GEMM", ("gemm", "xmma", "cutlass", "nvjet", "cublas", "wgmma", "matmul", "::mm", "addmm", "bmm")),
    ("reductions (eager)", ("reduce", "norm")),
    ("elementwise (eager)", ("elementwise", "vectorized", "unrolled", "native")),
)


def kernel_classes(prof) -> dict[str, float]:
    """Milliseconds of device time per kernel class in a profiled step (KERNEL_CLASSES; the rest is "other")."""
    totals: dict[str, float] = {}
    for event in prof.key_averages():
        # Device time of kernels and copies; the host's runtime calls (cudaLaunchKernel, ...) have none. The CPU dry
        # run profiles CPU operators instead.
        ms = (event.self_device_time_total if DEVICE == "cuda" else event.self_cpu_time_total) / 1e3
        if ms <= 0:
            continue
        name = event.key.lower()
        kind = next((k for k, words in KERNEL_CLASSES if any(w in name for w in words)), "other")
        totals[kind] = totals.get(kind, 0.0) + ms
    return dict(sorted(totals.items(), key=lambda kv: -kv[1]))


def step_profiler(args) -> torch.profiler.profile:
    """The profiler of one of our steps (`--profile`): the GPU's kernels (the CPU's operators in a dry run), and with
    `--trace` the host's side too, for a trace of what the GPU waits for (bench/idle_gaps.py reads it)."""
    activities = {torch.profiler.ProfilerActivity.CUDA if DEVICE == "cuda" else torch.profiler.ProfilerActivity.CPU}
    if args.trace:
        activities.add(torch.profiler.ProfilerActivity.CPU)
        Path(args.trace).mkdir(parents=True, exist_ok=True)
    return torch.profiler.profile(activities=list(activities), with_stack=args.trace_stack)


def profile_results(args, prof: torch.profiler.profile, step_s: float) -> dict:
    """Stop `prof` (`step_profiler`); its kernel table and kernel classes, with its trace written out (`--trace`)."""
    prof.__exit__(None, None, None)
    if args.trace:
        prof.export_chrome_trace(str(Path(args.trace) / f"{args.only}.json.gz"))
    return {
        "profile": prof.key_averages().table(sort_by="cuda_time_total", row_limit=30),
        "kernel_ms": {"step (wall)": step_s * 1e3, **kernel_classes(prof)},
    }


class MemoryPeakRecorder:
    """`--memory-peak`: records the allocator's history over one step (`step`) and writes what was live at its
    peak, by allocation site (`bench/memory_peak.py`), to `--memory-peak`/STACK.txt, with the generated code of the
    compiled graphs that allocated it beside (STACK-FILE.py)."""

    def __init__(self, args, step: int) -> None:
        self.folder = Path(args.memory_peak) if args.memory_peak else None
        self.name, self.step, self.start_bytes = args.only, step, 0

    def start(self, i: int) -> None:
        if self.folder is not None and i == self.step:
            sync()
            self.start_bytes = torch.cuda.memory_allocated()
            torch.cuda.memory._record_memory_history(context="alloc", stacks="python", max_entries=2_000_000)

    def stop(self, i: int) -> None:
        if self.folder is None or i != self.step:
            return
        from memory_peak import generated_sources, peak, report

        snapshot = torch.cuda.memory._snapshot()
        torch.cuda.memory._record_memory_history(enabled=None)
        self.folder.mkdir(parents=True, exist_ok=True)
        device = torch.cuda.current_device()
        text = report(snapshot, self.start_bytes, torch.cuda.max_memory_allocated(), device=device)
        (self.folder / f"{self.name}.txt").write_text(text)
        _, _, live = peak(snapshot["device_traces"][device], self.start_bytes)
        for source in generated_sources(live):  # named as in the report: the generated file's own name
            shutil.copy(source, self.folder / f"{self.name}-{Path(source).name}")


def run_ours(
    args,
    sampler: DeviceMemorySampler,
    compile_layers: bool = False,
    packed: bool = False,
    offload: bool = False,
    onesync: bool = False,
    hoststates: bool = False,
    kept: tuple[str, ...] = (),
) -> dict:
    """QLoRAModule under a Lightning Trainer, as `fit` runs it; `packed` feeds it `packed_batch`es, `offload` turns
    on offload_activations (and `kept` its offload_outputs), `onesync` steps with `PagedAdamW32bitOneSync` (same
    settings as the default), `hoststates` with it and `states_on_host=True`."""
    import lightning as L

    from qlora_lightning import AtomicCheckpointIO, QLoRAModule
    from qlora_lightning.fsdp import QLoRAFSDPStrategy
    from qlora_lightning.fsdp2 import QLoRAFSDP2Strategy
    from qlora_lightning.optim import PagedAdamW32bitOneSync
    from qlora_lightning.specs import LoraSpec, QuantSpec

    def one_sync_adamw(params):  # the default optimizer's settings (module.paged_adamw)
        return PagedAdamW32bitOneSync(params, lr=2e-4, betas=(0.9, 0.999), weight_decay=0.0, states_on_host=hoststates)

    quant = QuantSpec(quant_storage="bfloat16") if args.strategy == "fsdp" else QuantSpec()
    prefetch = not args.no_forward_prefetch
    strategy = {
        "fsdp": lambda: QLoRAFSDPStrategy(
            sharding_strategy="FULL_SHARD", cpu_offload=args.cpu_offload, forward_prefetch=prefetch
        ),
        "fsdp2": lambda: QLoRAFSDP2Strategy(cpu_offload=args.cpu_offload, forward_prefetch=prefetch),
    }.get(args.strategy, lambda: "auto" if args.strategy == "one" else args.strategy)()
    module = QLoRAModule(
        args.model,
        quant=quant,
        lora=LoraSpec(r=64, alpha=16, dropout=0.1),
        compile_layers=compile_layers,
        offload_activations=offload,
        offload_outputs=kept,
        **({"optimizer": one_sync_adamw} if onesync or hoststates else {}),
    )
    t0 = time.perf_counter()
    times, losses, counts = [], [], []
    graphs_before: list[int] = []  # graphs dynamo had compiled when each micro-batch started
    extra = {}  # what the model holds at the first step, the CUDA profile table

    memory = MemoryPeakRecorder(args, step=args.warmup + (1 if args.profile else 0))

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
            sampler.start()

        def on_train_batch_start(self, trainer, pl_module, batch, i):
            graphs_before.append(torch._dynamo.utils.counters["stats"]["unique_graphs"])
            if args.profile and i == args.warmup:  # one profiled step, then timing as usual
                self.prof = step_profiler(args)
                self.prof.__enter__()
            memory.start(i)
            sync()
            self.t = time.perf_counter()

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, i):
            sync()
            times.append(time.perf_counter() - self.t)
            losses.append(outputs["loss"].item() * args.accumulate)  # Lightning hands over the loss ÷ accumulation
            counts.append(batch_counts(batch))
            if self.prof is not None and i == args.warmup:
                extra.update(profile_results(args, self.prof, times[-1]))
            memory.stop(i)

    data = batches(args, args.vocab, "cpu", packed=packed)
    loader = torch.utils.data.DataLoader(data, batch_size=None)
    trainer = L.Trainer(
        accelerator=DEVICE,
        devices=args.devices,
        accumulate_grad_batches=args.accumulate,
        strategy=strategy,
        max_steps=(args.warmup + args.steps) // args.accumulate,  # optimizer steps: one pass over the batches
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
    sampler.stop()
    if compile_layers:  # graphs dynamo compiled in all, and during the timed steps (a compile there skews the rate)
        extra["graphs_compiled"] = torch._dynamo.utils.counters["stats"]["unique_graphs"]
        extra["graphs_compiled_timed"] = extra["graphs_compiled"] - graphs_before[args.warmup]
    skip = memory.step + (1 if args.memory_peak else 0)
    options = [
        o
        for o, on in (
            ("compiled layers", compile_layers),
            ("offloaded", offload),
            ("packed", packed),
            ("one sync", onesync and not hoststates),
            ("optimizer states on host", hoststates),
            ("outputs kept: " + " ".join(k.split(".")[-1] for k in kept), kept),
        )
        if on
    ]
    name = ", ".join(["ours", *options])
    if args.devices > 1:
        name += f", {args.devices} GPUs {args.strategy}" + (" + CPU offload" if args.cpu_offload else "")
        name += " without forward prefetch" if args.no_forward_prefetch else ""
    return {
        "stack": name,
        "rank": trainer.global_rank,
        "step_s": times[skip:],
        "counts": counts[skip:],
        "losses": losses,
        "first_step_s": time.perf_counter() - t0 - sum(times[1:]),
        "peak_gib": peak_gib(),
        "device_peak_gib": sampler.peak_gib,
        **extra,
    }


def train_manually(args, stack: str, model, data: list[dict], t0: float, sampler: DeviceMemorySampler) -> dict:
    """The peer's and Unsloth's loop, a step as HF Trainer runs it with bf16=True (autocast): paged AdamW 32-bit
    lr 2e-4, clipping 0.3. `t0` is when loading began (for the time to the first step)."""
    import bitsandbytes as bnb

    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = bnb.optim.PagedAdamW32bit(params, lr=2e-4, betas=(0.9, 0.999), weight_decay=0.0)
    times, losses = [], []
    reset_peak()
    sampler.start()
    for i, batch in enumerate(data):
        sync()
        t = time.perf_counter()
        with torch.autocast(DEVICE, dtype=torch.bfloat16):
            loss = model(**batch).loss
        (loss / args.accumulate).backward()  # HF Trainer's gradient accumulation
        if (i + 1) % args.accumulate == 0:
            torch.nn.utils.clip_grad_norm_(params, 0.3)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        sync()
        times.append(time.perf_counter() - t)
        losses.append(loss.item())
    return {
        "stack": stack,
        "step_s": times[args.warmup :],
        "counts": [batch_counts(b) for b in data[args.warmup :]],
        "losses": losses,
        "first_step_s": time.perf_counter() - t0 - sum(times[1:]),
        "peak_gib": peak_gib(),
        "device_peak_gib": sampler.stop(),
    }


def run_peer(args, sampler: DeviceMemorySampler) -> dict:
    """The model card's stack: transformers 4-bit (NF4, double quant, bf16 compute) + PEFT LoRA."""
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
    return train_manually(args, "peer", model, batches(args, args.vocab, DEVICE), t0, sampler)


def unsloth_attention() -> str:
    """Which attention kernels Unsloth found (read after its import) and the backend it picks for packed rows:
    xformers' block-diagonal kernel, flash-attn's varlen or torch >= 2.12's `varlen_attn` run them in one call;
    without any of them (the GPU image with torch 2.11) it makes one SDPA call per example. Printed in its row's
    note so that a table says which path was measured."""
    from unsloth.utils import attention_dispatch as dispatch

    found = [
        f"xformers {md.version('xformers')}" if dispatch.HAS_XFORMERS else "no xformers",
        "flash-attn" if dispatch.HAS_FLASH_ATTENTION else "no flash-attn",
        "torch varlen" if dispatch._TORCH_VARLEN_ATTN is not None else "no torch varlen",
    ]
    return "attention kernels: " + ", ".join(found) + f"; packed rows on {dispatch.select_attention_backend(True)}"


def run_unsloth(args, sampler: DeviceMemorySampler, packed: bool = False) -> dict:
    """Unsloth's FastLanguageModel: 4-bit NF4 + double quant, LoRA on the 7 projections with its fused kernels, its
    offloaded gradient checkpointing. Imported here only: it patches transformers, PEFT and TRL process-wide.
    `packed`: its padding-free mode on the same packed rows as ours (`unsloth_packed_batch`)."""
    if DEVICE != "cuda":
        raise SystemExit("unsloth: needs a CUDA GPU (its kernels are Triton); this is a CPU-only machine")
    for key, value in UNSLOTH_ENV.items():
        os.environ.setdefault(key, value)
    try:
        from unsloth import FastLanguageModel
    except Exception as e:
        raise RuntimeError(
            "unsloth could not be imported (error above). Build its wheels with `../shared/tools/gpu-wheels "
            "--unsloth` (unsloth 2026.10.9, unsloth_zoo, trl 1.15.0, cut_cross_entropy), carry .whl and install "
            "them with pip --no-index --target /tmp/site, PYTHONPATH=$PWD:/tmp/site, before this script"
        ) from e

    data = batches(args, args.vocab, DEVICE, packed=packed)
    data = [unsloth_packed_batch(b) for b in data] if packed else data
    t0 = time.perf_counter()
    model, _ = FastLanguageModel.from_pretrained(
        model_name=args.model,
        # Unsloth cuts longer rows, except packed ones (with packed_seq_lengths), whose examples are at most --seq
        max_seq_length=args.seq if packed else max(b["input_ids"].shape[1] for b in data),
        dtype=torch.bfloat16,
        load_in_4bit=True,
        use_gradient_checkpointing="unsloth",
        local_files_only=True,
    )
    model = FastLanguageModel.get_peft_model(
        model,
        r=64,
        lora_alpha=16,
        lora_dropout=0.1,
        target_modules=TARGETS,
        bias="none",
        use_gradient_checkpointing="unsloth",
        random_state=0,
    )
    FastLanguageModel.for_training(model)
    quant = getattr(model.config, "quantization_config", None)
    quant = quant.to_dict() if hasattr(quant, "to_dict") else quant or {}
    versions = ", ".join(f"{name} {md.version(name)}" for name in ("unsloth", "unsloth_zoo", "trl"))
    versions += f", {unsloth_attention()}"
    result = train_manually(args, "unsloth-packed" if packed else "unsloth", model, data, t0, sampler)
    result["note"] = (
        f"{versions}; base weights {quant.get('bnb_4bit_quant_type')}, double quant "
        f"{quant.get('bnb_4bit_use_double_quant')}; offloaded gradient checkpointing"
        + ("; padding-free rows with packed_seq_lengths (its SFTTrainer padding_free path)" if packed else "")
    )
    return result


def run_stack(args) -> dict:
    """Train the stack `--only` names, in this process."""
    sampler = DeviceMemorySampler(args.device_memory)  # its zero: the card before anything is loaded
    if args.only == "peer":
        return run_peer(args, sampler)
    if args.only in ("unsloth", "unsloth-packed"):
        return run_unsloth(args, sampler, packed=args.only == "unsloth-packed")
    options = ours_options(args.only)
    if args.inductor:
        from qlora_lightning.lora_autograd import COMPILE_OPTIONS

        COMPILE_OPTIONS.update(inductor_options(args.inductor))
    return run_ours(
        args,
        sampler,
        compile_layers="compiled" in options,
        packed="packed" in options,
        offload="offload" in options,
        onesync="onesync" in options,
        hoststates="hoststates" in options,
        kept=offload_outputs(options),
    )


def inductor_options(pairs: list[str]) -> dict[str, object]:
    """`--inductor` values (`KEY=VALUE`, VALUE a Python literal) as Inductor options, each checked against
    Inductor's config, so that a misspelt key fails here rather than being ignored or failing at the first compile."""
    import ast

    from torch._inductor import config

    options = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep:
            raise SystemExit(f"--inductor {pair!r}: expected KEY=VALUE, e.g. fallback_random=False")
        if not hasattr(config, key):
            raise SystemExit(f"--inductor {pair!r}: Inductor has no option {key!r}")
        try:
            options[key] = ast.literal_eval(value)
        except (ValueError, SyntaxError):
            raise SystemExit(f"--inductor {pair!r}: the value must be a Python literal (True, 3, 'ATEN')") from None
    return options


def summary(ranks: list[dict], accumulate: int = 1, pooled: bool = False) -> dict:
    """Rank 0's step times; each step's tokens, non-padding tokens and examples summed over the ranks (each its own
    micro-batch); rates are the median of the steps' rates, or with `accumulate` > 1 or `pooled` the timed
    micro-batches' sums over their time (whole accumulation windows, so each optimizer step counts once per window,
    as in training; `pooled` for micro-batches of very different sizes, `--lengths orca-grouped`, whose median rate
    would favour the short ones); the peak is the largest rank's."""
    r = min(ranks, key=lambda x: x.get("rank", 0))
    steps = r["step_s"]
    counts = [[sum(x["counts"][i][k] for x in ranks) for k in range(3)] for i in range(len(steps))]
    if accumulate > 1 or pooled:
        rates = [sum(c[k] for c in counts) / sum(steps) for k in range(3)]
    else:
        rates = [statistics.median(c[k] / t for c, t in zip(counts, steps, strict=True)) for k in range(3)]
    return {
        **r,
        "median_step_s": statistics.median(steps) if accumulate == 1 and not pooled else statistics.mean(steps),
        "tokens_per_s": rates[0],
        "real_tokens_per_s": rates[1],
        "examples_per_s": rates[2],
        "peak_gib": max(x["peak_gib"] for x in ranks),
        "device_peak_gib": max(x.get("device_peak_gib", float("nan")) for x in ranks),
        "peak_gib_per_rank": [x["peak_gib"] for x in ranks],
    }


def record(rows: list[dict], args) -> str:
    """The markdown table of `rows`: rates, peaks, first steps, and each row over the peer's and Unsloth's."""
    import bitsandbytes
    import peft
    import transformers

    orca = args.lengths.startswith("orca")
    if orca:
        lengths = [n for step in step_lengths(args)[args.warmup :] for n in step]  # the timed steps'
        order = "length-grouped (group_by_length)" if args.lengths == "orca-grouped" else "in random order"
        shape = (
            f"micro-batch {args.batch} OpenOrca-shaped examples {order} ({statistics.mean(lengths):.0f} tokens on "
            f"average, at most {args.seq}, the last {args.target} labelled) per GPU, right-padded"
        ) + (" (ours, packed: one row)" if any("packed" in r["stack"] for r in rows) else "")
    else:
        shape = f"micro-batch {args.batch} × {args.seq} tokens per GPU"
    refs = {name: r for name in REFERENCES for r in rows if r["stack"] == name}
    mean = args.accumulate > 1 or args.lengths == "orca-grouped"
    header = ["stack", "s/micro-batch (mean)" if mean else "s/step (median)", "tokens/s (all GPUs)"]
    header += ["non-padding tokens/s", "examples/s"] if orca else []
    header += ["peak GiB (largest GPU)"] + (["card's peak GiB in use (sampled)"] if args.device_memory else [])
    header += ["time to first step s", "first-step loss"]
    header += [f"÷ {name}: tokens/s, peak" for name in refs]
    lines = [
        f"\n### {args.shape or args.model}, {shape} ({dt.date.today().isoformat()})",
        f"{torch.cuda.get_device_name() if DEVICE == 'cuda' else 'CPU'}; torch {torch.__version__}, "
        f"transformers {transformers.__version__}, peft {peft.__version__}, bitsandbytes {bitsandbytes.__version__}; "
        f"{args.steps} timed steps after {args.warmup} warm-up"
        + (f" (micro-batches; an optimizer step every {args.accumulate})" if args.accumulate > 1 else "")
        + "; r 64 / α 16 / dropout 0.1, all 7 projections, "
        "paged AdamW 32-bit, clip 0.3, gradient checkpointing"
        + (f"; our compiled layers with Inductor options {', '.join(args.inductor)}" if args.inductor else "")
        + ".",
        "",
        "| " + " | ".join(header) + " |",
        "|" + "---|" * len(header),
    ]
    for r in rows:
        cells = [r["stack"], f"{r['median_step_s']:.3f}", f"{r['tokens_per_s']:,.0f}"]
        cells += [f"{r['real_tokens_per_s']:,.0f}", f"{r['examples_per_s']:.1f}"] if orca else []
        cells += [f"{r['peak_gib']:.1f}"] + ([f"{r['device_peak_gib']:.1f}"] if args.device_memory else [])
        cells += [f"{r['first_step_s']:.0f}", f"{r['losses'][0]:.4f}"]
        cells += [
            f"{r['real_tokens_per_s'] / ref['real_tokens_per_s']:.2f}× / {r['peak_gib'] / ref['peak_gib']:.2f}×"
            for ref in refs.values()
        ]
        lines.append("| " + " | ".join(cells) + " |")
    if refs:
        lines.append(f"\nRatios: {'non-padding ' if orca else ''}tokens/s and peak memory over the named stack's.")
    for name, ref in refs.items():
        loss = abs(ref["losses"][0])
        lines.append(
            f"First-step loss relative to {name}'s: "
            + ", ".join(
                f"{r['stack']} {abs(r['losses'][0] - ref['losses'][0]) / loss:.1e}" for r in rows if r is not ref
            )
        )
    lines += [f"- {r['stack']}: {r['note']}" for r in rows if r.get("note")]
    return "\n".join(lines) + "\n"


def main() -> None:
    """Parse the options; for each shape, run each stack in a subprocess (or, with --only, this one stack) and print
    the table."""
    p = _parser()
    args = p.parse_args()
    if args.only:  # a subprocess of the run below, given every option (Unsloth must come before transformers)
        print("RESULT " + json.dumps(run_stack(args)))
        return
    shapes = args.shape.split(",") if args.shape else [None]
    if unknown := sorted(set(shapes) - {None, *SHAPES}):
        p.error(f"--shape: unknown {unknown}; choose from {', '.join(SHAPES)} (a comma list runs each in turn)")
    if len(shapes) > 1 and args.model:
        p.error("give several --shape values or one --model, not both")
    failed = []
    for shape in shapes:
        failed += _run_shape(p, argparse.Namespace(**{**vars(args), "shape": shape}), keep_checkpoint=len(shapes) == 1)
    if failed:
        raise SystemExit(f"failed stacks: {', '.join(failed)}")


def _run_shape(p: argparse.ArgumentParser, args: argparse.Namespace, keep_checkpoint: bool) -> list[str]:
    """Every stack on one shape (or `--model`): the table printed (and with --record appended to BENCHMARKS.md);
    returns the runs that failed. Without `keep_checkpoint` (a call over several shapes) the random checkpoint this
    call wrote is deleted after its shape, so that only one is on disk at a time (13B: 26 GB)."""
    stacks, strategies = _checked_stacks(p, args)
    written = False
    if args.model is None:
        if not FROM_DISK & set(stacks):
            args.model = f"random:{args.shape}"
        else:
            args.model = f"/tmp/random-{args.shape}"
            written = write_random_checkpoint(args.shape, Path(args.model))
    rows, failed = _run_stacks(stacks, strategies, args)
    if written and not keep_checkpoint:
        shutil.rmtree(args.model)
    table = record(rows, args) if rows else ""
    _print_memory(rows)
    if args.record and rows:
        with open(REPO / "BENCHMARKS.md", "a") as f:
            f.write(table)
    return failed


def _parser() -> argparse.ArgumentParser:
    """The command line's options."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument(
        "--shape",
        help=f"LLaMA-2 shape with random weights, one of {', '.join(SHAPES)} (tiny: CPU), or a comma list of them, "
        "run one after the other in this call (each its own table)",
    )
    p.add_argument("--model", help="a checkpoint folder instead of --shape (every stack loads it)")
    p.add_argument("--batch", type=int, default=16, help="rows (examples) per micro-batch")
    p.add_argument("--seq", type=int, default=512, help="tokens per row; with --lengths orca the longest example")
    p.add_argument("--target", type=int, default=128, help="labelled tokens at the end of each row (example)")
    p.add_argument(
        "--lengths",
        choices=["fixed", "orca", "orca-grouped"],
        default="fixed",
        help="fixed: every row --seq tokens; orca: OpenOrca-shaped example lengths in random order, rows padded to "
        "the longest; orca-grouped: the same in the recipe's group_by_length batches",
    )
    p.add_argument("--vocab", type=int, help="token ids are drawn below this (default: the shape's, else 32000)")
    p.add_argument("--steps", type=int, default=5)
    p.add_argument(
        "--warmup",
        type=int,
        default=2,
        help="untimed micro-batches first; with OpenOrca-shaped lengths give more than --steps, so that every timed "
        "shape has been seen (warmup_batches)",
    )
    p.add_argument(
        "--stacks",
        default="ours,peer",
        help="comma list of: ours[-compiled][-offload][-packed] (compile_layers, offload_activations, padding-free "
        "batches; with -offload, projection names such as -o_proj-v_proj for offload_outputs), peer, unsloth (peer "
        "and unsloth load a checkpoint from disk)",
    )
    p.add_argument("--devices", type=int, default=1, help="GPUs for ours (the peer and Unsloth always run on one)")
    p.add_argument(
        "--strategy",
        default="auto",
        help="Lightning strategy for ours, or a comma list of them, each run in turn: auto, ddp, fsdp (FSDP1), fsdp2, "
        "one (one GPU whatever --devices says)",
    )
    p.add_argument(
        "--cpu-offload", action="store_true", help="with --strategy fsdp or fsdp2: keep the shards in host memory"
    )
    p.add_argument(
        "--no-forward-prefetch",
        action="store_true",
        help="with --strategy fsdp or fsdp2: turn off the strategy's forward_prefetch (the next unit's all-gather "
        "during this one's forward), to measure the plain path",
    )
    p.add_argument("--profile", action="store_true", help="print the CUDA kernels of one of our steps (after warm-up)")
    p.add_argument(
        "--trace",
        help="with --profile: write the profiled step of each of ours' stacks (host and GPU) as a Chrome trace to "
        "this folder (STACK.json.gz); bench/idle_gaps.py reads it",
    )
    p.add_argument(
        "--trace-stack", action="store_true", help="with --trace: record the host's Python stacks too (slows the host)"
    )
    p.add_argument(
        "--accumulate",
        type=int,
        default=1,
        help="micro-batches per optimizer step (70b.yaml: 64); --warmup and --steps then count micro-batches and "
        "must be multiples of it, and rates are taken over whole windows",
    )
    p.add_argument(
        "--device-memory",
        action="store_true",
        help="also sample the card's memory in use (paged optimizer states included, which PyTorch does not count)",
    )
    p.add_argument(
        "--memory-peak",
        help="write what is allocated at the peak of one of our steps after warm-up, by allocation site, to this "
        "folder (STACK.txt, bench/memory_peak.py); that step is left out of the rates. CUDA only",
    )
    p.add_argument(
        "--inductor",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="an Inductor option for our compiled layers on top of `lora_autograd.COMPILE_OPTIONS`, for an A/B of a "
        "compiler setting without editing the code (repeatable; e.g. fallback_random=False, "
        "coordinate_descent_tuning=True); the table's header names them",
    )
    p.add_argument("--record", action="store_true", help="append the table to BENCHMARKS.md")
    p.add_argument("--only", help=argparse.SUPPRESS)
    return p


def _checked_stacks(p: argparse.ArgumentParser, args: argparse.Namespace) -> tuple[list[str], list[str]]:
    """The stacks `--stacks` and the strategies `--strategy` name, after the options are checked against each other
    (`--vocab` filled in)."""
    if args.vocab is None:
        from qlora_lightning.model import RANDOM_SHAPES

        args.vocab = RANDOM_SHAPES[args.shape]["vocab_size"] if args.shape else 32000
    if args.shape is None and args.model is None:
        p.error("give --shape or --model")
    if args.accumulate > 1 and (args.warmup % args.accumulate or args.steps % args.accumulate or args.profile):
        p.error(f"--accumulate {args.accumulate}: --warmup and --steps must be multiples of it, without --profile")
    if (args.trace and not args.profile) or (args.trace_stack and not args.trace):
        p.error("--trace needs --profile, and --trace-stack needs --trace")
    if args.memory_peak and (DEVICE != "cuda" or args.accumulate > 1):
        p.error("--memory-peak records the CUDA allocator's history: a GPU and --accumulate 1")
    if args.lengths.startswith("orca") and args.target >= args.seq:
        p.error("--lengths orca: --seq must exceed --target (sources are cut to --seq minus --target tokens)")
    inductor_options(args.inductor)  # a bad --inductor fails before a checkpoint is written
    stacks = args.stacks.split(",")
    strategies = args.strategy.split(",")
    if unknown := sorted(set(strategies) - set(STRATEGIES)):
        raise SystemExit(f"--strategy: unknown {unknown}; choose from {', '.join(STRATEGIES)}")
    if unknown := sorted(s for s in stacks if s not in FROM_DISK and ours_options(s) is None):
        raise SystemExit(
            f"--stacks: unknown {unknown}; choose from peer, unsloth, unsloth-packed, "
            f"ours[-{']['.join(OURS_OPTIONS)}] (any of them), with -offload also projection names ({', '.join(TARGETS)})"
        )
    if args.devices > 1 and FROM_DISK & set(stacks):
        raise SystemExit("--devices applies to ours only: run the peer and Unsloth in a single-device call")
    return stacks, strategies


def _child_options(args: argparse.Namespace) -> list[str]:
    """The options each stack's subprocess is given: every measurement option of this call."""
    options = ["--model", args.model, "--lengths", args.lengths]
    for name in ("batch", "seq", "target", "steps", "vocab", "warmup", "accumulate"):
        options += [f"--{name}", str(getattr(args, name))]
    options += (["--profile"] if args.profile else []) + (["--cpu-offload"] if args.cpu_offload else [])
    options += (["--trace", args.trace] if args.trace else []) + (["--trace-stack"] if args.trace_stack else [])
    options += ["--no-forward-prefetch"] if args.no_forward_prefetch else []
    options += ["--device-memory"] if args.device_memory else []
    options += ["--memory-peak", args.memory_peak] if args.memory_peak else []
    options += [f"--inductor={pair}" for pair in args.inductor]
    return options


def _run_stacks(stacks: list[str], strategies: list[str], args: argparse.Namespace) -> tuple[list[dict], list[str]]:
    """Each stack under each strategy (the peer and Unsloth on one GPU) in its own process, a stack named twice run
    twice (its later rows marked "run 2", …): the rows measured and the runs that failed. The other stacks still run after a failure: one call on a lent GPU should not lose every
    row to one failure. The table so far is printed after every stack: a run stopped by a time limit still leaves
    its finished rows."""
    options = _child_options(args)
    rows, failed = [], []
    runs = [(stack, strategy) for stack in stacks for strategy in (strategies if stack not in FROM_DISK else ["one"])]
    for i, (stack, strategy) in enumerate(runs):
        devices = 1 if strategy == "one" else args.devices
        row = _run_in_subprocess(stack, strategy, devices, options, args)
        if row is None:
            failed.append(f"{stack} ({strategy})")
            continue
        if repeat := runs[:i].count((stack, strategy)):  # a stack named twice: its spread between runs of one call
            row["stack"] += f" (run {repeat + 1})"
        rows.append(row)
        if row.get("profile"):
            print(f"CUDA kernels of one step, {row['stack']}:\n{row.pop('profile')}")
            print("by class (ms):", json.dumps({k: round(v, 1) for k, v in row["kernel_ms"].items()}))
        print(f"after {stack} ({strategy}):{record(rows, args)}", flush=True)
    return rows, failed


def _run_in_subprocess(
    stack: str, strategy: str, devices: int, options: list[str], args: argparse.Namespace
) -> dict | None:
    """One stack under one strategy measured in its own process (`--only`), its ranks' results summarised; None,
    after printing its output, when it failed."""
    out = subprocess.run(
        [sys.executable, __file__, "--only", stack, "--strategy", strategy, "--devices", str(devices), *options],
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))},
    )
    results = [json.loads(line[len("RESULT ") :]) for line in out.stdout.splitlines() if line.startswith("RESULT ")]
    if out.returncode != 0 or not results:
        print(out.stdout[-3000:], out.stderr[-5000:], file=sys.stderr)
        print(f"{stack} ({strategy}) failed (exit {out.returncode})", file=sys.stderr, flush=True)
        return None
    return summary(results, args.accumulate, pooled=args.lengths == "orca-grouped")


def _print_memory(rows: list[dict]) -> None:
    """Where each multi-GPU stack's memory went (per-GPU peaks, parameters, set-up and host peaks)."""
    for r in rows:
        if r.get("allocated_at_start_gib") is not None:
            print(
                f"{r['stack']}: per-GPU peaks {[f'{g:.1f}' for g in r['peak_gib_per_rank']]} GiB; rank 0 holds "
                f"{r['allocated_at_start_gib']:.1f} GiB at the first step, "
                f"{r['parameter_gib']:.1f} GiB of it parameters; "
                f"loading and set-up peaked at {r['setup_peak_gib']:.1f} GiB on the GPU, "
                f"{r['host_peak_gib']:.1f} GiB of host memory (rank 0's process)"
                + (
                    f"; {r['graphs_compiled']} graphs compiled over all steps, {r['graphs_compiled_timed']} of them "
                    "during the timed steps"
                    if "graphs_compiled" in r
                    else ""
                )
            )


if __name__ == "__main__":
    main()
