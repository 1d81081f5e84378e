"""sample.py: the bundled sample is what its script generates, and the exact-match scoring of the demo."""

from __future__ import annotations

import json
import re

from qlora_lightning.data.sample import exact_match, main
from qlora_lightning.data.sources import resolve_bundled


def test_bundled_sample_is_what_the_script_generates(tmp_path):
    paths = {split: resolve_bundled(f"bundled:orca_sample_{split}") for split in ("train", "val")}
    main(["--out", str(tmp_path)])
    for split in ("train", "val"):
        assert (tmp_path / f"orca_sample_{split}.jsonl").read_bytes() == paths[split].read_bytes()
    train, val = ([json.loads(line) for line in paths[split].read_text().splitlines()] for split in ("train", "val"))
    assert len(train) == 400 and len(val) == 100
    assert not {r["question"] for r in train} & {r["question"] for r in val}
    assert {r["task"] for r in val} >= {"addition", "units", "reverse", "uppercase"}
    for r in train + val:
        assert set(r) == {"id", "task", "system_prompt", "question", "response"} and 0 < len(r["response"]) <= 12
        if r["task"] == "reverse":
            assert r["response"] == re.search(r"'(\w+)'", r["question"]).group(1)[::-1]


def test_exact_match_normalises_only_formatting():
    assert exact_match(" 42.\n### Human: next", "42")
    assert exact_match("'Paris'", "Paris") and exact_match("New  Delhi", "New Delhi")
    assert not exact_match("HELLO", "hello")  # case matters: the uppercase task differs only by case
    assert not exact_match("The answer is 42", "42") and not exact_match("", "42")
