"""bench/idle_gaps.py: GPU idle time found between kernels and charged to the host events it falls in."""

from __future__ import annotations

import gzip
import json
import sys

from qlora_testing import REPO

if str(REPO) not in sys.path:  # `bench` is not installed: the package under test is the checkout's
    sys.path.insert(0, str(REPO))

from bench import idle_gaps  # noqa: E402


def _event(name: str, cat: str, ts: float, dur: float, tid: int = 1) -> dict:
    return {"ph": "X", "name": name, "cat": cat, "ts": ts, "dur": dur, "pid": 1, "tid": tid}


def test_idle_time_is_charged_to_the_host_events_running_meanwhile(tmp_path):
    events = [
        _event("gemm", "kernel", 0, 100, tid=7),  # GPU busy 0-100 and 300-400, two streams overlapping at 300-350
        _event("copy", "gpu_memcpy", 300, 50, tid=8),
        _event("dropout", "kernel", 320, 80, tid=7),
        _event("step", "user_annotation", 0, 500),  # host: the step holds the optimizer (idle 100-300) ...
        _event("Optimizer.step", "user_annotation", 120, 180),
        _event("aten::add_", "cpu_op", 150, 50),
        _event("aten::mm", "cpu_op", 10, 20),
        _event("other thread", "cpu_op", 100, 200, tid=2),  # ... while another thread's work is not charged
        _event("aten::mm", "cpu_op", 30, 5, tid=1),
    ]
    path = tmp_path / "trace.json.gz"
    with gzip.open(path, "wt") as f:
        json.dump({"traceEvents": events}, f)

    text = idle_gaps.report(path, rows=10)

    assert "GPU busy 0.2 ms, idle 0.2 ms" in text  # from the first host event (0) to the last GPU work (400)
    busy = idle_gaps.busy_intervals(idle_gaps.read_trace(path))
    assert busy == [(0, 100), (300, 400)]
    samples = idle_gaps.idle_samples(busy, 0, 400)
    assert len(samples) * idle_gaps.SAMPLE_US == 200  # 100-300
    host = [e for e in idle_gaps.read_trace(path) if e["cat"] != "kernel" and e["cat"] != "gpu_memcpy"]
    host = [e for e in host if e["tid"] == 1]
    inclusive, innermost = idle_gaps.charge(samples, host)
    assert inclusive["step"] == 200
    assert inclusive["Optimizer.step"] == 180  # 120-300
    assert innermost["aten::add_"] == 50
    assert innermost["Optimizer.step"] == 130
    assert innermost["step"] == 20  # 100-120: the step only
    assert "other thread" not in inclusive
