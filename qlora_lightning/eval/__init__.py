"""Evaluation: MMLU k-shot accuracy (standalone `evaluate_mmlu`, and `MMLUCallback` during training)."""

from .callback import MMLUCallback
from .mmlu import MMLUAccuracy, answer_token_ids, encode_questions, evaluate_mmlu, letter_logits, report, score
from .mmlu_data import LETTERS, MMLUData, Question, build_prompt, format_question, load_mmlu, prompt_header

__all__ = [
    "MMLUCallback",
    "MMLUAccuracy",
    "answer_token_ids",
    "encode_questions",
    "evaluate_mmlu",
    "letter_logits",
    "report",
    "score",
    "LETTERS",
    "MMLUData",
    "Question",
    "build_prompt",
    "format_question",
    "load_mmlu",
    "prompt_header",
]
