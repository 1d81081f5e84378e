"""Loading the tokenizer of a base model: as its files define it (`read_tokenizer`, what an export writes), or
with a pad token that training can use safely (`load_tokenizer`). The one place a model folder's or hub
repository's tokenizer is loaded (a GGUF file's is `builtin.gguf_tokenizer`'s).

Kept apart from `model.py` so that the data pipeline needs no model code.
"""

from __future__ import annotations

from transformers import AutoTokenizer, PreTrainedTokenizerBase

from . import hub


def read_tokenizer(name_or_path: str, *, trust_remote_code: bool = False, **kwargs) -> PreTrainedTokenizerBase:
    """The tokenizer of a hub id, local folder or `builtin:` model exactly as its files define it (no pad token
    chosen: an export writes what the base says), or an error naming the model. `trust_remote_code` stays off
    unless the user asks for it: a tokenizer's own code would run in this process."""
    source = hub.resolve(name_or_path)
    try:
        return AutoTokenizer.from_pretrained(source, trust_remote_code=trust_remote_code, **kwargs)
    except (OSError, ValueError) as e:  # transformers' message names neither our key nor what to check
        kind = OSError if isinstance(e, OSError) else ValueError
        raise kind(f"cannot load the tokenizer of {name_or_path!r}: {e}") from e


def load_tokenizer(name_or_path: str, *, trust_remote_code: bool = False, **kwargs) -> PreTrainedTokenizerBase:
    """Load a tokenizer (`read_tokenizer`) and give it a pad token.

    LLaMA tokenizers ship without a pad token and many chat models reuse EOS as pad. Padding is masked
    in the labels by position (the collator's attention mask), never by token id, so a shared id would
    not stop the model learning to emit EOS; still, where the vocabulary has a distinct `unk` token we
    pad with it (as the QLoRA OpenOrca adapters' tokenizer does) so that logs and masks stay readable.
    No token is added, so the embedding matrix keeps its size and the adapters stay PEFT-compatible.
    `trust_remote_code` stays off unless the user asks for it.
    """
    tok = read_tokenizer(name_or_path, trust_remote_code=trust_remote_code, **kwargs)
    if tok.pad_token_id is None or tok.pad_token_id == tok.eos_token_id:
        if tok.unk_token_id is not None and tok.unk_token_id != tok.eos_token_id:
            tok.pad_token = tok.unk_token
        elif tok.pad_token_id is None:
            if tok.eos_token is None:
                raise ValueError(f"tokenizer of {name_or_path!r} has neither a pad, an unk nor an EOS token")
            tok.pad_token = tok.eos_token
    return tok
