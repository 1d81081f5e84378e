"""Generate the bundled OpenOrca-format sample: short, checkable tasks for the CPU demo.

`python -m qlora_lightning.data.sample` writes `bundled/orca_sample_train.jsonl` and
`bundled/orca_sample_val.jsonl` (same seed, same files). Every record has OpenOrca's fields
(`id`, `system_prompt`, `question`, `response`) plus `task`. Tasks: arithmetic, unit conversions, string
tasks (reverse, uppercase, count letters, word length, first letter) and facts this script knows
(capitals, chemical symbols, opposites). Answers are a few tokens, so a 135M model can learn the format
in minutes of CPU training, and `exact_match` can score what it generates on the held-out file.
Nothing here is copied from OpenOrca.

`generate_tasks` draws the fidelity experiment's task (bench/fidelity, configs/fidelity/tasks.yaml) from harder
families of the same kind: three-digit arithmetic, word operations and lookups in a table or list given in the
question; thousands of records with a held-out part of unseen instances, written when the experiment runs.
"""

from __future__ import annotations

import argparse
import json
import random
import re
from collections.abc import Callable
from pathlib import Path

__all__ = ["generate", "generate_tasks", "exact_match", "normalize_answer"]

BUNDLED = Path(__file__).parent / "bundled"
SYSTEM_PROMPTS = [  # OpenOrca mixes records with and without a system prompt
    "",
    "You are a helpful assistant. Answer with the final answer only.",
    "You are an AI assistant. Reply as briefly as possible.",
]
WORDS = (
    "apple banana cherry garden window river planet silver yellow orange dragon pencil rocket castle "
    "butter candle forest guitar island jungle kitten lemon marble needle ocean pepper rabbit saddle "
    "tomato violin walnut zebra anchor bridge cactus donkey engine falcon glacier harbor igloo jacket"
).split()
CAPITALS = {
    "Brazil": "Brasilia",
    "Russia": "Moscow",
    "China": "Beijing",
    "India": "New Delhi",
    "Mexico": "Mexico City",
    "Argentina": "Buenos Aires",
    "Turkey": "Ankara",
    "Denmark": "Copenhagen",
    "Hungary": "Budapest",
    "France": "Paris",
    "Japan": "Tokyo",
    "Italy": "Rome",
    "Spain": "Madrid",
    "Germany": "Berlin",
    "Canada": "Ottawa",
    "Egypt": "Cairo",
    "Kenya": "Nairobi",
    "Peru": "Lima",
    "Norway": "Oslo",
    "Greece": "Athens",
    "Portugal": "Lisbon",
    "Austria": "Vienna",
    "Ireland": "Dublin",
    "Poland": "Warsaw",
    "Sweden": "Stockholm",
    "Finland": "Helsinki",
    "Cuba": "Havana",
    "Chile": "Santiago",
    "Thailand": "Bangkok",
}
SYMBOLS = {
    "oxygen": "O",
    "hydrogen": "H",
    "carbon": "C",
    "nitrogen": "N",
    "gold": "Au",
    "silver": "Ag",
    "iron": "Fe",
    "sodium": "Na",
    "helium": "He",
    "copper": "Cu",
    "calcium": "Ca",
    "neon": "Ne",
    "potassium": "K",
    "lead": "Pb",
    "zinc": "Zn",
    "sulfur": "S",
}
OPPOSITES = {
    "hot": "cold",
    "big": "small",
    "fast": "slow",
    "up": "down",
    "light": "dark",
    "happy": "sad",
    "open": "closed",
    "early": "late",
    "full": "empty",
    "strong": "weak",
    "old": "new",
    "high": "low",
    "wet": "dry",
    "hard": "soft",
    "loud": "quiet",
    "rich": "poor",
    "thick": "thin",
    "near": "far",
}
UNITS = [  # (from, to, factor)
    ("kilometers", "meters", 1000),
    ("kilograms", "grams", 1000),
    ("hours", "minutes", 60),
    ("minutes", "seconds", 60),
    ("days", "hours", 24),
    ("feet", "inches", 12),
    ("liters", "milliliters", 1000),
    ("weeks", "days", 7),
]


