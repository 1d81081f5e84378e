"""The data pipeline: formats, prompt templates, tokenization, the resumable sampler and the DataModule.

Names are imported on first use: the formats, templates and tokenization need neither Lightning nor
bitsandbytes, so `import qlora_lightning.data` loads neither (only `InstructionDataModule` brings Lightning).
"""

from __future__ import annotations

from .. import lazy_exports

_EXPORTS = {
    "InstructionDataModule": "datamodule",
    "FORMATS": "formats",
    "Example": "formats",
    "RecordError": "formats",
    "format_record": "formats",
    "get_format": "formats",
    "register_format": "formats",
    "exact_match": "sample",
    "normalize_answer": "sample",
    "LengthGroupedSampler": "sampler",
    "BadRecordError": "sources",
    "load_source": "sources",
    "pick_subset": "sources",
    "QLORA_SYSTEM": "templates",
    "TEMPLATES": "templates",
    "format_prompt": "templates",
    "get_template": "templates",
    "render_source": "templates",
    "IGNORE_INDEX": "tokenize",
    "ExampleEncoder": "tokenize",
    "InstructionCollator": "tokenize",
    "encode_prompt": "tokenize",
    "special_prefix": "tokenize",
}

__all__ = sorted(_EXPORTS)


__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
