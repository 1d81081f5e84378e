"""The command line: `run` (the default), `report`, `pack` and `unpack`, with the flags of each."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import bench.fidelity

from .assets import pack, unpack
from .experiment import EXPERIMENT, REPO, SMOKE, default_folders
from .report import build_report
from .runs import run


def main(argv: list[str] | None = None) -> None:
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch loads, as qlora_lightning.cli does
    argv = list(sys.argv[1:] if argv is None else argv)
    command = argv.pop(0) if argv and argv[0] in ("run", "report", "pack", "unpack") else "run"
    parser = argparse.ArgumentParser(
        prog=f"python -m bench.fidelity {command}", description=bench.fidelity.__doc__.split("\n\n")[0]
    )
    if command == "pack":
        parser.add_argument("--assets", default=".cache/fidelity", help="folder to write a/ and b/ into")
        parser.add_argument("--part-mib", type=int, default=56, help="size of the GGUF's first part (in a/)")
        a = parser.parse_args(argv)
        pack(Path(a.assets), a.part_mib)
        return
    if command == "unpack":
        parser.add_argument("--assets", nargs="+", default=[".cache/fidelity", "/tmp/fidelity"])
        parser.add_argument("--site", default="/tmp/site", help="a folder on PYTHONPATH")
        a = parser.parse_args(argv)
        unpack([Path(p) for p in a.assets], Path(a.site))
        return
    parser.add_argument(
        "--out",
        default=None,
        help="results folder (default bench/results/fidelity[-<experiment>]; --smoke: <work>/results)",
    )
    if command == "report":
        a = parser.parse_args(argv)
        out = Path(a.out or REPO / "bench" / "results" / "fidelity")
        build_report(out)
        print((out / "fidelity.md").read_text())
        return
    parser.add_argument("--experiment", default=str(EXPERIMENT), help="the experiment file (arms, seeds, ...)")
    parser.add_argument(
        "--smoke",
        action="store_true",
        help=f"the experiment's CPU miniature (its `smoke` file; default {SMOKE.relative_to(REPO)})",
    )
    parser.add_argument(
        "--work", default=None, help="training runs and records (default runs/fidelity[-<experiment>][-smoke])"
    )
    parser.add_argument("--base", default=None, help="another base model than the experiment's")
    parser.add_argument("--seeds", type=int, nargs="+", default=None)
    parser.add_argument("--arms", nargs="+", default=None)
    parser.add_argument("--config", action="append", default=[], help="a train.py config applied after every arm's")
    parser.add_argument(
        "--arm-args", default="", help='train.py arguments for every arm, e.g. --arm-args="--trainer.max_steps 100"'
    )
    parser.add_argument("--only", nargs="+", choices=["base", "arms", "reference"], default=None)
    parser.add_argument(
        "--deadline-s",
        type=float,
        default=None,
        help="seconds from the start (default: the experiment's): later runs are skipped, the check stops there",
    )
    parser.add_argument("--archive", default=None, help="also write the results folder as this .tar.gz")
    parser.add_argument(
        "--jobs",
        type=int,
        default=1,
        help="training runs at once, each its own process, spread over the visible GPUs (sharing them past one each)",
    )
    parser.add_argument(
        "--skip-done",
        action="store_true",
        help="runs whose run_<arm>_seed<s>.json is already in --out are not trained again (continue over calls)",
    )
    parser.add_argument("--jobs-child", type=int, default=None, help=argparse.SUPPRESS)
    a = parser.parse_args(argv)
    if a.jobs < 1:
        raise SystemExit(f"--jobs must be at least 1, got {a.jobs}")
    work, out = default_folders(a.experiment, a.smoke)
    a.work = a.work or str(work)
    a.out = a.out or str(Path(a.work) / "results" if a.smoke else out)
    run(a)