def _arithmetic(rng: random.Random) -> tuple[str, str, str]:
    op = rng.choice("+-*")
    if op == "*":
        a, b = rng.randint(2, 12), rng.randint(2, 12)
        return "multiplication", f"What is {a} times {b}?", str(a * b)
    a, b = rng.randint(1, 99), rng.randint(1, 99)
    if op == "-":
        a, b = max(a, b), min(a, b)
        return "subtraction", f"What is {a} minus {b}?", str(a - b)
    return "addition", f"What is {a} + {b}?", str(a + b)


def _units(rng: random.Random) -> tuple[str, str, str]:
    src, dst, factor = rng.choice(UNITS)
    n = rng.randint(2, 99)
    return "units", f"How many {dst} are in {n} {src}?", str(n * factor)


def _strings(rng: random.Random) -> tuple[str, str, str]:
    word = rng.choice(WORDS)
    kind = rng.choice(["reverse", "upper", "count", "length", "first"])
    if kind == "reverse":
        return "reverse", f"Reverse the word '{word}'.", word[::-1]
    if kind == "upper":
        return "uppercase", f"Write the word '{word}' in uppercase.", word.upper()
    if kind == "count":
        letter = rng.choice(sorted(set(word)))
        return "count_letter", f"How many times does the letter '{letter}' appear in '{word}'?", str(word.count(letter))
    if kind == "length":
        return "word_length", f"How many letters are in the word '{word}'?", str(len(word))
    return "first_letter", f"What is the first letter of the word '{word}'?", word[0]


def _all_facts() -> list[tuple[str, str, str]]:
    """Every fact question the script knows (a finite list, drawn from without repeats)."""
    return (
        [("capital", f"What is the capital of {c}?", a) for c, a in CAPITALS.items()]
        + [("chemical_symbol", f"What is the chemical symbol of {e}?", s) for e, s in SYMBOLS.items()]
        + [("opposite", f"What is the opposite of '{w}'?", o) for w, o in OPPOSITES.items()]
    )


GENERATED: list[Callable[[random.Random], tuple[str, str, str]]] = [_arithmetic, _units, _strings]


