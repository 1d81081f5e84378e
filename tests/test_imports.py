"""The import surface: the data pipeline loads without the model stack, and importing changes nothing process-wide."""

from __future__ import annotations

import json
import os
import subprocess
import sys

PROBE = """
import json, logging, os, sys, warnings
env, filters = dict(os.environ), list(warnings.filters)
import qlora_lightning, qlora_lightning.data
from qlora_lightning.data import ExampleEncoder, InstructionCollator, format_record, get_template, load_source
print(json.dumps({"modules": sorted(m.split(".")[0] for m in sys.modules),
                  "env_changed": sorted(k for k in os.environ if env.get(k) != os.environ[k]),
                  "our_filters": [str(f[1]) for f in warnings.filters if f not in filters and "resum" in str(f[1])],
                  "bnb_logger_filtered": bool(logging.getLogger("bitsandbytes.backends.cpu.ops").filters)}))
"""


def test_the_data_pipeline_imports_neither_bitsandbytes_nor_lightning_and_sets_nothing():
    env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
    done = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, env=env, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    found = json.loads(done.stdout.splitlines()[-1])
    assert "bitsandbytes" not in found["modules"] and "lightning" not in found["modules"]
    assert found["env_changed"] == [] and found["our_filters"] == [] and not found["bnb_logger_filtered"]
