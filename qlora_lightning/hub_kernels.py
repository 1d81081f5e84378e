"""Keep the `kernels` package out of this process unless the user asks for it.

`kernels` downloads compiled code from the Hugging Face hub and runs it. transformers 5.25 made it a hard
dependency, so every install now has it, and three things then happen without being asked for:

- `import bitsandbytes` on a CPU with AVX512-BF16 fetches `kernels-community/quantization-bitsandbytes` and runs
  it (offline it only logs "Failed to load CPU gemm_4bit_forward ... pip install kernels"); bitsandbytes' own CPU
  kernels serve otherwise;
- transformers wraps every attention and norm module's forward in `kernels`' dispatch, which mutates a global
  while it runs: inside a compiled, checkpointed decoder layer (`compile_layers`) that breaks the graph, so the
  layer runs in pieces and its dropout masks are drawn differently with and without checkpointing (seen with
  transformers 5.25.0, kernels 0.19.1, torch 2.13.0);
- transformers 5.25's `from_pretrained` defaults to `use_kernels=True`: it fetches hub kernels for the model's
  layers on every load, unless `USE_HUB_KERNELS` says no.

So `USE_HUB_KERNELS` (transformers' own switch) is set to `0` where the user has not set it, and `kernels` is hidden,
so that both libraries take the paths they take when it is not installed. `USE_HUB_KERNELS` set to a true value is
asking for hub kernels: then nothing is changed.
"""

from __future__ import annotations

import logging
import os
import sys
import warnings

__all__ = ["keep_hub_kernels_out"]

# How transformers reads USE_HUB_KERNELS (`utils.import_utils.is_env_variable_true`).
_TRUE = ("true", "1", "y", "yes", "on")


def keep_hub_kernels_out() -> None:
    """Unless `USE_HUB_KERNELS` asks for hub kernels: set it to `0` where unset, make `import kernels` fail in this
    process (as if it were not installed), and drop bitsandbytes' advice to install it. Must run before bitsandbytes
    or transformers' model code is imported (the package's `__init__` calls it); if `kernels` was imported earlier,
    warn, since its code may already have been fetched and transformers' modules wrapped."""
    if os.environ.get("USE_HUB_KERNELS", "").lower() in _TRUE:
        return
    os.environ.setdefault("USE_HUB_KERNELS", "0")
    logging.getLogger("bitsandbytes.backends.cpu.ops").addFilter(
        lambda record: "kernels-community" not in record.getMessage()
    )
    if sys.modules.get("kernels") is not None:
        warnings.warn(
            "the `kernels` package was imported before qlora_lightning, so bitsandbytes or transformers may already "
            "run code fetched from the hub, and compiled layers break into pieces: import qlora_lightning first, "
            "or set USE_HUB_KERNELS=1 to use hub kernels on purpose",
            stacklevel=3,
        )
        return
    sys.modules["kernels"] = None  # type: ignore[assignment]  # `import kernels` raises ImportError; find_spec → None
