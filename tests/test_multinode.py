"""Two nodes on one host: the README's multi-node line (`torchrun --nnodes 2 ... train.py fit ... --trainer.num_nodes
2`) run as two launcher processes, node ranks 0 and 1 over gloo, each with its own working folder and caches (the
node-local disks), checkpoints and logs on a folder both see (the cluster's shared file system)."""

from __future__ import annotations

import os
import socket
import subprocess
import sys

import pytest
import torch
from qlora_testing import REPO, cli_args


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch_two_nodes(base, shared, tmp_path, max_steps: int, *extra: str) -> list[str]:
    """Start both nodes' launchers at once and wait for them; each node's combined output."""
    port, procs = free_port(), []
    for node in (0, 1):
        home = tmp_path / f"node{node}"  # the node's local disk: its working folder and caches
        home.mkdir(exist_ok=True)
        env = {
            **os.environ,
            "HF_DATASETS_CACHE": str(home / "hf-datasets"),
            "QLORA_LIGHTNING_CACHE": str(home / "qlora-lightning"),
        }
        train_args = cli_args(base, shared, max_steps=max_steps, every=2)[2:]  # after `train.py`
        command = [
            sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc-per-node", "1",
            "--node-rank", str(node), "--master-addr", "127.0.0.1", "--master-port", str(port),
            str(REPO / "train.py"), *train_args,
            "--trainer.num_nodes", "2", "--trainer.devices", "1", "--trainer.strategy", "ddp",
            "--data.cache_dir", str(home / "data-cache"), "--trainer.log_every_n_steps", "1", *extra,
        ]  # fmt: skip
        procs.append(
            subprocess.Popen(command, cwd=home, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        )
    outputs = [p.communicate(timeout=900)[0] for p in procs]
    for node, (p, out) in enumerate(zip(procs, outputs, strict=True)):
        assert p.returncode == 0, f"node {node} failed:\n{out[-4000:]}"
    return outputs


@pytest.mark.slow
def test_two_nodes_train_checkpoint_once_and_resume(tiny_chat_llama_dir, tmp_path):
    shared = tmp_path / "shared"
    launch_two_nodes(tiny_chat_llama_dir, shared, tmp_path, max_steps=4)

    checkpoints = shared / "checkpoints"
    assert sorted(p.name for p in checkpoints.iterdir()) == [
        "last", "last.ckpt", "step=2", "step=2.ckpt", "step=4", "step=4.ckpt",
    ]  # fmt: skip
    state = torch.load(checkpoints / "last.ckpt", weights_only=True)
    assert state["global_step"] == 4
    assert state["InstructionDataModule"]["num_replicas"] == 2  # one global batch over both nodes' ranks
    for node in (0, 1):  # each node tokenized the data once, into its own cache
        assert list((tmp_path / f"node{node}" / "data-cache" / "qlora_lightning").glob("tokenized-*.arrow"))
    logs = list(tmp_path.rglob("metrics.csv"))
    assert logs == [shared / "lightning_logs" / "version_0" / "metrics.csv"]  # written by global rank 0 alone
    assert "train/loss" in logs[0].read_text()

    outputs = launch_two_nodes(tiny_chat_llama_dir, shared, tmp_path, 6, "--ckpt_path", "last")
    assert "Restored all states" in outputs[0]  # (Lightning says it on global rank 0)
    assert torch.load(checkpoints / "last.ckpt", weights_only=True)["global_step"] == 6
