"""Resume across a change of device count, end to end: save under 2-process DDP, resume on 1 process.

The global batch stays 4 (micro-batch 2 × 2 processes, then micro-batch 2 × 2 accumulation on one), and every
optimizer step must see the examples it sees in an uninterrupted 1-process run. The CLI runs (DDP in a
subprocess) with `StepRecorder`, imported from this file, writing what each step saw.
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import lightning as L
import torch
from qlora_testing import cli_args

from qlora_lightning.cli import main

HERE = Path(__file__).resolve().parent


class StepRecorder(L.Callback):
    """Appends `[global_step, examples]` for every training micro-batch to `<out_dir>/rank<global rank>.jsonl`.

    `global_step` before a micro-batch is the optimizer step it goes into; examples are unpadded input ids.
    """

    def __init__(self, out_dir: str):
        self.out_dir = Path(out_dir)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        examples = [
            ids[mask.bool()].tolist() for ids, mask in zip(batch["input_ids"], batch["attention_mask"], strict=True)
        ]
        self.out_dir.mkdir(parents=True, exist_ok=True)
        with open(self.out_dir / f"rank{trainer.global_rank}.jsonl", "a") as f:
            f.write(json.dumps([trainer.global_step, examples]) + "\n")


def train(base, root: Path, max_steps: int, *extra: str, **overrides) -> tuple[list[list], list[int]]:
    """Run `train.py fit` in `root` (16 examples, global batch 4: 4 steps per epoch); return the examples of
    each optimizer step (all ranks together, sorted) and the micro-batches each step took per rank. One process
    runs in this one (`cli.main`, what train.py runs); DDP, which starts its other ranks by running the command
    line again, in a subprocess."""
    recorder = {"class_path": "test_resume_world_size.StepRecorder", "init_args": {"out_dir": str(root / "seen")}}
    args = cli_args(base, root, max_steps=max_steps, every=3, data__max_examples=16, **overrides)
    args += [f"--trainer.callbacks+={json.dumps(recorder)}", *extra]
    root.mkdir(parents=True, exist_ok=True)
    if "trainer__devices" in overrides:
        env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(HERE), os.environ.get("PYTHONPATH", "")])}
        done = subprocess.run(args, capture_output=True, text=True, cwd=root, env=env, timeout=600)
        assert done.returncode == 0, done.stderr[-3000:]
    else:
        main(args[2:])
    steps: dict[int, list] = {}
    micro_batches: dict[tuple[int, int], int] = {}
    for rank_file in sorted((root / "seen").glob("rank*.jsonl")):
        for line in rank_file.read_text().splitlines():
            step, examples = json.loads(line)
            steps.setdefault(step, []).extend(examples)
            micro_batches[rank_file.name, step] = micro_batches.get((rank_file.name, step), 0) + 1
    return [sorted(steps[k]) for k in sorted(steps)], sorted(set(micro_batches.values()))


def test_save_on_two_ddp_processes_resume_on_one_with_accumulation(tiny_chat_llama_dir, tmp_path):
    one = dict(trainer__accumulate_grad_batches=2)  # micro-batch 2 × accumulation 2 × 1 process
    straight, _ = train(tiny_chat_llama_dir, tmp_path / "straight", 6, **one)
    assert len(straight) == 6 and all(len(step) == 4 for step in straight)

    # step 3: 3 micro-batches per DDP rank, mid-epoch and, on one process, mid-accumulation if not converted
    ddp, micro_batches = train(tiny_chat_llama_dir, tmp_path / "ddp", 3, trainer__devices=2, trainer__strategy="ddp")
    assert ddp == straight[:3] and micro_batches == [1]
    saved = torch.load(tmp_path / "ddp" / "checkpoints" / "step=3.ckpt", weights_only=True)
    data = saved["InstructionDataModule"]
    assert (data["consumed"], data["global_batch"], data["num_replicas"], data["accumulate"]) == (12, 4, 2, 1)

    resumed, micro_batches = train(
        tiny_chat_llama_dir,
        tmp_path / "resumed",
        6,
        "--ckpt_path",
        str(tmp_path / "ddp" / "checkpoints" / "step=3.ckpt"),
        **one,
    )
    assert resumed == straight[3:] and micro_batches == [2]  # crosses into epoch 1 at step 4
    last = torch.load(tmp_path / "resumed" / "checkpoints" / "last.ckpt", weights_only=True)
    reference = torch.load(tmp_path / "straight" / "checkpoints" / "last.ckpt", weights_only=True)
    assert last["global_step"] == reference["global_step"] == 6 and last["epoch"] == reference["epoch"] == 1
    assert last["InstructionDataModule"] == reference["InstructionDataModule"]
    batch_progress = "epoch_loop.batch_progress"
    assert last["loops"]["fit_loop"][batch_progress] == reference["loops"]["fit_loop"][batch_progress]
