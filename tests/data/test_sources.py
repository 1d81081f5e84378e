"""sources.py: every kind of source, bad records named by file, line and field, unreadable files and folders,
the data caches (keyed, parallel, unwritable, failed writes), the fixed train/validation subset, and the parallel
tokenizing processes, which die with the main process instead of running on as orphans."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import datasets
import multiprocess
import pandas as pd
import pytest

from qlora_lightning.data import BadRecordError, pick_subset, sources
from qlora_lightning.data.tokenize import ExampleEncoder

# ---------------------------------------------------------------------------------------- subset


def test_subset_is_fixed_by_seed_and_val_never_moves():
    train, val = pick_subset(1000, seed=42, max_examples=300, val_size=50)
    assert len(train) == 300 and len(val) == 50 and not set(train) & set(val)
    again_train, again_val = pick_subset(1000, seed=42, max_examples=300, val_size=50)
    assert (train == again_train).all() and (val == again_val).all()
    more_train, more_val = pick_subset(1000, seed=42, max_examples=600, val_size=50)
    assert (more_val == val).all() and set(train) <= set(more_train)  # a bigger budget extends the same subset
    other_train, _ = pick_subset(1000, seed=43, max_examples=300, val_size=50)
    assert set(other_train) != set(train)
    all_train, _ = pick_subset(1000, seed=42, max_examples=None, val_size=50)
    assert len(all_train) == 950
    with pytest.raises(ValueError, match="val_size"):
        pick_subset(10, seed=42, max_examples=None, val_size=10)


# ---------------------------------------------------------------------------------------- sources


def _orca_frame(n=6):
    return pd.DataFrame(
        {
            "system_prompt": [""] * n,
            "question": [f"What is {i} + 1?" for i in range(n)],
            "response": [str(i + 1) for i in range(n)],
        }
    )


def test_every_kind_of_source(dm_args, setup_dm, decoded, tmp_path, write_jsonl):
    frame = _orca_frame()
    records = frame.to_dict("records")
    expected = sorted(f" {r['response']}<|im_end|>" for r in records)
    (tmp_path / "array.json").write_text(json.dumps(records))
    frame.to_parquet(tmp_path / "data.parquet")
    frame.to_csv(tmp_path / "data.csv", index=False)
    datasets.Dataset.from_pandas(frame).save_to_disk(str(tmp_path / "saved"))
    datasets.DatasetDict({"train": datasets.Dataset.from_pandas(frame)}).save_to_disk(str(tmp_path / "saved_dict"))
    repo = tmp_path / "repo"  # a folder laid out like a hub dataset: read by load_dataset(name), the hub path
    repo.mkdir()
    frame.to_json(repo / "train.jsonl", orient="records", lines=True)
    frame.head(2).to_json(repo / "validation.jsonl", orient="records", lines=True)
    sources_ = [
        write_jsonl(records),
        tmp_path / "array.json",
        tmp_path / "data.parquet",
        tmp_path / "data.csv",
        tmp_path / "saved",
        tmp_path / "saved_dict",
        repo,
    ]
    for source in sources_:
        dm = setup_dm(**{**dm_args, "dataset": str(source)})
        assert sorted(decoded(dm) + decoded(dm, "val")) == expected, source

    dm = setup_dm(**{**dm_args, "dataset": str(repo), "val_dataset": str(repo), "val_size": 0})
    assert len(dm.train_data) == 6 and decoded(dm, "val") == [" 1<|im_end|>", " 2<|im_end|>"]
    with pytest.raises(ValueError, match=r"cannot load dataset '\S*no-such-org/no-such-dataset'"):
        setup_dm(**{**dm_args, "dataset": "no-such-org/no-such-dataset"})
    with pytest.raises(FileNotFoundError, match="does not exist"):
        setup_dm(**{**dm_args, "dataset": str(tmp_path / "missing.jsonl")})


def test_bundled_sample(dm_args, setup_dm):
    dm = setup_dm(**{**dm_args, "dataset": "bundled:orca_sample_train", "val_dataset": "bundled:orca_sample_val"})
    assert len(dm.train_data) == 400 and len(dm.val_data) == 100
    with pytest.raises(FileNotFoundError, match="bundled: bundled:orca_sample_train, bundled:orca_sample_val"):
        setup_dm(**{**dm_args, "dataset": "bundled:nope"})


# -------------------------------------------------------------------------------------- bad input

GOOD = {"system_prompt": "", "question": "What is 1 + 1?", "response": "2"}


@pytest.mark.parametrize(
    "lines, where, problem",
    [
        ([GOOD, GOOD, '{"question": "q", "response": "r"', GOOD], "line 3", "malformed JSON"),
        ([GOOD, {"response": "2"}, GOOD], "line 2", "field 'question': missing"),
        ([GOOD, GOOD, {**GOOD, "response": 2}], "line 3", "field 'response': must be a string, got int"),
        ([GOOD, {**GOOD, "response": ""}, GOOD, GOOD], "line 2", "field 'response': is empty"),
        ([GOOD, "", GOOD, '["a list"]'], "line 4", "expected a JSON object"),  # blank lines keep numbering
        # valid JSON that json.loads accepts, but a lone surrogate is no text a tokenizer can take
        ([GOOD, '{"question": "caf\\ud800", "response": "r"}'], "line 2", "field 'question': is not valid text"),
        ([GOOD, "[" * 100_000 + "]" * 100_000, GOOD], "line 2", "JSON nested too deeply to parse"),
    ],
)
def test_bad_jsonl_records_name_file_line_and_field(dm_args, setup_dm, write_jsonl, lines, where, problem):
    path = write_jsonl(lines)
    with pytest.raises(BadRecordError, match=re.escape(f"{path}: {where}: ") + ".*" + re.escape(problem)):
        setup_dm(**{**dm_args, "dataset": str(path), "val_size": 0})


def test_bad_table_rows_and_json_arrays(dm_args, setup_dm, tmp_path):
    frame = _orca_frame()
    frame["response"] = list(range(6))  # ints: a non-string field in every row
    frame.to_parquet(tmp_path / "bad.parquet")
    with pytest.raises(
        BadRecordError,
        match=re.escape(f"{tmp_path / 'bad.parquet'}: row ") + r"\d: field 'response': must be a string, got int",
    ):
        setup_dm(**{**dm_args, "dataset": str(tmp_path / "bad.parquet")})
    frame = _orca_frame()
    frame.loc[3, "response"] = None
    frame.to_csv(tmp_path / "bad.csv", index=False)
    with pytest.raises(BadRecordError, match=re.escape(f"{tmp_path / 'bad.csv'}: row 3: field 'response': is null")):
        setup_dm(**{**dm_args, "dataset": str(tmp_path / "bad.csv"), "val_size": 0})
    (tmp_path / "bad.json").write_text('[\n{"question": "q", "response": "r"},\n{"question": }\n]')
    with pytest.raises(BadRecordError, match=re.escape(f"{tmp_path / 'bad.json'}: line 3: malformed JSON")):
        setup_dm(**{**dm_args, "dataset": str(tmp_path / "bad.json")})
    (tmp_path / "arr.json").write_text(json.dumps([GOOD, {**GOOD, "question": ""}, GOOD]))
    with pytest.raises(
        BadRecordError, match=re.escape(f"{tmp_path / 'arr.json'}: record 1: field 'question': is empty")
    ):
        setup_dm(**{**dm_args, "dataset": str(tmp_path / "arr.json"), "val_size": 0})


@pytest.mark.parametrize("lines_before", [0, 200], ids=["in-the-first-4KB", "far-past-them"])
def test_bytes_that_are_not_utf8_name_the_line(dm_args, setup_dm, tmp_path, lines_before):
    good = (json.dumps(GOOD) + "\n").encode()
    latin1 = '{"question": "Caf\xe9?", "response": "Oui."}\n'.encode("latin-1")  # é is byte 0xe9, not UTF-8
    problem = f"line {lines_before + 1}: not UTF-8 text: byte 0xe9 at column 18"
    path = tmp_path / "data.jsonl"
    path.write_bytes(good * lines_before + latin1 + good * 5)
    with pytest.raises(BadRecordError, match=re.escape(f"{path}: {problem}; save the file as UTF-8")):
        setup_dm(**{**dm_args, "dataset": str(path), "val_size": 0})
    skipped = f"skipped 1 bad records (on_bad_record: skip); the first: {path}: {problem}"
    with pytest.warns(UserWarning, match=re.escape(skipped)):
        dm = setup_dm(**{**dm_args, "dataset": str(path), "val_size": 0, "on_bad_record": "skip"})
    assert len(dm.train_data) == lines_before + 5

    array = tmp_path / "array.json"  # one JSON array: no record can be skipped, the line is still named
    records = [good.strip()] * lines_before + [latin1.strip(), good.strip()]
    array.write_bytes(b"[\n" + b",\n".join(records) + b"\n]\n")
    with pytest.raises(BadRecordError, match=re.escape(f"{array}: line {lines_before + 2}: not UTF-8 text: byte 0xe9")):
        setup_dm(**{**dm_args, "dataset": str(array), "val_size": 0, "on_bad_record": "skip"})


def test_a_text_file_named_jsonl_is_named_as_not_json(dm_args, setup_dm, write_jsonl):
    """Lines that are no JSON were reported as "val_size must be smaller than the number of records"."""
    path = write_jsonl(["Hello there.", "", "Some notes, not JSON."])
    problem = f"{path}: line 1: not a JSON object: 'Hello there.'; a JSON Lines file holds one JSON object"
    with pytest.raises(BadRecordError, match=re.escape(problem)):
        setup_dm(**{**dm_args, "dataset": str(path), "val_size": 1024})


def _dataset_folder(root: Path, *files: list[str]) -> Path:
    """A local folder laid out like a hub dataset repository: `data/train-0000i-of-0000n.jsonl`, one per file."""
    (root / "data").mkdir(parents=True)
    for i, lines in enumerate(files):
        (root / "data" / f"train-{i:05d}-of-{len(files):05d}.jsonl").write_text("\n".join(lines) + "\n")
    return root


def test_a_dataset_folder_names_the_file_and_line_of_a_bad_record(dm_args, setup_dm, tmp_path):
    """A folder laid out like a hub repository is read file by file as a single file is: a bad line is named by its
    file and line (datasets named neither), and one field of the wrong type blames its own record (datasets made the
    whole column that type: good row 0 was blamed and `skip` dropped all 40)."""
    good = [json.dumps({**GOOD, "question": f"What is {i} + 1?"}) for i in range(40)]
    typed = _dataset_folder(
        tmp_path / "typed", good[:20], good[20:27] + [json.dumps({**GOOD, "response": 2})] + good[28:]
    )
    problem = f"{typed / 'data' / 'train-00001-of-00002.jsonl'}: line 8: field 'response': must be a string, got int"
    with pytest.raises(BadRecordError, match=re.escape(problem)):
        setup_dm(**{**dm_args, "dataset": str(typed)})
    with pytest.warns(
        UserWarning, match=re.escape(f"skipped 1 bad records (on_bad_record: skip); the first: {problem}")
    ):
        dm = setup_dm(**{**dm_args, "dataset": str(typed), "on_bad_record": "skip"})
    assert len(dm.train_data) + len(dm.val_data) == 39
    malformed = _dataset_folder(tmp_path / "malformed", good[:5] + ['{"question": "q", "response": '] + good[6:])
    with pytest.raises(
        BadRecordError, match=re.escape(f"{malformed / 'data' / 'train-00000-of-00001.jsonl'}: line 6: malformed JSON")
    ):
        setup_dm(**{**dm_args, "dataset": str(malformed)})
    with pytest.raises(ValueError, match=re.escape(f"{malformed}: no split 'validation'; splits: train")):
        setup_dm(**{**dm_args, "dataset": str(malformed), "split": "validation"})


def test_a_file_size_limit_hit_while_caching_is_named_as_a_write_failure(tmp_path, bos_tokenizer):
    """A real write past `ulimit -f` (RLIMIT_FSIZE, the same EFBIG as a full disk) while caching the data was reported
    as "cannot be read as jsonl". The file read takes 137 kB of cache, its tokens 595 kB: a limit of 60 kB stops the
    first write, one of 300 kB the second."""
    bos_tokenizer.save_pretrained(tmp_path / "tokenizer")
    data = tmp_path / "data.jsonl"
    record = {**GOOD, "question": "What is 1 + 1? " + "x" * 200}
    data.write_text("".join(json.dumps(record) + "\n" for _ in range(500)))
    cache = tmp_path / "cache"
    script = textwrap.dedent(f"""
        import resource, signal
        from qlora_lightning.data import InstructionDataModule
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        for limit in (60_000, 300_000):
            resource.setrlimit(resource.RLIMIT_FSIZE, (limit, resource.RLIM_INFINITY))
            data = InstructionDataModule({str(tmp_path / "tokenizer")!r}, dataset={str(data)!r}, val_size=10,
                                         cache_dir={str(cache)!r})
            try:
                data.setup()
            except OSError as e:
                print(type(e).__name__, e)
    """)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    advice = "MiB free there); free disk space, raise the file-size limit (ulimit -f), or set data.cache_dir"
    failures = done.stdout.splitlines()
    assert len(failures) == 2 and all(advice in line for line in failures), done.stdout
    for line, (folder, during) in zip(
        failures, [(cache, "reading"), (cache / "qlora_lightning", "tokenizing")], strict=True
    ):
        assert line.startswith(
            f"CacheWriteError cannot write the data cache in {folder} while {during} {data}: File too large ("
        )


def test_too_deep_json_arrays_and_skipping_unreadable_lines(dm_args, setup_dm, tmp_path, write_jsonl):
    deep = tmp_path / "deep.json"
    deep.write_text("[" + json.dumps(GOOD) + ", " + "[" * 100_000 + "]" * 100_000 + "]")
    with pytest.raises(BadRecordError, match=re.escape(f"{deep}: JSON nested too deeply to parse")):
        setup_dm(**{**dm_args, "dataset": str(deep), "val_size": 0})
    path = write_jsonl([GOOD, "[" * 100_000 + "]" * 100_000, '{"question": "\\udfff", "response": "r"}', GOOD, GOOD])
    with pytest.warns(UserWarning, match="skipped 2 bad records .*line 2: JSON nested too deeply"):
        dm = setup_dm(**{**dm_args, "dataset": str(path), "val_size": 0, "on_bad_record": "skip"})
    assert len(dm.train_data) == 3


def test_a_cache_folder_that_cannot_be_written_is_named(dm_args, setup_dm, tmp_path, write_jsonl):
    data = str(write_jsonl([GOOD] * 4))
    (tmp_path / "a_file").write_text("")
    unwritable = [tmp_path / "a_file" / "cache"]  # mkdir fails under a file, even for root
    if os.geteuid() != 0:  # root ignores permissions
        (tmp_path / "readonly").mkdir(mode=0o500)
        unwritable.append(tmp_path / "readonly")
    for folder in unwritable:
        problem = re.escape(f"the cache folder {folder} is not writable (") + r"[^)]+\): "
        advice = re.escape("set data.cache_dir (or HF_DATASETS_CACHE, used when data.cache_dir is unset)")
        with pytest.raises(PermissionError, match=problem + advice):
            setup_dm(**{**dm_args, "dataset": data, "cache_dir": str(folder)})


def test_empty_unreadable_and_unsupported_files_are_named(dm_args, setup_dm, tmp_path):
    (tmp_path / "empty.jsonl").write_text("")
    with pytest.raises(BadRecordError, match=re.escape(f"{tmp_path / 'empty.jsonl'}: the file is empty")):
        setup_dm(**{**dm_args, "dataset": str(tmp_path / "empty.jsonl")})
    (tmp_path / "blank.jsonl").write_text("\n  \n")
    with pytest.raises(BadRecordError, match=re.escape(f"{tmp_path / 'blank.jsonl'}: no records")):
        setup_dm(**{**dm_args, "dataset": str(tmp_path / "blank.jsonl")})
    (tmp_path / "broken.parquet").write_bytes(b"not parquet at all")
    with pytest.raises(BadRecordError, match=re.escape(f"{tmp_path / 'broken.parquet'}: cannot be read as parquet")):
        setup_dm(**{**dm_args, "dataset": str(tmp_path / "broken.parquet")})
    (tmp_path / "data.txt").write_text("x")
    with pytest.raises(ValueError, match="unsupported file type '.txt'"):
        setup_dm(**{**dm_args, "dataset": str(tmp_path / "data.txt")})


def test_skip_drops_bad_records_and_warns_once(dm_args, setup_dm, write_jsonl):
    lines = [GOOD, "{oops", {**GOOD, "response": None}, {**GOOD, "question": "What is 2 + 2?"}, {"question": 3}] + [
        GOOD
    ] * 5
    path = write_jsonl(lines)
    with pytest.warns(UserWarning) as caught:
        dm = setup_dm(**{**dm_args, "dataset": str(path), "on_bad_record": "skip", "val_size": 1})
    messages = [str(w.message) for w in caught if "skipped" in str(w.message)]
    assert len(messages) == 1 and messages[0].startswith("skipped 3 bad records") and str(path) in messages[0]
    assert len(dm.train_data) + len(dm.val_data) == 7
    assert sum(b["input_ids"].shape[0] for b in dm.train_dataloader()) == len(dm.train_data) // 4 * 4  # full batches
    with pytest.raises(BadRecordError, match=r"line 2: malformed JSON.*\(2 more bad records\)"):
        setup_dm(**{**dm_args, "dataset": str(path), "val_size": 1})
    only_bad = write_jsonl(["{oops", {"question": 3}], "bad.jsonl")
    with pytest.raises(BadRecordError, match="no usable records left for training: skipped 2 bad records"):
        setup_dm(**{**dm_args, "dataset": str(only_bad), "on_bad_record": "skip", "val_size": 0})


# -------------------------------------------------------------------------------------- caching


def test_tokenization_is_cached_and_keyed(dm_args, setup_dm, write_jsonl, orca_records, monkeypatch):
    path = str(write_jsonl(orca_records(30)))
    first = setup_dm(**{**dm_args, "dataset": path})
    cache = sorted((Path(dm_args["cache_dir"]) / "qlora_lightning").glob("tokenized-*.arrow"))
    assert len(cache) == 2  # train and val

    def fail(self, examples):
        raise AssertionError("tokenized again although cached")

    with monkeypatch.context() as m:
        m.setattr(ExampleEncoder, "encode", fail)
        again = setup_dm(**{**dm_args, "dataset": path})
    assert again.train_data["input_ids"] == first.train_data["input_ids"]
    other = setup_dm(**{**dm_args, "dataset": path, "template": "alpaca", "target_max_len": 2})
    assert other.train_data["input_ids"] != first.train_data["input_ids"]
    assert max(r["length"] - r["n_source"] for r in other.train_data) == 2


def test_parallel_tokenization_equals_serial(dm_args, setup_dm, write_jsonl, orca_records, monkeypatch):
    path = str(write_jsonl(orca_records(60)))
    serial = setup_dm(**{**dm_args, "dataset": path, "num_proc": None})
    monkeypatch.setattr(sources, "PARALLEL_MIN_RECORDS", 0)
    parallel = setup_dm(**{**dm_args, "dataset": path, "num_proc": 2, "cache_dir": dm_args["cache_dir"] + "-par"})
    assert parallel.train_data["input_ids"] == serial.train_data["input_ids"]
    assert list((Path(dm_args["cache_dir"] + "-par") / "qlora_lightning").glob("*_of_00002.arrow"))


# ---------------------------------------------------------------------------------------- parallel workers

# Builds the data module with 2 tokenizing processes; each worker marks its pid, then tokenizes slowly enough
# to be caught at work. Run with: tokenizer folder, data file, cache folder, folder for the marks.
SETUP_SLOWLY = """
import os, sys, time
from pathlib import Path
from qlora_lightning.data import InstructionDataModule
from qlora_lightning.data.tokenize import ExampleEncoder

