"""The task experiment's report (configs/fidelity/tasks.yaml): held-out exact match and loss per arm (mean ± sd
over seeds), the paired per-seed differences the experiment's `comparisons` name, with a 95 % interval, fidelity.json,
fidelity.md and a plot of the exact match per arm and seed."""

from __future__ import annotations

import json
import statistics
from pathlib import Path

from .summary import fmt, mean_spread, storage

#: Two-sided 95 % quantiles of Student's t by degrees of freedom (paired seeds minus one); past 10, 1.96 is close.
T95 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262, 10: 2.228}
#: The measures compared per seed: a higher exact match is better, a lower loss is.
PAIRED = ("exact_match_after", "eval_loss_after")


def paired_difference(runs: list[dict], reference: list[dict], key: str) -> dict:
    """`key` of each run minus the reference arm's at the same seed: the differences, their mean, sd and 95 %
    interval (Student's t), and whether the interval leaves out zero (a difference the seeds resolve)."""
    theirs = {r["seed"]: r[key] for r in reference}
    seeds = sorted(r["seed"] for r in runs if r["seed"] in theirs)
    mine = {r["seed"]: r[key] for r in runs}
    differences = [mine[s] - theirs[s] for s in seeds]
    if not differences:
        return {"seeds": [], "differences": [], "mean": None, "std": None, "ci95": None, "resolved": None}
    mean = statistics.fmean(differences)
    if len(differences) < 2:
        return {"seeds": seeds, "differences": differences, "mean": mean, "std": None, "ci95": None, "resolved": None}
    std = statistics.stdev(differences)
    half = T95.get(len(differences) - 1, 1.96) * std / len(differences) ** 0.5
    return {
        "seeds": seeds,
        "differences": differences,
        "mean": mean,
        "std": std,
        "ci95": [mean - half, mean + half],
        "resolved": not (mean - half <= 0 <= mean + half),
    }


def build_task_report(out: Path, meta: dict) -> dict:
    """fidelity.json, fidelity.md and exact_match.png from the run files in `out` (missing runs are missing)."""
    runs = [json.loads(p.read_text()) for p in sorted(out.glob("run_*_seed*.json"))]
    by_arm = {arm: sorted((r for r in runs if r["arm"] == arm), key=lambda r: r["seed"]) for arm in meta["arms"]}
    arms = {arm: _arm_summary(mine) for arm, mine in by_arm.items()}
    comparison = {
        f"{arm} - {other}": {
            **{key: paired_difference(by_arm.get(arm, []), by_arm.get(other, []), key) for key in PAIRED},
            "same_adapter_init_per_seed": all(
                arms[arm]["adapter_init_fingerprints"].get(s) == arms[other]["adapter_init_fingerprints"].get(s)
                for s in arms[arm]["seeds"]
                if s in arms[other]["seeds"]
            ),
        }
        for arm, other in meta["comparisons"]
        if arm in arms and other in arms
    }
    report = {"note": meta["note"], "experiment": meta, "arms": arms, "paired": comparison}
    (out / "fidelity.json").write_text(json.dumps(report, indent=2) + "\n")
    (out / "fidelity.md").write_text(task_markdown(report))
    if any(a["seeds"] for a in arms.values()):
        plot_exact_match(by_arm, out / "exact_match.png")
    return report


def _arm_summary(mine: list[dict]) -> dict:
    settings = mine[0]["settings"] if mine else {}
    return {
        "seeds": [r["seed"] for r in mine],
        "base_storage": storage(settings) if settings else None,
        "exact_match_before": mean_spread([r["exact_match_before"] for r in mine]),
        "exact_match_after": mean_spread([r["exact_match_after"] for r in mine]),
        "exact_match_examples": max((r["exact_match_examples"] for r in mine), default=0),
        "eval_loss_before": mean_spread([r["eval_loss_before"] for r in mine]),
        "eval_loss_after": mean_spread([r["eval_loss_after"] for r in mine]),
        "tokens_per_s": mean_spread([r["tokens_per_s_median"] for r in mine]),
        "peak_gpu_mem_gib": mean_spread([r["peak_gpu_mem_gib"] for r in mine]),
        "peak_host_mem_gib": mean_spread([r["peak_host_mem_gib"] for r in mine]),
        "fit_seconds": mean_spread([r["fit_seconds"] for r in mine]),
        "settings": settings,
        "adapter_init_fingerprints": {r["seed"]: r["adapter_init_fingerprint"] for r in mine},
    }


