"""Small summaries that both reports share: mean ± spread over seeds, its table cell, and an arm's base storage."""

from __future__ import annotations

import statistics


def mean_spread(values: list[float]) -> dict:
    """Mean, sample standard deviation, min, max and count of `values` (None entries, missing runs, left out)."""
    values = [v for v in values if v is not None]
    if not values:
        return {"mean": None, "std": None, "min": None, "max": None, "n": 0}
    return {
        "mean": statistics.fmean(values),
        "std": statistics.stdev(values) if len(values) > 1 else 0.0,
        "min": min(values),
        "max": max(values),
        "n": len(values),
    }


def fmt(stat: dict, digits: int = 4, scale: float = 1.0, suffix: str = "") -> str:
    """A `mean_spread` as the tables show it: "mean ± sd", the spread left out when every seed gave one value."""
    if stat is None or stat.get("mean") is None:
        return "–"
    text = f"{stat['mean'] * scale:,.{digits}f}{suffix}"
    return text + (f" ± {stat['std'] * scale:,.{digits}f}" if stat["n"] > 1 and stat["min"] != stat["max"] else "")


def storage(settings: dict) -> str:
    """How an arm stores its frozen base, in words ("NF4 + double quant, bfloat16 compute"), from its settings."""
    quantize, dtype = settings.get("quantize"), settings.get("compute_dtype")
    if quantize == "none":
        return f"{dtype} (16-bit LoRA)" if dtype != "float32" else "float32 (no quantization)"
    dq = " + double quant" if settings.get("double_quant", True) else ""
    return f"{quantize.upper()}{dq}, {dtype} compute"
