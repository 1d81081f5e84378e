"""The experiment file (arms, seeds, records, MMLU settings) and the fixed split of MMLU's subjects."""

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
    spec["subjects"] = str(repo_path(spec["subjects"]))
    spec["file"] = str(path)
    return spec


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
