"""The data pipeline: formats, prompt templates, tokenization, the resumable sampler and the DataModule."""

from .datamodule import InstructionDataModule
from .formats import FORMATS, Example, RecordError, format_record, get_format, register_format
from .sample import bundled_paths, exact_match, normalize_answer
from .sampler import LengthGroupedSampler
from .sources import BadRecordError, load_source, pick_subset
from .templates import QLORA_SYSTEM, TEMPLATES, format_prompt, get_template, render_source
from .tokenize import IGNORE_INDEX, ExampleEncoder, InstructionCollator, encode_prompt, special_prefix

__all__ = [
    "InstructionDataModule",
    "Example",
    "RecordError",
    "BadRecordError",
    "FORMATS",
    "register_format",
    "get_format",
    "format_record",
    "TEMPLATES",
    "QLORA_SYSTEM",
    "get_template",
    "render_source",
    "format_prompt",
    "IGNORE_INDEX",
    "ExampleEncoder",
    "InstructionCollator",
    "encode_prompt",
    "special_prefix",
    "LengthGroupedSampler",
    "load_source",
    "pick_subset",
    "bundled_paths",
    "exact_match",
    "normalize_answer",
]
