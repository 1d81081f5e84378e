"""bench/train_throughput.py: the micro-batches a timed run is fed, several shapes and a repeated stack in one call
(a CPU dry run; the measurement itself means something on a GPU only)."""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
import train_throughput  # noqa: E402


@pytest.mark.parametrize("lengths", ["orca", "orca-grouped"])
def test_the_warm_up_runs_every_timed_shape_and_the_largest_micro_batch_first(lengths):
    args = argparse.Namespace(lengths=lengths, seq=512, target=128, batch=16, warmup=8, steps=7)
    batches = train_throughput.step_lengths(args)
    warmup, timed = batches[:8], batches[8:]
    assert len(timed) == 7 and all(len(b) == 16 for b in batches)
    assert all(b in warmup for b in timed)  # no shape is new when timing starts
    assert sum(warmup[0]) == max(sum(b) for b in batches)  # the peak memory is reached before timing
    assert len({sum(b) for b in timed}) == 7  # the timed steps vary in size, as the data does


def test_grouped_timed_steps_span_the_sizes_of_the_recipe_s_batches():
    args = argparse.Namespace(lengths="orca-grouped", seq=512, target=128, batch=16, warmup=1, steps=7)
    sizes = sorted(sum(b) for b in train_throughput.step_lengths(args)[1:])
    assert sizes[0] < 0.5 * 16 * 512 and sizes[-1] > 0.9 * 16 * 512


def test_its_shapes_are_the_random_shapes_the_loader_builds():
    from qlora_lightning.model import RANDOM_SHAPES

    assert tuple(RANDOM_SHAPES) == train_throughput.SHAPES


def test_one_call_runs_each_shape_in_turn_and_a_stack_named_twice_twice():
    script = Path(train_throughput.__file__)
    options = ["--stacks", "ours,ours", "--batch", "2", "--seq", "64", "--target", "16", "--steps", "1"]
    options += ["--inductor", "coordinate_descent_tuning=True"]  # passed on to each stack and named in the table
    out = subprocess.run(
        [sys.executable, str(script), "--shape", "tiny,tiny", *options, "--warmup", "1"],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    tables = out.stdout.split("### tiny, ")
    assert len(tables) == 1 + 2 * 2  # a table after each stack, for each shape
    for final in (tables[2], tables[4]):
        assert "| ours | " in final and "| ours (run 2) | " in final
        assert "compiled layers with Inductor options coordinate_descent_tuning=True." in final
    bad = subprocess.run([sys.executable, str(script), "--shape", "7b,8b"], capture_output=True, text=True)
    assert bad.returncode == 2 and "--shape: unknown ['8b']" in bad.stderr


def test_memory_peak_records_one_step_and_writes_its_report_with_the_graphs_code(tmp_path, monkeypatch):
    """`--memory-peak` on a stand-in CUDA allocator (no GPU here): only the chosen step is recorded, and the report
    and the generated code of the graphs live at the peak land in the folder."""
    graph = tmp_path / "torchinductor_root" / "ab" / "cab12.py"
    graph.parent.mkdir(parents=True)
    graph.write_text("def call(args): ...\n")
    frames = [{"filename": str(graph), "line": 3, "name": "call"}]
    calls = []
    memory = train_throughput.torch.cuda.memory
    monkeypatch.setattr(train_throughput, "sync", lambda: None)
    monkeypatch.setattr(train_throughput.torch.cuda, "memory_allocated", lambda: 2**30)
    monkeypatch.setattr(train_throughput.torch.cuda, "max_memory_allocated", lambda: 2**30 + 2**20)
    monkeypatch.setattr(train_throughput.torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(memory, "_record_memory_history", lambda enabled="all", **kw: calls.append(enabled))
    trace = [{"action": "alloc", "addr": 1, "size": 2**20, "frames": frames}]
    monkeypatch.setattr(memory, "_snapshot", lambda: {"device_traces": [trace]})
    args = argparse.Namespace(memory_peak=str(tmp_path / "peaks"), only="ours-compiled")
    recorder = train_throughput.MemoryPeakRecorder(args, step=2)
    for i in range(4):
        recorder.start(i)
        recorder.stop(i)
    assert calls == ["all", None]
    assert (tmp_path / "peaks" / "ours-compiled.txt").read_text().startswith("peak 1.001 GiB at event 0 of 1")
    assert (tmp_path / "peaks" / "ours-compiled-cab12.py").read_text() == graph.read_text()


def test_inductor_options_are_parsed_as_literals_and_checked_against_inductor_s_config():
    parsed = train_throughput.inductor_options(["fallback_random=False", "max_autotune_gemm_backends='ATEN'"])
    assert parsed == {"fallback_random": False, "max_autotune_gemm_backends": "ATEN"}
    for bad, said in [
        ("fallback_randomm=False", "Inductor has no option 'fallback_randomm'"),
        ("fallback_random", "expected KEY=VALUE"),
        ("fallback_random=no", "must be a Python literal"),
    ]:
        with pytest.raises(SystemExit, match=said):
            train_throughput.inductor_options([bad])
