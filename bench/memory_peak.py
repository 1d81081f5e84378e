"""What is allocated on the GPU at the peak of one training step, and where each part was allocated.

    python bench/train_throughput.py --shape 7b --stacks ours-compiled-offload --memory-peak /tmp/peaks

The harness records the caching allocator's history (`torch.cuda.memory._record_memory_history`) over one step
after warm-up and hands the snapshot to `report`. Replaying the step's allocations and frees from the memory
allocated when recording began finds the moment of the highest allocated total (what `max_memory_allocated`
reports); the blocks live then are grouped by where they were allocated (the innermost frames of our code,
transformers' or a compiled graph's), largest first, so that two runs' peaks can be compared line by line.
Memory allocated before the step (weights, LoRA factors, gradients, optimizer states on the card) has no recorded
origin and is one line. The compiled graphs' generated code that allocated live blocks (`generated_sources`) is
copied beside the report, since a site inside one names only its line.
"""

from __future__ import annotations

from collections import Counter

#: Frames inside these paths are torch's own machinery and say nothing about which tensor it is; a compiled graph's
#: generated code lives elsewhere (`torchinductor_*`) and is kept.
MACHINERY = ("/torch/", "/lightning/", "/lightning_fabric/", "/bitsandbytes/", "<frozen", "/contextlib.py")
#: Frames shown per allocation site, innermost first.
SITE_FRAMES = 3


def site(frames: list[dict]) -> str:
    """The allocation site of a block: its innermost `SITE_FRAMES` frames outside torch's machinery."""
    kept = [f for f in frames if not any(m in f["filename"] for m in MACHINERY)] or frames
    return " < ".join(f"{_short(f['filename'])}:{f['line']} {f['name']}" for f in kept[:SITE_FRAMES])


def _short(path: str) -> str:
    for root in ("qlora_lightning/", "transformers/", "bench/", "torchinductor_"):
        if root in path:
            return root + path.split(root, 1)[1]
    return path.rsplit("/", 1)[-1]


def peak(trace: list[dict], start_bytes: int) -> tuple[int, int, dict[int, dict]]:
    """Replay `trace` (one device's `device_traces`) from `start_bytes` allocated: (peak bytes, index of the event
    that reached it, the blocks allocated during the trace and live at that moment, by address). A block stops
    counting when its free is requested, as the allocator's own count (`memory_allocated`) does, even where a side
    stream's use keeps its memory from reuse a little longer."""
    live: dict[int, dict] = {}
    total = best = start_bytes
    at = -1
    best_live: dict[int, dict] = {}
    for i, event in enumerate(trace):
        action, addr = event["action"], event.get("addr")
        if action == "alloc":
            live[addr] = event
            total += event["size"]
            if total > best:
                best, at, best_live = total, i, dict(live)
        elif action == "free_requested":
            live.pop(addr, None)  # absent: allocated before recording began, so part of start_bytes
            total -= event["size"]
        elif action == "free_completed" and addr in live:  # a history recorded without free requests
            total -= live.pop(addr)["size"]
    return best, at, best_live


def report(snapshot: dict, start_bytes: int, allocator_peak: int | None = None, device: int = 0, rows: int = 25) -> str:
    """The peak of the recorded step as text: total, what was allocated before the step, and the live blocks
    grouped by allocation site, largest first (at most `rows` sites). `allocator_peak`, the allocator's own peak
    (`max_memory_allocated`) over a span that includes the step, is printed beside it as a check of the replay."""
    trace = snapshot["device_traces"][device]
    best, at, live = peak(trace, start_bytes)
    if at < 0:
        return f"no allocation in the recorded step rose above the {start_bytes / 2**30:.3f} GiB it began with\n"
    by_site: Counter[str] = Counter()
    blocks: Counter[str] = Counter()
    for event in live.values():
        key = site(event.get("frames", []))
        by_site[key] += event["size"]
        blocks[key] += 1
    born = sum(by_site.values())
    lines = [
        f"peak {best / 2**30:.3f} GiB at event {at} of {len(trace)}: {_short_event(trace[at])}",
        *(
            [f"  (the allocator's own peak over the run so far: {allocator_peak / 2**30:.3f} GiB)"]
            if allocator_peak
            else []
        ),
        f"  {(best - born) / 2**30:.3f} GiB allocated before the step and still live",
        f"  {born / 2**30:.3f} GiB allocated during the step, by site (MiB, blocks):",
    ]
    for key, size in by_site.most_common(rows):
        lines.append(f"  {size / 2**20:9.1f} {blocks[key]:4d}  {key}")
    if len(by_site) > rows:
        rest = sum(size for _, size in by_site.most_common()[rows:])
        lines.append(f"  {rest / 2**20:9.1f}       ({len(by_site) - rows} more sites)")
    return "\n".join(lines) + "\n"


def generated_sources(live: dict[int, dict]) -> list[str]:
    """The files of compiled graphs' generated code (Inductor's) that allocated any of `live`'s blocks."""
    return sorted(
        {f["filename"] for e in live.values() for f in e.get("frames", []) if "torchinductor_" in f["filename"]}
    )


def _short_event(event: dict) -> str:
    return f"{event['size'] / 2**20:.1f} MiB at {site(event.get('frames', []))}"