def generate(n_train: int = 400, n_val: int = 100, seed: int = 0) -> tuple[list[dict], list[dict]]:
    """Draw `n_train + n_val` distinct questions with `seed` and split them; val shares no question with train.

    About a tenth are facts (the script knows only so many); the rest are arithmetic, unit conversions
    and string tasks in equal parts.
    """
    rng = random.Random(seed)
    n = n_train + n_val
    facts = _all_facts()
    drawn = rng.sample(facts, min(len(facts), n // 10))
    seen = {question for _, question, _ in drawn}
    while len(drawn) < n:
        task, question, answer = GENERATED[len(drawn) % len(GENERATED)](rng)
        if question not in seen:
            seen.add(question)
            drawn.append((task, question, answer))
    rng.shuffle(drawn)
    return _records("orca_sample", "train", drawn[:n_train], rng), _records("orca_sample", "val", drawn[n_train:], rng)


# ------------------------------------------------------------------------ the discriminating task (fidelity)
#: More words for the word operations and lookups of `generate_tasks` (the demo's `WORDS` stay as they are, so
#: the bundled files do not change).
TASK_WORDS = (
    WORDS
    + (
        "basket camera desert eagle feather garlic hammer insect jelly kettle ladder magnet napkin oyster parrot "
        "quartz ribbon salmon tunnel umbrella velvet wagon yogurt blanket compass dolphin elbow fossil goblet hornet "
        "ivory jigsaw kernel lantern meadow nectar orchid puzzle quiver raisin sparrow thimble unicorn vessel willow"
    ).split()
)


def _long_arithmetic(rng: random.Random) -> tuple[str, str, str]:
    """Addition and subtraction of three-digit numbers, two-digit times one-digit multiplication."""
    op = rng.choice("+-*")
    if op == "*":
        a, b = rng.randint(11, 99), rng.randint(3, 9)
        return "multiplication_2x1", f"What is {a} times {b}?", str(a * b)
    a, b = rng.randint(100, 999), rng.randint(100, 999)
    if op == "-":
        a, b = max(a, b), min(a, b)
        return "subtraction_3", f"What is {a} minus {b}?", str(a - b)
    return "addition_3", f"What is {a} + {b}?", str(a + b)


def _word_operations(rng: random.Random) -> tuple[str, str, str]:
    """Operations on one or two words: reverse, last letter, the first letters joined, alphabetical order."""
    first, second = rng.sample(TASK_WORDS, 2)
    kind = rng.choice(["reverse", "last", "initials", "earlier"])
    if kind == "reverse":
        return "reverse", f"Reverse the word '{first}'.", first[::-1]
    if kind == "last":
        return "last_letter", f"What is the last letter of the word '{first}'?", first[-1]
    if kind == "initials":
        return "initials", f"Write the first letters of '{first}' and '{second}' together.", first[0] + second[0]
    question = f"Which word comes first in alphabetical order: '{first}' or '{second}'?"
    return "alphabetical", question, min(first, second)


def _lookups(rng: random.Random) -> tuple[str, str, str]:
    """A value looked up in a short table given in the question, or a word picked by its position in a list."""
    keys = rng.sample(TASK_WORDS, 4)
    if rng.random() < 0.5:
        values = [rng.randint(1, 99) for _ in keys]
        table = ", ".join(f"{k}={v}" for k, v in zip(keys, values, strict=True))
        i = rng.randrange(len(keys))
        return "lookup_value", f"Given {table}: what is the value of {keys[i]}?", str(values[i])
    i = rng.randrange(len(keys))
    ordinal = ("first", "second", "third", "fourth")[i]
    return "lookup_position", f"Which word is {ordinal} in the list {', '.join(keys)}?", keys[i]


TASK_FAMILIES: list[Callable[[random.Random], tuple[str, str, str]]] = [_long_arithmetic, _word_operations, _lookups]


def generate_tasks(n_train: int = 4000, n_val: int = 500, seed: int = 0) -> tuple[list[dict], list[dict]]:
    """The fidelity experiment's task: `n_train + n_val` distinct questions of `TASK_FAMILIES` in equal parts.

    Like `generate`, the held-out records are instances never trained on (no question is in both parts), and
    every answer is a few tokens that `exact_match` checks. Deterministic in `seed`: the experiment writes them
    when it runs instead of shipping thousands of records. 4,000 / 500 by default: enough distinct instances
    for a few hundred steps of 16 without repeating, and a held-out exact match with a standard error near 2
    points.
    """
    if n_train < 1 or n_val < 1:
        raise ValueError(f"generate_tasks needs at least one record per part, got n_train={n_train}, n_val={n_val}")
    rng = random.Random(seed)
    drawn: list[tuple[str, str, str]] = []
    seen: set[str] = set()
    while len(drawn) < n_train + n_val:
        task, question, answer = TASK_FAMILIES[len(drawn) % len(TASK_FAMILIES)](rng)
        if question not in seen:
            seen.add(question)
            drawn.append((task, question, answer))
    rng.shuffle(drawn)
    return _records("tasks", "train", drawn[:n_train], rng), _records("tasks", "val", drawn[n_train:], rng)


def _records(name: str, split: str, drawn: list[tuple[str, str, str]], rng: random.Random) -> list[dict]:
    """(task, question, answer) triples as OpenOrca records, a system prompt drawn for each."""
    return [
        {
            "id": f"{name}.{split}.{i:04d}",
            "task": task,
            "system_prompt": rng.choice(SYSTEM_PROMPTS),
            "question": question,
            "response": answer,
        }
        for i, (task, question, answer) in enumerate(drawn)
    ]


def normalize_answer(text: str) -> str:
    """First line of `text`, cut at a '###' turn marker, without surrounding spaces, quotes or final period.

    Case is kept: the uppercase task's answer differs from its question only by case.
    """
    text = text.strip().split("\n", 1)[0].split("###", 1)[0]
    text = re.sub(r"\s+", " ", text).strip().rstrip(".").strip()
    return text.strip("'\"`").strip()


def exact_match(prediction: str, reference: str) -> bool:
    """Whether a generated answer equals the reference after `normalize_answer` on both."""
    return normalize_answer(prediction) == normalize_answer(reference)


def main(argv: list[str] | None = None) -> None:
    """Write the bundled sample files (commit them; the package ships them)."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--n-train", type=int, default=400)
    parser.add_argument("--n-val", type=int, default=100)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=BUNDLED)
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    train, val = generate(args.n_train, args.n_val, args.seed)
    for name, part in (("train", train), ("val", val)):
        path = args.out / f"orca_sample_{name}.jsonl"
        with open(path, "w", encoding="utf-8", newline="\n") as f:
            f.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in part)
        print(f"wrote {len(part)} records to {path}")


if __name__ == "__main__":
    main()