tokenizer, data, cache, marks = sys.argv[1:]
encode = ExampleEncoder.encode

def slow_encode(self, examples):
    Path(marks, str(os.getpid())).touch()
    time.sleep(300)
    return encode(self, examples)

ExampleEncoder.encode = slow_encode  # the workers are forked, so they have it too
dm = InstructionDataModule(tokenizer=tokenizer, dataset=data, max_examples=None, val_size=0, num_proc=2, num_workers=0,
                           cache_dir=cache)
dm.setup("fit")
"""


def _stat(pid: int) -> tuple[str, int] | None:
    """(state, parent pid) of a process from /proc, None once it is gone."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (FileNotFoundError, ProcessLookupError):
        return None
    return fields[0], int(fields[1])


def _running(pid: int) -> bool:
    """Whether the process exists and has not ended (a zombie has ended, only not been reaped yet)."""
    stat = _stat(pid)
    return stat is not None and stat[0] not in ("Z", "X")


def _children(pid: int) -> list[int]:
    """The pids of the processes whose parent is `pid`."""
    stats = {int(p.name): _stat(int(p.name)) for p in Path("/proc").iterdir() if p.name.isdigit()}
    return [child for child, stat in stats.items() if stat and stat[1] == pid]


def _wait_until(condition, timeout: float, what: str):
    """Poll `condition` until it returns something true, and return that; fail after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while not (result := condition()):
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout} s waiting until {what}")
        time.sleep(0.1)
    return result


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the parent-death signal is Linux's (prctl)")
@pytest.mark.skipif(multiprocess.get_all_start_methods()[0] != "fork", reason="only forked workers are set to die")
def test_tokenizing_processes_die_when_the_main_process_is_killed(tmp_path, bos_tokenizer, write_jsonl, orca_records):
    bos_tokenizer.save_pretrained(tmp_path / "tok")
    data = write_jsonl(orca_records(sources.PARALLEL_MIN_RECORDS))  # the fewest records that are tokenized in parallel
    marks = tmp_path / "marks"
    marks.mkdir()
    args = [str(tmp_path / "tok"), str(data), str(tmp_path / "cache"), str(marks)]
    main = subprocess.Popen([sys.executable, "-c", SETUP_SLOWLY, *args])
    children: list[int] = []
    try:

        def tokenizing():
            assert main.poll() is None, "the data module's setup ended before its workers tokenized"
            found = [int(p.name) for p in marks.iterdir()]
            return found if len(found) >= 2 else None

        workers = _wait_until(tokenizing, 120, "2 workers tokenize")
        children = _children(main.pid)  # the workers, and the manager of the queue that `datasets` starts
        assert set(workers) < set(children)
        main.kill()  # SIGKILL: the main process cannot clean up
        main.wait()
        _wait_until(lambda: not any(map(_running, children)), 5, f"the orphaned processes {children} end")
    finally:
        children = children or _children(main.pid)
        main.kill()
        main.wait()
        for pid in children:
            if _running(pid):
                os.kill(pid, signal.SIGKILL)  # what the test started must not outlive it, even when it fails


# Tokenizes in parallel (2 forked workers), then forks a child of its own and prints the child's parent-death signal.
FORK_AFTER_TOKENIZING = """
import ctypes, os, sys
from qlora_lightning.data import InstructionDataModule, sources

