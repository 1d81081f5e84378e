"""The import surface: the data pipeline loads without the model stack, importing changes nothing process-wide but
the `kernels` guard (hub_kernels.py), and the lower modules import nothing above them."""

from __future__ import annotations

import ast
import json
import os
import subprocess
import sys
from pathlib import Path

import qlora_lightning

PROBE = """
import json, logging, os, sys, warnings
env, filters = dict(os.environ), list(warnings.filters)
import qlora_lightning, qlora_lightning.data
from qlora_lightning.data import ExampleEncoder, InstructionCollator, format_record, get_template, load_source
print(json.dumps({"modules": sorted(m.split(".")[0] for m in sys.modules),
                  "env_changed": sorted(k for k in os.environ if env.get(k) != os.environ[k]),
                  "our_filters": [str(f[1]) for f in warnings.filters if f not in filters and "resum" in str(f[1])],
                  "bnb_logger_filtered": bool(logging.getLogger("bitsandbytes.backends.cpu.ops").filters),
                  "kernels_hidden": "kernels" in sys.modules and sys.modules["kernels"] is None}))
"""


def test_the_data_pipeline_imports_neither_bitsandbytes_nor_lightning_and_sets_only_the_kernels_guard():
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "USE_HUB_KERNELS")}
    done = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, env=env, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    found = json.loads(done.stdout.splitlines()[-1])
    assert "bitsandbytes" not in found["modules"] and "lightning" not in found["modules"]
    assert found["env_changed"] == ["USE_HUB_KERNELS"] and found["our_filters"] == []
    assert found["kernels_hidden"] and found["bnb_logger_filtered"]  # hub_kernels.keep_hub_kernels_out


def our_imports(path: Path, package: str) -> set[str]:
    """The modules of `qlora_lightning` that the file `path` (a module of `package`) imports, at its top or inside a
    function (relative names resolved; `from . import x` counts as importing `package.x`)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = package.rsplit(".", node.level - 1)[0] if node.level else ""
            module = ".".join(part for part in (base, node.module) if part)
            found |= {module} if node.module else {f"{module}.{alias.name}" for alias in node.names}
    return {name for name in found if name.startswith("qlora_lightning.")}


# The lowest modules and the only modules of ours each may import: the rest of the package sits above them.
LOWER_MODULES = {"atomic.py": set(), "held_out.py": set(), "resume.py": {"qlora_lightning.specs"}}


def test_the_lower_modules_import_nothing_of_ours_above_them():
    """`resume` imported `checkpoint` (which imports `resume`) inside a method to repair adapter folders: a cycle
    that an import at run time does not show. Every import statement of the file counts here."""
    package = Path(qlora_lightning.__file__).parent
    found = {name: our_imports(package / name, "qlora_lightning") - allowed for name, allowed in LOWER_MODULES.items()}
    assert found == {name: set() for name in LOWER_MODULES}
