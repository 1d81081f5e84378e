"""MMLU questions as `alpaca` instruction records: the training half's and the held-out half's JSONL files."""

from __future__ import annotations

import json
from pathlib import Path

LETTERS = ("A", "B", "C", "D")


def instruction_record(q) -> dict:
    """An MMLU question as an `alpaca` record: the question and choices → "<letter>. <choice text>"."""
    subject = q.subject.replace("_", " ")
    choices = "\n".join(f"{letter}. {choice}" for letter, choice in zip(LETTERS, q.choices))
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
    wanted, seen, lines = set(subjects), {}, []
    for q in mmlu.questions:
        if q.subject in wanted and (per_subject is None or seen.get(q.subject, 0) < per_subject):
            seen[q.subject] = seen.get(q.subject, 0) + 1
            lines.append(json.dumps(instruction_record(q), ensure_ascii=False))
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return len(lines)
