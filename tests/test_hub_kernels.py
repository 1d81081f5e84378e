"""The `kernels` package (hub code fetched at run time) stays out of every entry unless USE_HUB_KERNELS asks for it.

A stand-in `kernels` package ahead on the path records whether anything imports it: unguarded, transformers'
availability check imports it (it has no dist-info) and bitsandbytes imports it on CPUs with AVX512-BF16."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
from qlora_testing import REPO

API = "import qlora_lightning.module, bitsandbytes; from transformers.models.llama import modeling_llama"


@pytest.fixture
def fake_kernels(tmp_path):
    """(environment, marker): a `kernels` package first on PYTHONPATH that writes `marker` when imported."""
    package = tmp_path / "site" / "kernels"
    package.mkdir(parents=True)
    marker = tmp_path / "imported"
    (package / "__init__.py").write_text(f"open({str(marker)!r}, 'w').close()\n")
    env = {k: v for k, v in os.environ.items() if k != "USE_HUB_KERNELS"}
    env["PYTHONPATH"] = os.pathsep.join([str(tmp_path / "site"), str(REPO), env.get("PYTHONPATH", "")])
    return env, marker


def run(args, env, cwd):
    done = subprocess.run([sys.executable, *args], capture_output=True, text=True, env=env, cwd=cwd, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    return done


@pytest.mark.parametrize(
    "args", [["-c", API], [str(REPO / "train.py"), "fit", "--print_config"]], ids=["python-api", "cli"]
)
def test_no_entry_imports_the_kernels_package(fake_kernels, tmp_path, args):
    env, marker = fake_kernels
    done = run(args, env, tmp_path)
    assert not marker.exists()
    assert "kernels" not in done.stderr  # nor bitsandbytes' advice to install it


def test_use_hub_kernels_lets_the_user_have_them(fake_kernels, tmp_path):
    env, marker = fake_kernels
    run(["-c", "import qlora_lightning, kernels"], {**env, "USE_HUB_KERNELS": "1"}, tmp_path)
    assert marker.exists()


def test_kernels_imported_first_is_warned_about(fake_kernels, tmp_path):
    env, _ = fake_kernels
    done = run(["-c", "import kernels, qlora_lightning"], env, tmp_path)
    assert "the `kernels` package was imported before qlora_lightning" in done.stderr


def test_no_advice_to_install_a_package_that_fetches_code_from_a_hub(tmp_path):
    """bitsandbytes logs "Failed to load CPU gemm_4bit_forward from kernels-community … pip install kernels" at
    import on CPUs with AVX512-BF16; the `kernels` package fetches code at run time, so our commands drop it."""
    plain = subprocess.run([sys.executable, "-c", "import bitsandbytes"], capture_output=True, text=True, timeout=300)
    if "kernels-community" not in plain.stderr:
        pytest.skip("bitsandbytes gives that advice only on CPUs with AVX512-BF16")
    done = subprocess.run(
        [sys.executable, str(REPO / "train.py"), "fit", "--print_config"],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert "kernels" not in done.stderr + done.stdout
