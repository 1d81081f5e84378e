"""`python -m bench.fidelity ...` or `python bench/fidelity ...`: the experiment's command line (see `cli`)."""

import sys
from pathlib import Path

if not __package__:  # run as a folder (`python bench/fidelity`): the repository root makes `bench` importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from bench.fidelity.cli import main  # noqa: E402

main()
