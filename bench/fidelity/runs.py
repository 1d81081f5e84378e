"""The experiment's stages in order (base MMLU, the training runs, the scorer check), one run after another or
`--jobs` at once spread over the visible GPUs, with a deadline, `--skip-done` and an archive after each stage."""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
import tarfile
import time
from datetime import datetime, timezone
from pathlib import Path

from .evaluation import evaluate
from .experiment import NOTE, TASK_NOTE, is_task, load_experiment, load_split, repo_path, shown, smoke_of
from .models import resolve_base
from .records import write_records, write_task_records
from .reference import reference_check
from .report import build_report
from .training import arm_quant, train_arm

#: What a `--jobs` child runs: this package as a folder (`python bench/fidelity ...`).
PACKAGE = Path(__file__).resolve().parent


def already_done(args, arm: str, seed: int) -> bool:
    """With `--skip-done`: whether `--out` has this run's results already (from an earlier call of the same
    experiment, which the device's time limit cut short); said once, so a skipped run is never silent."""
    done = args.skip_done and (Path(args.out) / f"run_{arm}_seed{seed}.json").is_file()
    if done:
        print(f"== {arm}, seed {seed}: skipped, its results are in {args.out} (--skip-done)", flush=True)
    return done


def visible_gpus() -> list[str]:
    """The CUDA devices this process may use, as `CUDA_VISIBLE_DEVICES` entries for a child (none on the CPU)."""
    import torch

    if not torch.cuda.is_available():
        return []
    listed = [d.strip() for d in os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if d.strip()]
    return (listed or [str(i) for i in range(torch.cuda.device_count())])[: torch.cuda.device_count()]


