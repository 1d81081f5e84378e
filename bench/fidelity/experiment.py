"""The experiment file (arms, seeds, records, MMLU settings or the generated task) and the fixed split of MMLU's
subjects. An experiment with a `task` entry (configs/fidelity/tasks.yaml) trains on `generate_tasks` records and
is measured by held-out exact match; one without trains on MMLU questions (configs/fidelity/experiment.yaml)."""

from __future__ import annotations

from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
EXPERIMENT = REPO / "configs" / "fidelity" / "experiment.yaml"
SMOKE = REPO / "configs" / "fidelity" / "experiment-smoke.yaml"
#: The smoke run's model: a 2-layer random Llama with SmolLM2's tokenizer, built into --work.
TINY = "tiny"
NOTE = (
    "A method comparison on MMLU-derived data (QLoRA against 16-bit LoRA trained the same way), not an MMLU "
    "score: the training records are MMLU test questions of the other half of the subjects."
)
TASK_NOTE = (
    "A method comparison on a generated task with checkable answers (three-digit arithmetic, word operations, "
    "lookups), scored by exact match on held-out instances never trained on: it measures task learning, where the "
    "MMLU experiment measures format learning."
)


def load_experiment(path: str | Path) -> dict:
    """The experiment file (YAML), its paths made absolute from the repository root, with defaults filled."""
    import yaml

    path = Path(path)
    spec = yaml.safe_load(path.read_text())
    spec.setdefault("seeds", [0, 1, 2])
    spec.setdefault("overlays", [])
    spec.setdefault("records", {})
    spec.setdefault("mmlu_eval", {})
    spec.setdefault("reference_check", {})
    spec.setdefault("deadline_s", None)
    for key in ("train", "overlays"):
        spec[key] = [str(repo_path(p)) for p in spec[key]]
    spec["arms"] = {name: [str(repo_path(p)) for p in files] for name, files in spec["arms"].items()}
    for key in ("subjects", "smoke"):
        if spec.get(key):
            spec[key] = str(repo_path(spec[key]))
    if is_task(spec):
        reference = spec.setdefault("reference_arm", next(iter(spec["arms"])))
        if reference not in spec["arms"]:
            raise ValueError(f"{path}: reference_arm {reference!r} is none of the arms {sorted(spec['arms'])}")
        spec["comparisons"] = [_comparison(c, spec["arms"], path) for c in spec.get("comparisons") or []] or [
            [arm, reference] for arm in spec["arms"] if arm != reference
        ]
    spec["file"] = str(path)
    return spec


def _comparison(text: str, arms: dict, path: Path) -> list[str]:
    """One `comparisons` entry, "<arm> - <other arm>", as [arm, other]: the report's paired per-seed difference."""
    pair = [part.strip() for part in str(text).split(" - ")]
    if len(pair) != 2 or pair[0] == pair[1] or not set(pair) <= set(arms):
        raise ValueError(
            f"{path}: comparisons entry {text!r} must be '<arm> - <other arm>', two different arms of {sorted(arms)}"
        )
    return pair


def is_task(spec: dict) -> bool:
    """Whether the experiment trains on the generated task (a `task` entry) rather than on MMLU questions."""
    return spec.get("task") is not None


def smoke_of(path: str | Path) -> Path:
    """The CPU miniature of the experiment file `path`: its `smoke` entry, or experiment-smoke.yaml (MMLU's)."""
    import yaml

    named = (yaml.safe_load(Path(path).read_text()) or {}).get("smoke")
    return repo_path(named) if named else SMOKE


def default_folders(experiment: str | Path, smoke: bool) -> tuple[Path, Path]:
    """(work, out) when the flags name none: runs/fidelity[-<name>][-smoke] and bench/results/fidelity[-<name>]
    (`<work>/results` for --smoke), <name> being the experiment file's stem unless it is experiment.yaml, so that
    two experiments never share a folder."""
    name = "fidelity" if Path(experiment).resolve() == EXPERIMENT else f"fidelity-{Path(experiment).stem}"
    work = REPO / "runs" / (name + ("-smoke" if smoke else ""))
    return work, (work / "results" if smoke else REPO / "bench" / "results" / name)


def repo_path(p: str) -> Path:
    """A path of an experiment file or flag: relative ones are read from the repository root, wherever it runs."""
    return Path(p) if Path(p).is_absolute() else REPO / p


def shown(p: str | Path) -> str:
    """A path as the report shows it: relative to the repository when inside it."""
    p = Path(p).resolve()
    return str(p.relative_to(REPO)) if p.is_relative_to(REPO) else str(p)


def load_split(path: str | Path, known: set[str]) -> tuple[list[str], list[str]]:
    """(train subjects, held-out subjects) of the split file, checked to be disjoint and to cover `known`."""
    import yaml

    split = yaml.safe_load(Path(path).read_text())
    train, held_out = list(split["train"]), list(split["held_out"])
    overlap = sorted(set(train) & set(held_out))
    if overlap:
        raise ValueError(f"{path}: subjects in both halves: {overlap}")
    if len(set(train)) != len(train) or len(set(held_out)) != len(held_out):
        raise ValueError(f"{path}: a subject is listed twice")
    if set(train) | set(held_out) != known:
        missing, unknown = sorted(known - set(train) - set(held_out)), sorted((set(train) | set(held_out)) - known)
        raise ValueError(
            f"{path}: not a split of the data's {len(known)} subjects: missing {missing}, unknown {unknown}"
        )
    return train, held_out
