"""Does sdpa's default backend give correct results for padded batches with an explicit attention mask?

A random SmolLM2-shaped Llama (4 layers) in bf16 on the GPU, 8 rows of random lengths (one of them 448 long, or
300 when rows are padded to a multiple of 64), right- and left-padded. For each sdpa backend (the default one,
cuDNN, flash + memory-efficient, math) it prints the largest logit difference to the math backend on the real
positions, and each row alone without a mask; then whether a backward pass leaves any gradient non-finite. On an
H200 with torch 2.11 (BENCHMARKS.md): the forward is fine everywhere; left-padded rows 448 long (≡ 64 mod 128)
give non-finite gradients with cuDNN, the default there (pytorch#196678).

    python bench/sdpa_padding_check.py        # on a GPU machine; transformers only (on a CPU: default and math)
"""

from __future__ import annotations

import contextlib

import torch
import transformers
from torch.nn.attention import SDPBackend, sdpa_kernel

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
BACKENDS = {
    "default": None,
    **(
        {
            "cudnn": [SDPBackend.CUDNN_ATTENTION],
            "flash+efficient": [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION],
        }
        if DEVICE == "cuda"
        else {}
    ),
    "math": [SDPBackend.MATH],
}


def padded_batch(lengths: list[int], side: str, multiple: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Random token rows of `lengths`, padded on `side` to the longest rounded up to `multiple`."""
    width = -(-max(lengths) // multiple) * multiple
    ids = torch.zeros(len(lengths), width, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, n in enumerate(lengths):
        where = slice(0, n) if side == "right" else slice(width - n, width)
        ids[i, where], mask[i, where] = torch.randint(1, 4096, (n,)), 1
    return ids.to(DEVICE), mask.to(DEVICE)


def run(model, backend, **batch) -> torch.Tensor:
    with sdpa_kernel(backend) if backend else contextlib.nullcontext():
        return model(**batch).logits.float()


def main() -> None:
    name = torch.cuda.get_device_name() if DEVICE == "cuda" else "CPU"
    print(torch.__version__, transformers.__version__, torch.backends.cudnn.version(), name)
    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        hidden_size=576,
        intermediate_size=1536,
        num_hidden_layers=4,
        num_attention_heads=9,
        num_key_value_heads=3,
        vocab_size=4096,
        tie_word_embeddings=True,
    )
    model = transformers.LlamaForCausalLM(config).to(DEVICE, torch.bfloat16)
    model.config._attn_implementation = "sdpa"  # the default where sdpa exists; said so that no other is picked
    for side in ("right", "left"):
        for multiple in (1, 64):
            lengths = [int(n) for n in torch.randint(40, 440, (7,))] + [448 if multiple == 1 else 300]
            ids, mask = padded_batch(lengths, side, multiple)
            real = mask.bool()
            model.eval()
            with torch.no_grad():
                logits = {name: run(model, b, input_ids=ids, attention_mask=mask) for name, b in BACKENDS.items()}
                alone = torch.cat(
                    [model(input_ids=row[keep][None]).logits.float()[0] for row, keep in zip(ids, real, strict=True)]
                )
            reference = logits["math"][real]
            worst = {name: round(float((v[real] - reference).abs().max()), 4) for name, v in logits.items()}
            worst["rows alone"] = round(float((alone - reference).abs().max()), 4)
            print(f"{side}-padded to a multiple of {multiple}, width {ids.shape[1]}: max |logit - math| {worst}")
            model.train()
            for name, backend in BACKENDS.items():
                if name == "math":
                    continue
                model.zero_grad()
                logits = run(model, backend, input_ids=ids, attention_mask=mask)
                torch.nn.functional.cross_entropy(logits[real], ids[real]).backward()
                bad = sum(not torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
                print(f"  backward, {name}: {bad} parameters with non-finite gradients")


if __name__ == "__main__":
    main()