def task_markdown(report: dict) -> str:
    """The two tables: each arm's numbers, then each comparison ("arm - other arm") seed by seed."""
    meta, arms = report["experiment"], report["arms"]
    pct = dict(digits=1, scale=100, suffix=" %")
    task = meta["task"]
    lines = [
        f"## Held-out exact match by method: {meta['base_model']} on the generated task",
        "",
        f"*{meta['note']}*",
        "",
        f"{meta['device_name']}; torch {meta['versions']['torch']}, transformers {meta['versions']['transformers']}, "
        f"bitsandbytes {meta['versions']['bitsandbytes']}, lightning {meta['versions']['lightning']}; "
        f"{meta['date']}. Experiment `{meta['experiment_file']}`: {meta['records']['train']:,} training records, "
        f"{meta['records']['held_out']:,} held-out instances never trained on (`generate_tasks`, seed {task['seed']}).",
        "",
        "| arm | base | seeds | steps × batch | exact match before | exact match after | eval loss before | "
        "eval loss after | tokens/s | peak GiB |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, a in arms.items():
        s = a["settings"]
        peak = a["peak_gpu_mem_gib"] if a["peak_gpu_mem_gib"]["n"] else a["peak_host_mem_gib"]
        lines.append(
            f"| {name} | {a['base_storage'] or '–'} | {len(a['seeds'])} | {s.get('max_steps', '–')} × "
            f"{s.get('batch_size', '–')} | {fmt(a['exact_match_before'], **pct)} | {fmt(a['exact_match_after'], **pct)} "
            f"| {fmt(a['eval_loss_before'])} | {fmt(a['eval_loss_after'])} | {fmt(a['tokens_per_s'], digits=0)} | "
            f"{fmt(peak, digits=2)}{'' if a['peak_gpu_mem_gib']['n'] else ' (host)'} |"
        )
    lines += [
        "",
        "Mean ± standard deviation over seeds; exact match: greedy answers to the held-out questions "
        "(`DemoReport`, `exact_match`); eval loss: mean over the answer tokens of the held-out records.",
        "",
        "| difference | seeds | exact match after, per seed (points) | mean ± sd | 95 % interval | "
        "eval loss after, mean ± sd | 95 % interval | same initial adapters |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, c in report["paired"].items():
        em, loss = c["exact_match_after"], c["eval_loss_after"]
        lines.append(
            f"| {name} | {len(em['seeds'])} | {', '.join(f'{d * 100:+.1f}' for d in em['differences']) or '–'} | "
            f"{_difference(em, 100, 1)} | {_interval(em, 100, 1)} | {_difference(loss, 1, 4)} | "
            f"{_interval(loss, 1, 4)} | {'yes' if c['same_adapter_init_per_seed'] else 'NO'} |"
        )
    lines += [
        "",
        "Paired per seed (same seed, data order and initial adapters in every arm): a positive exact-match "
        "difference or a negative loss difference favours the first arm. An interval that leaves out 0 (marked *) "
        "is a difference these seeds resolve; one that holds 0 is not.",
    ]
    return "\n".join(lines) + "\n"


def _difference(d: dict, scale: float, digits: int) -> str:
    if d["mean"] is None:
        return "–"
    spread = f" ± {d['std'] * scale:.{digits}f}" if d["std"] is not None else ""
    return f"{d['mean'] * scale:+.{digits}f}{spread}"


def _interval(d: dict, scale: float, digits: int) -> str:
    if d["ci95"] is None:
        return "–"
    low, high = (v * scale for v in d["ci95"])
    return f"[{low:+.{digits}f}, {high:+.{digits}f}]" + (" *" if d["resolved"] else "")


def plot_exact_match(by_arm: dict[str, list[dict]], path: Path) -> None:
    """Held-out exact match after training, one column per arm, a point per seed and a bar at the mean."""
    from matplotlib.figure import Figure  # no pyplot: no process-wide backend or figure registry

    fig = Figure(figsize=(1.6 * max(len(by_arm), 2) + 1, 3.5))
    ax = fig.subplots()
    for x, mine in enumerate(by_arm.values()):
        values = [r["exact_match_after"] * 100 for r in mine]
        if values:
            ax.scatter([x] * len(values), values, color="C0", zorder=3)
            ax.hlines(statistics.fmean(values), x - 0.25, x + 0.25, color="C1")
    ax.set_xticks(range(len(by_arm)), list(by_arm))
    ax.set_ylabel("held-out exact match (%)")
    ax.grid(axis="y", alpha=0.3)
    fig.savefig(path, dpi=120, bbox_inches="tight")