sources.PARALLEL_MIN_RECORDS = 0
tokenizer, data, cache = sys.argv[1:]
InstructionDataModule(tokenizer=tokenizer, dataset=data, val_size=0, num_proc=2, num_workers=0,
                      cache_dir=cache).setup("fit")
signal = ctypes.c_int(-1)
read, write = os.pipe()
if (pid := os.fork()) == 0:
    ctypes.CDLL(None).prctl(2, ctypes.byref(signal))  # PR_GET_PDEATHSIG
    os.write(write, str(signal.value).encode())
    os._exit(0)
os.waitpid(pid, 0)
print("child's parent-death signal:", os.read(read, 16).decode())
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the parent-death signal is Linux's (prctl)")
@pytest.mark.skipif(multiprocess.get_all_start_methods()[0] != "fork", reason="only forked workers are set to die")
def test_the_fork_hook_leaves_the_callers_own_forks_alone(tmp_path, bos_tokenizer, write_jsonl, orca_records):
    """The hook `os.register_at_fork` installs is process-wide: a process the caller forks after the data module's
    parallel tokenization must not be set to die with its parent."""
    bos_tokenizer.save_pretrained(tmp_path / "tok")
    args = [str(tmp_path / "tok"), str(write_jsonl(orca_records(40))), str(tmp_path / "cache")]
    done = subprocess.run([sys.executable, "-c", FORK_AFTER_TOKENIZING, *args], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    assert list((tmp_path / "cache" / "qlora_lightning").glob("*_of_00002.arrow"))  # tokenized by forked workers
    assert done.stdout.splitlines()[-1] == "child's parent-death signal: 0"
