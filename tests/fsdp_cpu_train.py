"""`train.py` with FSDP allowed on CPU processes (gloo), for tests on machines without GPUs.

Lightning refuses FSDP without a GPU, and passes FSDP no device on CPU, which FSDP then refuses: this
script lifts the first check and names the CPU as FSDP's device. Lightning's launcher starts the other
ranks by running this same script, so they get the same patches.
"""

import sys
from pathlib import Path

import torch
import torch.distributed.fsdp
from lightning.pytorch.trainer.connectors.accelerator_connector import _AcceleratorConnector

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from qlora_lightning.cli import main  # noqa: E402  (first: it sets up the process)

# isort: split
import qlora_lightning.fsdp  # noqa: E402, F401  (before the patch below: it must keep FSDP's own class)

_AcceleratorConnector._check_strategy_and_fallback = lambda self: None


class _CPUFullyShardedDataParallel(torch.distributed.fsdp.FullyShardedDataParallel):
    def __init__(self, *args, device_id=None, **kwargs):
        super().__init__(*args, device_id=device_id if device_id is not None else torch.device("cpu"), **kwargs)


torch.distributed.fsdp.FullyShardedDataParallel = _CPUFullyShardedDataParallel  # Lightning wraps the root with it

if __name__ == "__main__":
    main()
