"""Where a profiled step leaves the GPU idle, and what the host was doing meanwhile.

    python bench/train_throughput.py --shape 7b --stacks ours-compiled-offload-packed --lengths orca --profile \
        --trace /tmp/traces [--trace-stack]
    python bench/idle_gaps.py /tmp/traces/ours-compiled-offload-packed.json.gz

Reads a Chrome trace of torch's profiler (host and GPU activity). The GPU is busy while any kernel, copy or memset
runs on any stream; every other moment between the step's first host event and its last GPU event is idle. Each
idle moment is charged to what the host's main thread was running then: its enclosing host events (operators,
annotations such as `Optimizer.step#...`, and with `--trace-stack` the Python frames). The report lists the idle
time by enclosing event, inclusive (a frame is charged for every idle moment inside it), so the largest rows under
the step's own frames say which host work the GPU waits for.
"""

from __future__ import annotations

import argparse
import gzip
import json
from collections import Counter
from pathlib import Path

#: Trace categories of GPU work, and of the host events an idle moment is charged to.
GPU_CATEGORIES = {"kernel", "gpu_memcpy", "gpu_memset"}
HOST_CATEGORIES = {"cpu_op", "user_annotation", "python_function", "cuda_runtime", "cuda_driver"}
#: The idle time is looked at every this many microseconds.
SAMPLE_US = 2.0


def read_trace(path: Path) -> list[dict]:
    """The trace's complete ("X") events."""
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt") as f:
        return [e for e in json.load(f)["traceEvents"] if e.get("ph") == "X" and "dur" in e]


def busy_intervals(events: list[dict]) -> list[tuple[float, float]]:
    """The GPU's busy time as disjoint, sorted (start, end) intervals in microseconds."""
    spans = sorted((e["ts"], e["ts"] + e["dur"]) for e in events if e.get("cat") in GPU_CATEGORIES)
    merged: list[list[float]] = []
    for start, end in spans:
        if merged and start <= merged[-1][1]:
            merged[-1][1] = max(merged[-1][1], end)
        else:
            merged.append([start, end])
    return [(a, b) for a, b in merged]


def idle_samples(busy: list[tuple[float, float]], start: float, end: float) -> list[float]:
    """Moments (every SAMPLE_US) between `start` and `end` at which no GPU work runs."""
    samples, t, i = [], start, 0
    while t < end:
        while i < len(busy) and busy[i][1] <= t:
            i += 1
        if i < len(busy) and busy[i][0] <= t:
            t = busy[i][1]
            continue
        samples.append(t)
        t += SAMPLE_US
    return samples


def main_thread(events: list[dict]) -> tuple:
    """(pid, tid) of the thread with the most host operators: the training loop's."""
    counts = Counter((e["pid"], e["tid"]) for e in events if e.get("cat") == "cpu_op")
    return counts.most_common(1)[0][0]


def charge(samples: list[float], host: list[dict]) -> tuple[Counter, Counter]:
    """Idle microseconds per enclosing host event name: inclusive (every enclosing event) and innermost."""
    inclusive: Counter = Counter()
    innermost: Counter = Counter()
    host = sorted(host, key=lambda e: (e["ts"], -e["dur"]))
    stack: list[dict] = []
    j = 0
    for t in samples:
        while j < len(host) and host[j]["ts"] <= t:
            e = host[j]
            while stack and stack[-1]["ts"] + stack[-1]["dur"] <= e["ts"]:
                stack.pop()
            stack.append(e)
            j += 1
        while stack and stack[-1]["ts"] + stack[-1]["dur"] <= t:
            stack.pop()
        live = [e for e in stack if e["ts"] + e["dur"] > t]
        for name in {e["name"] for e in live}:
            inclusive[name] += SAMPLE_US
        innermost[live[-1]["name"] if live else "(host outside any event)"] += SAMPLE_US
    return inclusive, innermost


def report(path: Path, rows: int) -> str:
    """The idle summary of one trace, as text."""
    events = read_trace(path)
    busy = busy_intervals(events)
    if not busy:
        raise SystemExit(f"{path}: no GPU work in the trace (profiled on the CPU?)")
    thread = main_thread(events)
    host = [e for e in events if e.get("cat") in HOST_CATEGORIES and (e["pid"], e["tid"]) == thread]
    start = min(e["ts"] for e in host)
    end = max(b for _, b in busy)
    samples = idle_samples(busy, start, end)
    inclusive, innermost = charge(samples, host)
    busy_ms = sum(min(b, end) - max(a, start) for a, b in busy if b > start) / 1e3
    lines = [
        f"{path.name}: {(end - start) / 1e3:.1f} ms from the first host event to the last GPU work; GPU busy "
        f"{busy_ms:.1f} ms, idle {len(samples) * SAMPLE_US / 1e3:.1f} ms",
        "",
        "idle ms | inclusive: host events the idle time falls in",
    ]
    lines += [f"{us / 1e3:8.1f} | {name[:140]}" for name, us in inclusive.most_common(rows)]
    lines += ["", "idle ms | innermost host event"]
    lines += [f"{us / 1e3:8.1f} | {name[:140]}" for name, us in innermost.most_common(rows)]
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("traces", nargs="+", type=Path, help="Chrome traces (.json or .json.gz) of torch's profiler")
    p.add_argument("--rows", type=int, default=40, help="rows per table")
    args = p.parse_args()
    for path in args.traces:
        print(report(path, args.rows), end="\n\n")


if __name__ == "__main__":
    main()