def run_sharing_the_device(
    args, spec: dict, deadline: float | None, deadline_s: float | None, work: Path, finished
) -> dict:
    """Every (seed, arm) run in its own process, `args.jobs` at once: a 135M model leaves most of an H200 idle, so
    several runs share it in the time of one. With several GPUs visible, each child is given the one that runs the
    fewest (`CUDA_VISIBLE_DEVICES`), so `--jobs` equal to the GPU count trains one run per GPU, unshared. Each child
    is this script with `--only arms --seeds s --arms a`; its output goes to `<work>/<arm>_seed<s>.log`.
    `finished()` is called after each run that ends well (the report and archive, so that a call stopped at its
    limit keeps the runs done). Returns each run's wall time."""
    devices = visible_gpus()
    per_device = -(-args.jobs // max(len(devices), 1))  # what each run's tokens/s are shared with, at most
    options = ["--experiment", args.experiment, "--work", args.work, "--out", args.out, f"--arm-args={args.arm_args}"]
    options += [x for c in args.config for x in ("--config", c)] + (["--base", args.base] if args.base else [])
    options += ["--smoke"] if args.smoke else []
    waiting = [(seed, arm) for seed in spec["seeds"] for arm in spec["arms"] if not already_done(args, arm, seed)]
    running, timings, longest = {}, {}, 0.0
    while waiting or running:
        while waiting and len(running) < args.jobs:
            seed, arm = waiting.pop(0)
            if deadline is not None and time.monotonic() + longest > deadline:
                print(f"== {arm}, seed {seed}: skipped, the deadline ({deadline_s} s) would pass", flush=True)
                continue
            log = work / f"{arm}_seed{seed}.log"
            command = [sys.executable, str(PACKAGE), "--only", "arms", "--seeds", str(seed), "--arms", arm, *options]
            env, gpu = dict(os.environ), None
            if devices:
                gpu = min(devices, key=lambda d: sum(r[3] == d for r in running.values()))
                env["CUDA_VISIBLE_DEVICES"] = gpu
            with open(log, "w") as f:
                child = subprocess.Popen(
                    [*command, "--jobs-child", str(per_device)], stdout=f, stderr=subprocess.STDOUT, env=env
                )
            running[(seed, arm)] = (child, time.monotonic(), log, gpu)
            where = f" on GPU {gpu}" if gpu is not None else ""
            print(f"== {arm}, seed {seed}: started{where} (log {log})", flush=True)
        time.sleep(1)
        for (seed, arm), (child, start, log, _) in list(running.items()):
            if child.poll() is None:
                continue
            del running[(seed, arm)]
            if child.returncode != 0:
                for other, *_ in running.values():
                    other.kill()
                raise SystemExit(f"{arm}, seed {seed} failed (exit {child.returncode}):\n{log.read_text()[-3000:]}")
            timings[f"{arm}_seed{seed}"] = round(time.monotonic() - start, 1)
            longest = max(longest, timings[f"{arm}_seed{seed}"])
            print(f"== {arm}, seed {seed}: done in {timings[f'{arm}_seed{seed}']:.0f} s", flush=True)
            finished()
    return timings


def run(args) -> None:
    """The experiment `args` names, stage after stage (`--only` picks some), its results and report in `--out`."""
    started = time.monotonic()
    spec = _experiment(args)
    deadline_s = args.deadline_s if args.deadline_s is not None else spec["deadline_s"]
    deadline = started + deadline_s if deadline_s else None
    arm_args = shlex.split(args.arm_args)
    out, work = Path(args.out), Path(args.work)
    out.mkdir(parents=True, exist_ok=True)
    work.mkdir(parents=True, exist_ok=True)
    stages = set(args.only or ["base", "arms", "reference"])

    base = resolve_base(args.base or spec["base_model"], work)
    records = {"train": work / "records" / "train.jsonl", "held_out": work / "records" / "held_out.jsonl"}
    if args.jobs_child:  # one run of a --jobs parent, which wrote the records and experiment.json
        (arm,), (seed,) = list(spec["arms"]), spec["seeds"]
        train_arm(arm, seed, spec, base, records, work, out, arm_args, sharing=args.jobs_child, own_cache=True)
        return
    if is_task(spec):  # no MMLU there: the runs measure held-out exact match themselves
        stages &= {"arms"}
        counts = write_task_records(spec["task"], records)
        data = {"note": TASK_NOTE, "task": spec["task"], "comparisons": spec["comparisons"]}
        said = f"records: {counts['train']} training, {counts['held_out']} held out (generated task); base {base}"
    else:
        counts, data, said = _mmlu_records(spec, records, base)
    meta_file = out / "experiment.json"
    meta = _updated_meta(meta_file, args, spec, data, counts, arm_args)
    meta_file.write_text(json.dumps(meta, indent=2) + "\n")
    print(said, flush=True)
    timings = {}

    def archive() -> None:
        if args.archive:
            write_archive(out, Path(args.archive))

    def finished() -> None:  # after each stage and each run: a call stopped at its limit keeps what it did
        build_report(out)
        archive()

    if "base" in stages:
        timings.update(_base_mmlu(spec, base, arm_args, work, out))
        archive()
    if "arms" in stages and args.jobs > 1:
        timings.update(run_sharing_the_device(args, spec, deadline, deadline_s, work, finished))
    elif "arms" in stages:
        timings.update(_runs_in_turn(args, spec, base, records, arm_args, deadline, deadline_s, finished))
    if "reference" in stages:
        timings.update(_reference(base, spec, out, deadline))
    meta["timings_s"] = {**meta.get("timings_s", {}), **timings, "total": round(time.monotonic() - started, 1)}
    meta_file.write_text(json.dumps(meta, indent=2) + "\n")
    build_report(out)
    archive()
    print((out / "fidelity.md").read_text())
    print(f"results in {out} ({time.monotonic() - started:.0f} s)")


def _experiment(args) -> dict:
    """The experiment file (or its smoke variant) with the command line's `--seeds`, `--arms` and `--config`."""
    spec = load_experiment(smoke_of(args.experiment) if args.smoke else args.experiment)
    if args.seeds:
        spec["seeds"] = args.seeds
    if args.arms:
        unknown = sorted(set(args.arms) - set(spec["arms"]))
        if unknown:
            raise SystemExit(f"unknown arms {unknown}; the experiment has {sorted(spec['arms'])}")
        spec["arms"] = {a: spec["arms"][a] for a in args.arms}
    spec["overlays"] += [str(repo_path(c)) for c in args.config]
    return spec


def _updated_meta(meta_file: Path, args, spec: dict, data: dict, counts: dict, arm_args: list[str]) -> dict:
    """experiment.json's contents with this call added: a run of some arms or seeds (--arms, --seeds) adds to
    those already in `out`; the card, versions, date and command line are this call's."""
    import lightning
    import torch
    import transformers

    meta = json.loads(meta_file.read_text()) if meta_file.is_file() else {}
    meta.update(
        {
            **data,
            "experiment_file": shown(spec["file"]),
            "base_model": args.base or spec["base_model"],
            "records": counts,
            "arms": {**meta.get("arms", {}), **{a: [shown(c) for c in files] for a, files in spec["arms"].items()}},
            "overlays": [shown(c) for c in spec["overlays"]],
            "arm_args": arm_args,
            "seeds": sorted(set(meta.get("seeds", [])) | set(spec["seeds"])),
            "device_name": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
            "versions": {
                "torch": torch.__version__,
                "transformers": transformers.__version__,
                "lightning": lightning.__version__,
                "bitsandbytes": _version("bitsandbytes"),
            },
            "date": datetime.now(timezone.utc).strftime("%Y-%m-%d"),
            "commands": [*meta.get("commands", []), " ".join(shlex.quote(a) for a in sys.argv)],
        }
    )
    return meta


def _base_mmlu(spec: dict, base: str, arm_args: list[str], work: Path, out: Path) -> dict:
    """The base's MMLU as each arm stores it (the "before" of each arm); returns each evaluation's wall time."""
    timings = {}
    for arm in spec["arms"]:
        t = time.perf_counter()
        print(f"== MMLU of the base as the {arm} arm stores it", flush=True)
        quant = arm_quant(arm, spec, base, arm_args, work)
        evaluate(base, None, quant, spec, out / f"mmlu_{arm}_base.json", work / "mmlu.log")
        timings[f"mmlu_{arm}_base"] = round(time.perf_counter() - t, 1)
    return timings


def _runs_in_turn(
    args, spec: dict, base: str, records: dict, arm_args: list[str], deadline, deadline_s, finished
) -> dict:
    """Every (seed, arm) run one after another in this process, skipping those the deadline would cut (the
    longest run so far estimates the next one); `finished()` after each. Returns each run's wall time."""
    out, work = Path(args.out), Path(args.work)
    timings, longest = {}, 0.0
    for seed in spec["seeds"]:
        for arm in spec["arms"]:
            if already_done(args, arm, seed):
                continue
            if deadline is not None and time.monotonic() + longest > deadline:
                print(f"== {arm}, seed {seed}: skipped, the deadline ({deadline_s} s) would pass", flush=True)
                continue
            t = time.monotonic()
            train_arm(arm, seed, spec, base, records, work, out, arm_args)
            timings[f"{arm}_seed{seed}"] = round(time.monotonic() - t, 1)
            longest = max(longest, timings[f"{arm}_seed{seed}"])
            finished()
    return timings


def _reference(base: str, spec: dict, out: Path, deadline: float | None) -> dict:
    """The scorer check against the independent scorer, unless the experiment turns it off or less than 90 s are
    left before the deadline; returns its wall time."""
    if spec["reference_check"].get("questions_per_subject", 0) == 0:
        return {}
    if deadline is not None and deadline - time.monotonic() < 90:
        print("== reference check: skipped, less than 90 s left before the deadline (run it with --only reference)")
        return {}
    t = time.perf_counter()
    reference_check(base, spec, out, deadline)
    return {"reference_check": round(time.perf_counter() - t, 1)}


def _mmlu_records(spec: dict, records: dict[str, Path], base: str) -> tuple[dict, dict, str]:
    """The MMLU experiment's records (the split's two halves) written to `records`: their counts, what
    experiment.json says of them, and the line that reports them."""
    from qlora_lightning.eval.mmlu_data import load_mmlu

    mmlu = load_mmlu(spec["mmlu"])
    train_subjects, held_out = load_split(spec["subjects"], set(mmlu.subjects))
    counts = {
        "train": write_records(mmlu, train_subjects, records["train"], spec["records"].get("train_per_subject")),
        "held_out": write_records(mmlu, held_out, records["held_out"], spec["records"].get("held_out_per_subject")),
    }
    data = {
        "note": NOTE,
        "split_file": shown(spec["subjects"]),
        "mmlu": spec["mmlu"],
        "shots_source": mmlu.shots_source,
        "split": {"train": train_subjects, "held_out": held_out},
    }
    said = (
        f"records: {counts['train']} training ({len(train_subjects)} subjects), {counts['held_out']} held out "
        f"({len(held_out)} subjects); base {base}"
    )
    return counts, data, said


def _version(name: str) -> str | None:
    from importlib import metadata

    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def write_archive(out: Path, path: Path) -> None:
    """`out` as a .tar.gz (written aside and renamed: a run stopped mid-write leaves the previous archive)."""
    tmp = path.with_name(path.name + ".tmp")
    with tarfile.open(tmp, "w:gz") as tar:
        tar.add(out, arcname=out.name)
    tmp.replace(path)
