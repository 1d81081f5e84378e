"""Generation: template, greedy determinism, sampling seeds, EOS stop, batching, streaming, train-mode restore, CLI,
and `predict`'s answers to training batches."""

from __future__ import annotations

import pytest
import torch

from qlora_lightning.generate import answer_batch, encode, generate, left_pad, stop_ids, stream
from qlora_lightning.model import load_for_inference, load_model
from qlora_lightning.specs import QuantSpec

PROMPTS = ["Hi", "Introduce yourself in a few words", "What is the capital of France? Answer briefly, please."]


@pytest.fixture(scope="module")
def chat(tiny_chat_llama_dir, chat_adapter):
    """The tiny chat Llama (NF4 + random adapter). fp32 compute: batched and single runs then agree to ~1e-6,
    so greedy choices cannot flip on bf16 rounding between the two (bf16 does flip them on near-ties)."""
    return load_for_inference(str(tiny_chat_llama_dir), str(chat_adapter), quant=QuantSpec(compute_dtype="float32"))


def test_prompt_is_written_with_the_model_card_template(chat):
    text = chat.tokenizer.decode(encode(chat.tokenizer, "Introduce yourself", "qlora"))
    assert text == (
        "A chat between a curious human and an artificial intelligence assistant. The assistant gives "
        "helpful, detailed, and polite answers to the user's questions.\n### Human: Introduce yourself "
        "### Assistant:"
    )
    assert chat.tokenizer.decode(encode(chat.tokenizer, "Hi", "chat")).startswith("<|im_start|>")


def test_greedy_is_deterministic_and_sampling_follows_the_seed(chat):
    greedy = [generate(chat.model, chat.tokenizer, PROMPTS[1], max_new_tokens=12) for _ in range(2)]
    assert greedy[0] == greedy[1] and greedy[0][0]
    sampled = {
        seed: generate(chat.model, chat.tokenizer, PROMPTS[1], max_new_tokens=12, sample=True, seed=seed)[0]
        for seed in (0, 0, 1)
    }
    again = generate(chat.model, chat.tokenizer, PROMPTS[1], max_new_tokens=12, sample=True, seed=0)[0]
    assert again == sampled[0] and sampled[0] != sampled[1] and sampled[0] != greedy[0][0]


def test_generation_stops_at_eos(chat):
    model, tok = chat.model, chat.tokenizer
    assert tok.eos_token_id in stop_ids(model, tok)
    ids, mask = left_pad([encode(tok, PROMPTS[0], "qlora")], tok.pad_token_id, "cpu")
    with torch.no_grad():
        free = model.generate(
            input_ids=ids,
            attention_mask=mask,
            max_new_tokens=8,
            do_sample=False,
            eos_token_id=[],
            pad_token_id=tok.pad_token_id,
        )[0, ids.shape[1] :].tolist()
    assert len(free) == 8
    eos = free[3]  # declare the 4th greedy token the end of sequence
    assert eos not in free[:3]
    answer = generate(model, tok, PROMPTS[0], max_new_tokens=8, eos_token_id=eos)[0]
    assert answer == tok.decode(free[:3], skip_special_tokens=True) != tok.decode(free, skip_special_tokens=True)


def test_a_batch_equals_one_prompt_at_a_time(chat):
    # Raw prompts (no template): a 2-layer random model continues the shared "### Assistant:" ending alike.
    one_by_one = [generate(chat.model, chat.tokenizer, p, template=None, max_new_tokens=10)[0] for p in PROMPTS]
    assert generate(chat.model, chat.tokenizer, PROMPTS, template=None, max_new_tokens=10, batch_size=3) == one_by_one
    assert len(set(one_by_one)) == 3  # rows of different lengths, different answers: nothing mixed up


def test_streaming_yields_the_same_text(chat):
    pieces = list(stream(chat.model, chat.tokenizer, PROMPTS[2], max_new_tokens=15))
    assert len(pieces) > 1 and "".join(pieces) == generate(chat.model, chat.tokenizer, PROMPTS[2], max_new_tokens=15)[0]


def test_a_training_model_is_switched_to_cached_eval_and_back(tiny_chat_llama_dir, chat_adapter):
    loaded = load_model(str(tiny_chat_llama_dir), lora=None, adapter=str(chat_adapter))
    model = loaded.model
    assert model.training and not model.config.use_cache
    calls = []

    def record(module, args, kwargs):
        calls.append((module.training, kwargs["input_ids"].shape[1]))

    hook = model.register_forward_pre_hook(record, with_kwargs=True)
    generate(model, loaded.tokenizer, "Hi", max_new_tokens=3)
    hook.remove()
    prompt_length = len(encode(loaded.tokenizer, "Hi", "qlora"))
    assert calls == [(False, prompt_length), (False, 1), (False, 1)]  # eval mode; the KV cache feeds 1 token a step
    assert model.training and not model.config.use_cache


def test_generate_through_the_cli_streams_to_stdout(tiny_chat_llama_dir, chat_adapter, capsys, chat):
    from qlora_lightning.cli import main

    main(
        [
            "generate",
            "--base",
            str(tiny_chat_llama_dir),
            "--adapter",
            str(chat_adapter),
            "--prompt",
            PROMPTS[2],
            "--max_new_tokens",
            "6",
            "--quant.compute_dtype",
            "float32",
        ]
    )
    expected = generate(chat.model, chat.tokenizer, PROMPTS[2], max_new_tokens=6)[0]
    assert capsys.readouterr().out == f"### {PROMPTS[2]}\n{expected}\n"


