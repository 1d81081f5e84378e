"""The experiment's records as JSONL files: MMLU questions as `alpaca` instructions (the training half's and the
held-out half's subjects), or the generated task's two parts (`generate_tasks`, OpenOrca fields)."""

from __future__ import annotations

import json
from pathlib import Path

LETTERS = ("A", "B", "C", "D")


def instruction_record(q) -> dict:
    """An MMLU question as an `alpaca` record: the question and choices → "<letter>. <choice text>"."""
    subject = q.subject.replace("_", " ")
    choices = "\n".join(f"{letter}. {choice}" for letter, choice in zip(LETTERS, q.choices, strict=True))
    return {
        "instruction": (
            f"Answer the following multiple choice question about {subject} with the letter of the correct "
            "choice and its text."
        ),
        "input": f"{q.question}\n{choices}",
        "output": f"{LETTERS[q.answer]}. {q.choices[q.answer]}",
        "subject": q.subject,
    }


def write_records(mmlu, subjects: list[str], path: Path, per_subject: int | None) -> int:
    """Write the questions of `subjects` (the first `per_subject` of each, in file order) as JSONL records."""
    wanted, seen, rows = set(subjects), {}, []
    for q in mmlu.questions:
        if q.subject in wanted and (per_subject is None or seen.get(q.subject, 0) < per_subject):
            seen[q.subject] = seen.get(q.subject, 0) + 1
            rows.append(instruction_record(q))
    return _write_jsonl(rows, path)


def write_task_records(task: dict, paths: dict[str, Path]) -> dict[str, int]:
    """The generated task's `train` and `held_out` parts (`generate_tasks` with the experiment's sizes and seed)
    into `paths`: written when the experiment runs rather than shipped, since the same seed gives the same
    records (checked by a test) and thousands of records would weigh more than the few lines that make them."""
    from qlora_lightning.data.sample import generate_tasks

    parts = generate_tasks(task["train"], task["held_out"], task.get("seed", 0))
    return {name: _write_jsonl(rows, paths[name]) for name, rows in zip(("train", "held_out"), parts, strict=True)}


def _write_jsonl(rows: list[dict], path: Path) -> int:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(json.dumps(r, ensure_ascii=False) for r in rows) + "\n", encoding="utf-8")
    return len(rows)
