"""bench/memory_peak.py: the peak of a recorded allocator history and the blocks live at it, by allocation site."""

from __future__ import annotations

import sys

from qlora_testing import REPO

if str(REPO) not in sys.path:  # `bench` is not installed: the package under test is the checkout's
    sys.path.insert(0, str(REPO))

from bench import memory_peak  # noqa: E402

MIB = 2**20


def _frame(path: str, line: int, name: str) -> dict:
    return {"filename": path, "line": line, "name": name}


LORA = [
    _frame("/site/torch/autograd/function.py", 575, "apply"),  # torch's machinery: not part of the site
    _frame("/repo/qlora_lightning/lora_autograd.py", 60, "forward"),
    _frame("/repo/qlora_lightning/lora.py", 62, "forward"),
    _frame("/site/transformers/models/llama/modeling_llama.py", 150, "forward"),
    _frame("/repo/bench/train_throughput.py", 900, "main"),
]
GRAPH = [_frame("/tmp/torchinductor_root/ab/cab12.py", 88, "call")]


def _alloc(addr: int, mib: int, frames: list[dict]) -> dict:
    return {"action": "alloc", "addr": addr, "size": mib * MIB, "frames": frames}


def _free(addr: int, mib: int, action: str = "free_completed") -> dict:
    return {"action": action, "addr": addr, "size": mib * MIB, "frames": []}


def test_the_peak_holds_the_blocks_live_then_and_frees_count_when_requested():
    trace = [
        _alloc(1, 100, LORA),
        _alloc(2, 50, GRAPH),  # the peak: 1000 + 100 + 50
        _free(1, 100, "free_requested"),  # no longer allocated, as the allocator counts it ...
        _alloc(3, 30, GRAPH),
        _free(1, 100),  # ... though its memory is reusable only now (a side stream used it)
        _free(900, 120, "free_requested"),  # a block from before the recording: it leaves the starting total
        _free(900, 120),
        _alloc(4, 180, LORA),  # 1000 - 120 + 50 + 30 + 180 = 1140 < 1150
        _free(4, 180),  # a history without free requests: the completed free counts
    ]
    best, at, live = memory_peak.peak(trace, 1000 * MIB)
    assert (best, at) == (1150 * MIB, 1)
    assert sorted(live) == [1, 2]


def test_the_report_groups_live_blocks_by_site_outside_torch_s_machinery():
    trace = [_alloc(1, 64, LORA), _alloc(2, 64, LORA), _alloc(3, 10, GRAPH), _free(2, 64), _free(3, 10)]
    text = memory_peak.report({"device_traces": [trace]}, 1024 * MIB, allocator_peak=1190 * MIB)
    lines = text.splitlines()
    assert lines[0].startswith("peak 1.135 GiB at event 2 of 5: 10.0 MiB at torchinductor_root/ab/cab12.py:88 call")
    assert lines[1] == "  (the allocator's own peak over the run so far: 1.162 GiB)"
    assert lines[2] == "  1.000 GiB allocated before the step and still live"
    lora_site = (
        "qlora_lightning/lora_autograd.py:60 forward < qlora_lightning/lora.py:62 forward"
        " < transformers/models/llama/modeling_llama.py:150 forward"
    )
    assert lines[4] == f"      128.0    2  {lora_site}"
    assert lines[5] == "       10.0    1  torchinductor_root/ab/cab12.py:88 call"


def test_a_step_that_allocates_nothing_new_says_so():
    text = memory_peak.report({"device_traces": [[_free(9, 10)]]}, 512 * MIB)
    assert text.startswith("no allocation in the recorded step rose above the 0.500 GiB it began with")


def test_the_generated_code_of_compiled_graphs_live_at_the_peak_is_named():
    live = {1: _alloc(1, 64, LORA), 2: _alloc(2, 10, GRAPH), 3: _alloc(3, 10, GRAPH)}
    assert memory_peak.generated_sources(live) == ["/tmp/torchinductor_root/ab/cab12.py"]