@pytest.mark.slow
def test_smollm2_answers_with_its_chat_template_and_stops(smollm2_dir):
    # The unquantized base (bf16 weights, fp32 compute for CPU speed); its NF4 form rambles on past "Paris".
    loaded = load_for_inference(smollm2_dir, quant=QuantSpec(quantize="none", compute_dtype="float32"))
    answer = generate(
        loaded.model, loaded.tokenizer, "What is the capital of France?", template="chat", max_new_tokens=48
    )[0]
    assert answer == "The capital of France is Paris."  # 7 tokens, then <|im_end|>: stopped long before 48


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--sample", "true", "--top_p", "2"], r"top_p must be in \(0, 1\] .*got 2"),
        (["--sample", "true", "--top_p", "0"], r"top_p must be in \(0, 1\]"),
        (["--sample", "true", "--temperature", "0"], r"temperature must be > 0 \(greedy decoding is --sample false\)"),
        (["--max_new_tokens", "0"], r"max_new_tokens must be an integer >= 1, got 0"),
        (["--batch_size", "0", "--stream_output", "false"], r"batch_size must be an integer >= 1, got 0"),
    ],
)
def test_settings_generation_cannot_use_are_refused_before_the_model_loads(
    tiny_chat_llama_dir, chat_adapter, monkeypatch, flags, message
):
    from qlora_lightning import generate as generate_module
    from qlora_lightning.cli import main

    def must_not_load(*args, **kwargs):
        raise AssertionError("the model was loaded before the settings were checked")

    monkeypatch.setattr(generate_module, "load_for_inference", must_not_load)
    args = ["generate", "--base", str(tiny_chat_llama_dir), "--adapter", str(chat_adapter), "--prompt", "Hi"]
    with pytest.raises(ValueError, match=message):
        main(args + flags)


def test_the_python_api_checks_the_same_settings(chat):
    with pytest.raises(ValueError, match=r"top_p must be in \(0, 1\]"):
        generate(chat.model, chat.tokenizer, "Hi", sample=True, top_p=2.0)
    with pytest.raises(ValueError, match="batch_size must be an integer >= 1"):
        generate(chat.model, chat.tokenizer, PROMPTS, batch_size=0)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks a machine without CUDA")
def test_device_cuda_without_cuda_names_the_flag(tiny_chat_llama_dir, chat_adapter):
    from qlora_lightning.cli import main

    args = ["generate", "--base", str(tiny_chat_llama_dir), "--adapter", str(chat_adapter), "--prompt", "Hi"]
    with pytest.raises(
        ValueError,
        match=r"--device 'cuda': (this torch is a CPU build|no CUDA device is visible); "
        r"use --device cpu",
    ):
        main(args + ["--device", "cuda"])
    with pytest.raises(ValueError, match=r"--device 'gpu' is not a device torch knows.*use auto, cpu, cuda or cuda:N"):
        main(args + ["--device", "gpu"])


def right_padded_batch(tokenizer, prompts: list[list[int]], answers: list[list[int]]) -> dict[str, torch.Tensor]:
    """A training batch as the collator makes it: rows right-padded, labels on the answers only."""
    width = max(len(p) + len(a) for p, a in zip(prompts, answers, strict=True))
    input_ids = torch.full((len(prompts), width), tokenizer.pad_token_id)
    labels = torch.full((len(prompts), width), -100)
    for i, (prompt, answer) in enumerate(zip(prompts, answers, strict=True)):
        input_ids[i, : len(prompt) + len(answer)] = torch.tensor(prompt + answer)
        labels[i, len(prompt) : len(prompt) + len(answer)] = torch.tensor(answer)
    return {"input_ids": input_ids, "labels": labels}


def test_predict_answers_each_row_s_unlabelled_prefix_with_its_labelled_reference(chat):
    """`answer_batch`, what `QLoRAModule.predict_step` returns: a row's prompt is its tokens before the first label,
    its reference the labelled tokens, its answer the greedy generation from the prompt alone."""
    tok = chat.tokenizer
    prompts = [encode(tok, p, "qlora") for p in PROMPTS[:2]]
    answers = [tok(a, add_special_tokens=False)["input_ids"] for a in ("Paris.", "A small model, glad to help.")]
    batch = right_padded_batch(tok, prompts, answers)
    rows = answer_batch(chat.model, tok, batch, max_new_tokens=5)
    assert [r["prompt"] for r in rows] == [tok.decode(p, skip_special_tokens=True) for p in prompts]
    assert [r["reference"] for r in rows] == ["Paris.", "A small model, glad to help."]
    assert [r["answer"] for r in rows] == [
        generate(chat.model, tok, r["prompt"], template=None, max_new_tokens=5)[0] for r in rows
    ]
    assert all(r["prompt"].rstrip().endswith("### Assistant:") for r in rows)


def test_predict_on_data_trained_on_its_source_names_the_setting(tiny_chat_llama_dir, tmp_path):
    """With `data.train_on_source` every token is labelled, so no prompt can be told from its answer: `predict`
    stops naming the setting instead of answering empty prompts."""
    import lightning as L
    from qlora_testing import tiny_module_and_data

    module, data = tiny_module_and_data(tiny_chat_llama_dir)
    data.hparams.train_on_source = True
    trainer = L.Trainer(default_root_dir=tmp_path, accelerator="cpu", logger=False, enable_progress_bar=False)
    with pytest.raises(ValueError, match="predict needs prompts without labels: set data.train_on_source false"):
        trainer.predict(module, data)
