"""Reading instruction data and turning it into cached, checked token rows.

Sources: a hub dataset (`datasets.load_dataset(name, split=...)`), a local folder laid out like a hub dataset
repository (its split's files found as `load_dataset` finds them), a local `.jsonl`/`.json`/`.parquet`/`.csv` file, a
folder written by `save_to_disk`, or `bundled:<name>` for the sample shipped in `data/bundled/`. JSON, in a file or
a folder, is read line by line as text and parsed per record, so a malformed line or a field with the wrong type is
reported with its file, line and field instead of failing inside pyarrow (or coercing a whole column). A write of
the cache that fails (a full disk, a file-size limit) is reported as such (`CacheWriteError`), not as bad data.

Each record is formatted, templated and tokenized in one `Dataset.map` (batched, `num_proc` workers)
whose output is cached in a file keyed by the source, the subset, the format, the template, the tokenizer
and the length limits. Bad records become rows with an `error` message; `on_bad_record` then raises on the
first one or drops them all and reports how many. The rows also count the tokens the length limits cut, so
the cache answers `Truncation` too. Parallel workers die with the main process (see `_die_with_parent`).
"""

from __future__ import annotations

import bisect
import ctypes
import errno
import hashlib
import json
import os
import re
import shutil
import signal
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import datasets
import numpy as np
import pandas as pd
import pyarrow.compute as pc
from datasets import Dataset, DatasetDict, Features, Sequence, Value
from datasets.exceptions import DatasetGenerationError

from ..atomic import check_writable
from .formats import RecordError, format_record
from .sample import BUNDLED
from .tokenize import ExampleEncoder

__all__ = [
    "BadRecordError",
    "RawSource",
    "Cut",
    "Truncation",
    "cache_root",
    "load_source",
    "pick_subset",
    "encode_split",
    "resolve_bundled",
]

PARALLEL_MIN_RECORDS = 10_000  # below this, starting `num_proc` workers costs more than it saves
#: Bumped when the encoding of a record changes, so old cache files are not reused. 3: the data's text is never
#: parsed for special tokens.
CACHE_VERSION = 3
_FEATURES = Features(
    {
        "input_ids": Sequence(Value("int32")),
        "n_source": Value("int32"),
        "length": Value("int32"),
        "source_cut": Value("int32"),
        "target_cut": Value("int32"),
        "error": Value("string"),
    }
)


class BadRecordError(ValueError):
    """A record of the data cannot be used; the message names the file (or dataset), line or row, and field."""


class CacheWriteError(OSError):
    """The data cache could not be written (a full disk, a file-size limit); the message names the folder."""


@dataclass(frozen=True)
class Part:
    """One file (or dataset) of a source, for messages: its first row in the source's dataset, its name, and how
    its rows are counted: "jsonl" (lines, from 1), "json" (records of one JSON array, from 0), "table" (rows, from 0).
    """

    start: int
    label: str
    kind: str

    def where(self, row: int) -> str:
        """Name the source's dataset row `row` the way the user would look for it in this file."""
        at = row - self.start
        return f"{self.label}: " + {"jsonl": f"line {at + 1}", "json": f"record {at}", "table": f"row {at}"}[self.kind]


def _where(parts: tuple[Part, ...], row: int) -> str:
    """The file and line (record, row) of the source's dataset row `row`."""
    return parts[bisect.bisect_right([part.start for part in parts], row) - 1].where(row)


@dataclass
class RawSource:
    """A loaded source: `dataset` rows, the usable `rows` (blank JSONL lines excluded), how to name things."""

    dataset: Dataset
    rows: np.ndarray
    label: str  # the file, folder or hub name, for messages
    kind: str  # "table" (a column per field) or "text" (a `text` column, one JSON document per record)
    identity: str  # what the cache key uses to recognise this exact data
    bad_rows: dict[int, str] = field(default_factory=dict)  # dataset row → why it is unusable (non-UTF-8 lines)
    parts: tuple[Part, ...] = ()  # the files the rows come from, in order (one for a single file)


@dataclass(frozen=True)
class Cut:
    """Examples that lost tokens to one length limit: how many, the tokens they lost in all, the most one lost."""

    examples: int
    tokens: int
    max_tokens: int

    @property
    def mean_tokens(self) -> float:
        """Tokens lost per cut example (0 when none was cut)."""
        return self.tokens / self.examples if self.examples else 0.0

    def describe(self, part: str, of: int) -> str:
        """E.g. "source cut in 12/1000 examples (mean 35.2, max 200 tokens)", or "no source cut"."""
        if not self.examples:
            return f"no {part} cut"
        mean = f"{self.mean_tokens:.1f}"
        return f"{part} cut in {self.examples}/{of} examples (mean {mean}, max {self.max_tokens} tokens)"


@dataclass(frozen=True)
class Truncation:
    """What `source_max_len` (`source`) and `target_max_len` (`target`) cut in a split of `examples` examples."""

    examples: int
    source: Cut
    target: Cut

    def describe(self) -> str:
        """One phrase for the log: "source cut in 12/1000 examples (mean 35.2, max 200 tokens), no target cut"."""
        return f"{self.source.describe('source', self.examples)}, {self.target.describe('target', self.examples)}"


def cache_root(cache_dir: str | None) -> Path:
    """The folder that caches loaded and tokenized data (`cache_dir`, else the datasets cache), checked writable.

    A folder that cannot be written would otherwise fail deep inside `datasets` and look like a bad data file.
    """
    root = Path(cache_dir).expanduser() if cache_dir else Path(datasets.config.HF_DATASETS_CACHE)
    try:
        check_writable(root)
    except OSError as e:
        raise PermissionError(
            f"the cache folder {root} is not writable ({e.strerror or e}): set data.cache_dir (or HF_DATASETS_CACHE, "
            "used when data.cache_dir is unset) to a folder this process can write"
        ) from e
    return root


def _write_failure(error: BaseException | None) -> OSError | None:
    """The failed write (a full disk or quota, a file-size limit) behind `error`, if one is: `datasets` wraps it."""
    while error is not None:
        if isinstance(error, OSError) and error.errno in (errno.ENOSPC, errno.EFBIG, errno.EDQUOT):
            return error
        error = error.__cause__ or error.__context__
    return None


@contextmanager
def _writing_cache(root: Path, what: str) -> Iterator[None]:
    """Report a failed write of the data cache in `root` as what it is (`CacheWriteError`), not as bad data."""
    try:
        yield
    except Exception as e:
        if (failure := _write_failure(e)) is None:
            raise
        try:
            free = f"{shutil.disk_usage(root).free / 2**20:,.0f} MiB free there"
        except OSError:
            free = "free space unknown"
        raise CacheWriteError(
            f"cannot write the data cache in {root} while {what}: {failure.strerror or failure} ({free}); free disk "
            "space, raise the file-size limit (ulimit -f), or set data.cache_dir to a folder on another disk"
        ) from e


def _dataset_identity(ds: Dataset) -> str:
    """What recognises a loaded dataset's exact data: its arrow files (path, size, modification time)."""
    files = [Path(f["filename"]) for f in ds.cache_files]
    if not files:
        raise ValueError(f"dataset {ds.info.dataset_name or ds!r} has no files to recognise it by")
    return json.dumps([_file_identity(f) for f in files])


def _file_identity(path: Path) -> str:
    stat = path.stat()
    return f"{path.resolve()}:{stat.st_size}:{stat.st_mtime_ns}"


def resolve_bundled(name: str) -> Path:
    """`bundled:<stem>` → the shipped `<stem>.jsonl`; an unknown name lists the bundled ones."""
    stem = name.removeprefix("bundled:")
    path = BUNDLED / f"{stem}.jsonl"
    if not path.is_file():
        known = ", ".join(f"bundled:{p.stem}" for p in sorted(BUNDLED.glob("*.jsonl")))
        raise FileNotFoundError(f"no bundled dataset {name!r}; bundled: {known}")
    return path


_ESCAPED_BYTE = re.compile(r"[\udc80-\udcff]")  # what errors="surrogateescape" makes of a byte that is not UTF-8


def _undecodable_lines(path: Path) -> dict[int, str]:
    """Line (from 0) → what is wrong, for each line of `path` that is not UTF-8; lines split as the `text` builder
    splits them (universal newlines), so the numbers are its rows."""
    bad = {}
    with open(path, encoding="utf-8", errors="surrogateescape") as f:
        for i, line in enumerate(f):
            if m := _ESCAPED_BYTE.search(line):
                byte = ord(m.group()) - 0xDC00
                bad[i] = f"not UTF-8 text: byte {byte:#04x} at column {m.start() + 1}; save the file as UTF-8"
    return bad


def _load_json_array(path: Path) -> Dataset:
    """A file holding one JSON array of records → a `text` column with one JSON document per record."""
    try:
        records = json.loads(path.read_bytes().decode("utf-8"))
    except UnicodeDecodeError:
        line, problem = next(iter(_undecodable_lines(path).items()))
        raise BadRecordError(f"{path}: line {line + 1}: {problem}") from None
    except json.JSONDecodeError as e:
        raise BadRecordError(f"{path}: line {e.lineno}: malformed JSON: {e.msg} (column {e.colno})") from None
    except RecursionError:
        raise BadRecordError(f"{path}: JSON nested too deeply to parse (arrays/objects inside each other)") from None
    return Dataset.from_dict({"text": [json.dumps(r) for r in records]})


def _load_json_file(path: Path, cache_dir: str | None) -> tuple[Dataset, str, dict[int, str]]:
    """A .json file is either JSON Lines or one JSON array of records; .jsonl is always JSON Lines.

    Returns (dataset, kind, bad rows). Lines that are not UTF-8 are read with replacement characters and
    returned as bad rows, so that they are reported with their line number or skipped like other bad records.
    """
    with open(path, "rb") as f:
        head = f.read(4096).lstrip()
    if path.suffix.lower() == ".json" and head.startswith(b"["):
        return _load_json_array(path), "json", {}
    lines = dict(path="text", data_files=str(path), split="train", cache_dir=cache_dir)
    try:
        return datasets.load_dataset(**lines), "jsonl", {}
    except DatasetGenerationError as e:
        if not isinstance(e.__cause__, UnicodeDecodeError):
            raise
    return datasets.load_dataset(**lines, encoding_errors="replace"), "jsonl", _undecodable_lines(path)


FILE_TYPES = (".jsonl", ".json", ".csv", ".parquet")
JSON_TYPES = (".jsonl", ".json")


def _read_file(path: Path, cache_dir: str | None) -> tuple[Dataset, str, dict[int, str]]:
    """One local data file → (dataset, how its rows are counted: "jsonl", "json" or "table", bad rows)."""
    if path.stat().st_size == 0:
        raise BadRecordError(f"{path}: the file is empty")
    suffix = path.suffix.lower()
    if suffix not in FILE_TYPES:
        raise ValueError(f"{path}: unsupported file type {suffix!r}; use .jsonl, .json, .parquet or .csv")
    root = cache_root(cache_dir)
    try:
        with _writing_cache(root, f"reading {path}"):
            if suffix in JSON_TYPES:
                return _load_json_file(path, cache_dir)
            if suffix == ".csv":
                # every cell is text (an answer "42" must not become an int, nor "NA" a null); empty cells are null
                return (
                    Dataset.from_pandas(pd.read_csv(path, dtype=str, keep_default_na=False, na_values=[""])),
                    "table",
                    {},
                )
            return (
                datasets.load_dataset("parquet", data_files=str(path), split="train", cache_dir=cache_dir),
                "table",
                {},
            )
    except (BadRecordError, CacheWriteError):
        raise
    except Exception as e:  # pyarrow/pandas errors do not name the file
        raise BadRecordError(f"{path}: cannot be read as {suffix[1:]}: {e}") from e


def _read_json_files(files: list[Path], cache_dir: str | None) -> tuple[Dataset, tuple[Part, ...], dict[int, str]]:
    """Several JSON / JSON Lines files read as one file each is (line by line, nothing coerced), end to end: the
    dataset's `text` column, which file each row is from, and the bad rows."""
    pieces, parts, start = [], [], 0
    bad_rows: dict[int, str] = {}
    for path in files:
        ds, kind, bad = _read_file(path, cache_dir)
        pieces.append(ds.select_columns(["text"]))
        parts.append(Part(start, str(path), kind))
        bad_rows |= {start + row: problem for row, problem in bad.items()}
        start += len(ds)
    return datasets.concatenate_datasets(pieces), tuple(parts), bad_rows


def _split_files(folder: Path, split: str, cache_dir: str | None) -> list[Path]:
    """The data files of `split` in a local folder laid out like a hub dataset repository, as `load_dataset` finds
    them (`train.jsonl`, `data/train-*.jsonl`, ...)."""
    try:
        found = datasets.load_dataset_builder(str(folder), cache_dir=cache_dir).config.data_files or {}
    except Exception as e:
        raise ValueError(f"{folder}: cannot find the data files of this dataset folder: {e}") from e
    if split not in found:
        raise ValueError(f"{folder}: no split {split!r}; splits: {', '.join(map(str, found)) or 'none found'}")
    return [Path(f) for f in found[split]]


def _source(
    ds: Dataset, label: str, identity: str, parts: tuple[Part, ...], bad_rows: dict[int, str] | None = None
) -> RawSource:
    """A loaded dataset as a `RawSource`: its usable rows (a blank line of a text source is no record, and keeps
    the numbering of the others), checked to hold a record, and a JSON Lines source a JSON object."""
    kind = "table" if parts[0].kind == "table" else "text"
    rows = _nonblank_rows(ds) if kind == "text" else np.arange(len(ds))
    if len(rows) == 0:
        raise BadRecordError(f"{label}: no records")
    if any(part.kind == "jsonl" for part in parts):
        _check_json_lines(ds, rows, parts)
    return RawSource(ds, rows, label, kind, identity, bad_rows or {}, parts)


def _nonblank_rows(ds: Dataset) -> np.ndarray:
    """The rows of a `text` column that hold more than white space."""
    text = ds.data.column("text")
    return np.flatnonzero(pc.greater(pc.utf8_length(pc.utf8_trim_whitespace(text)), 0).to_numpy(zero_copy_only=False))


def _check_json_lines(ds: Dataset, rows: np.ndarray, parts: tuple[Part, ...]) -> None:
    """Stop at once when no line of a JSON Lines source is a JSON object: a text file named `.jsonl` is reported as
    such (its first line named), not later as a count of records too small for the validation split."""
    text = ds.data.column("text").take(rows)
    if pc.any(pc.starts_with(pc.utf8_ltrim_whitespace(text), "{")).as_py():
        return
    first = int(rows[0])
    raise BadRecordError(
        f"{_where(parts, first)}: not a JSON object: {text[0].as_py()[:60]!r}; a JSON Lines file holds one JSON object "
        "(a record, {...}) per line"
    )


def _is_saved_folder(path: Path) -> bool:
    """Whether `path` is a folder written by `save_to_disk` (a dataset's `state.json` or a DatasetDict's index)."""
    return path.is_dir() and ((path / "state.json").is_file() or (path / "dataset_dict.json").is_file())


def _load_file(path: Path, cache_dir: str | None) -> RawSource:
    """A local `.jsonl`/`.json`/`.parquet`/`.csv` file (a bundled sample too), recognised by its path, size and
    modification time."""
    ds, kind, bad_rows = _read_file(path, cache_dir)
    return _source(ds, str(path), _file_identity(path), (Part(0, str(path), kind),), bad_rows)


def _load_saved_folder(folder: Path, split: str) -> RawSource:
    """A folder written by `save_to_disk` (one dataset, or a DatasetDict of which `split` is taken)."""
    loaded = datasets.load_from_disk(str(folder))
    if isinstance(loaded, DatasetDict):
        if split not in loaded:
            raise ValueError(f"{folder}: no split {split!r}; splits: {', '.join(loaded)}")
        loaded = loaded[split]
    return _source(loaded, str(folder), _dataset_identity(loaded), (Part(0, str(folder), "table"),))


def _load_dataset_folder(folder: Path, name: str, split: str, cache_dir: str | None) -> RawSource:
    """A local folder laid out like a hub dataset repository: its JSON files of `split` read as single files are
    (each bad line named by its file and line, nothing coerced); files of other types through `load_dataset`."""
    files = _split_files(folder, split, cache_dir)
    if not (files and all(f.suffix.lower() in JSON_TYPES for f in files)):
        return _load_hub(name, split, cache_dir)
    ds, parts, bad_rows = _read_json_files(files, cache_dir)
    return _source(ds, f"{name} (split {split})", json.dumps([_file_identity(f) for f in files]), parts, bad_rows)


def _load_hub(name: str, split: str, cache_dir: str | None) -> RawSource:
    """`split` of a hub dataset (or of a local folder of files other than JSON) through `datasets.load_dataset`."""
    label = f"{name} (split {split})"
    with _writing_cache(cache_root(cache_dir), f"loading dataset {name!r}"):
        try:
            ds = datasets.load_dataset(name, split=split, cache_dir=cache_dir)
        except Exception as e:  # a failed write of the cache is reported by `_writing_cache`, from this error's cause
            raise ValueError(f"cannot load dataset {name!r} (split {split!r}) with datasets.load_dataset: {e}") from e
    return _source(ds, label, _dataset_identity(ds), (Part(0, label, "table"),))


def load_source(name: str, split: str = "train", cache_dir: str | None = None) -> RawSource:
    """Load `name`: `bundled:<name>`, a local file, a `save_to_disk` folder, a local folder laid out like a hub
    dataset (its JSON files of `split` read as single files are), else `load_dataset(name, split)` (the hub)."""
    path = resolve_bundled(name) if name.startswith("bundled:") else Path(name).expanduser()
    cache_root(cache_dir)
    if path.is_file():
        return _load_file(path, cache_dir)
    if _is_saved_folder(path):
        return _load_saved_folder(path, split)
    if path.suffix.lower() in FILE_TYPES:
        raise FileNotFoundError(f"dataset file {name!r} does not exist")
    if path.is_dir():
        return _load_dataset_folder(path, name, split, cache_dir)
    return _load_hub(name, split, cache_dir)


def pick_subset(n: int, seed: int, max_examples: int | None, val_size: int) -> tuple[np.ndarray, np.ndarray]:
    """Positions (sorted) of the train and validation subsets among `n` records.

    One permutation from `seed`: its first `val_size` entries are validation, the next `max_examples` are
    training (all the rest when None). The same on every run and rank, and changing `max_examples` never
    moves an example between validation and training.
    """
    if val_size >= n:
        raise ValueError(f"val_size ({val_size}) must be smaller than the number of records ({n})")
    perm = np.random.default_rng(seed).permutation(n)
    end = n if max_examples is None else min(n, val_size + max_examples)
    return np.sort(perm[val_size:end]), np.sort(perm[:val_size])


_PR_SET_PDEATHSIG = 1  # from <linux/prctl.h>
_fork_parent: int | None = None  # set during `encode_split`'s `map`: the process whose forked children die with it


def _die_with_parent() -> None:
    """Run in each child forked while `_fork_parent` is set (Linux): have the kernel SIGKILL it when its parent dies.

    A SIGKILL of the main process during parallel tokenization would otherwise leave the `map` workers (and the
    queue manager `datasets` starts) running as orphans. A parent that died between the fork and the `prctl` is
    no longer this process's parent, so the child ends itself at once; children it forks in turn die with it.
    Processes started by spawn or a forkserver are not forked here and are left alone. (Linux sends the signal
    when the forking thread ends: here the one running `map`, which outlives its workers.)
    """
    global _fork_parent
    if _fork_parent is None:
        return
    ctypes.CDLL(None).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
    if os.getppid() != _fork_parent:
        os.kill(os.getpid(), signal.SIGKILL)
    _fork_parent = os.getpid()


_fork_hook_registered = False


@contextmanager
def _children_die_with_this_process() -> Iterator[None]:
    """Processes forked inside this block (the parallel `map`'s) are killed when this process dies (Linux).

    The fork hook (`os.register_at_fork`) is the one process-wide setting of the data pipeline, kept because there
    is no per-call way: `Dataset.map` builds its pool with no worker initializer, and the queue manager process it
    starts runs none of our code. It is registered on first use, cannot be removed, and does nothing outside such
    a block (`_fork_parent` is None there), so the caller's own forks are left alone.
    """
    global _fork_parent, _fork_hook_registered
    if sys.platform.startswith("linux") and not _fork_hook_registered:
        os.register_at_fork(after_in_child=_die_with_parent)
        _fork_hook_registered = True
    _fork_parent = os.getpid()
    try:
        yield
    finally:
        _fork_parent = None


def _parse_json(text: str) -> object:
    """One JSON document; malformed or too deeply nested JSON is a `RecordError`."""
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise RecordError(None, f"malformed JSON: {e.msg} (column {e.colno})") from None
    except RecursionError:
        raise RecordError(None, "JSON nested too deeply to parse (arrays/objects inside each other)") from None


def _encode_batch(
    batch: dict,
    indices: list[int],
    *,
    encoder: ExampleEncoder,
    format: str,
    parts: tuple[Part, ...],
    kind: str,
    rows: np.ndarray,
    bad_rows: dict[int, str],
) -> dict:
    """Format, template and tokenize a batch of raw records; bad records give rows carrying `error`."""
    n = len(indices)
    records: list[Any]
    if kind == "table":
        records = [{k: batch[k][j] for k in batch} for j in range(n)]
    else:
        records = batch["text"]
    examples, owners, errors = [], [], {}
    for j, (i, record) in enumerate(zip(indices, records, strict=True)):
        row = int(rows[i])
        where = _where(parts, row)
        try:
            if row in bad_rows:
                raise RecordError(None, bad_rows[row])
            found = format_record(record if kind == "table" else _parse_json(record), format)
        except RecordError as e:
            errors[j] = f"{where}: {e}"
            continue
        examples += found
        owners += [j] * len(found)
    encoded = encoder.encode(examples) if examples else {}
    out: dict[str, list] = {c: [] for c in _FEATURES}
    k = 0
    for j in range(n):
        if j in errors:
            empty = {"input_ids": [], "n_source": 0, "source_cut": 0, "target_cut": 0, "length": 0, "error": errors[j]}
            for c, value in empty.items():
                out[c].append(value)
        while k < len(owners) and owners[k] == j:
            for c, values in encoded.items():
                out[c].append(values[k])
            out["length"].append(len(encoded["input_ids"][k]))
            out["error"].append("")
            k += 1
    return out


def _tokenizer_identity(encoder: ExampleEncoder) -> str:
    tok = encoder.tokenizer
    vocab = hashlib.sha256(json.dumps(sorted(tok.get_vocab().items())).encode()).hexdigest()
    return json.dumps(
        [type(tok).__name__, tok.name_or_path, vocab, tok.all_special_tokens, getattr(tok, "chat_template", None)]
    )


def cache_key(source: RawSource, positions: np.ndarray, encoder: ExampleEncoder, format: str) -> str:
    """A key that changes whenever the encoded rows could: data, subset, format, template, tokenizer, limits."""
    parts = [
        CACHE_VERSION,
        source.identity,
        hashlib.sha256(positions.tobytes()).hexdigest(),
        format,
        encoder.template.name,
        _tokenizer_identity(encoder),
        encoder.source_max_len,
        encoder.target_max_len,
        encoder.source_truncation,
    ]
    return hashlib.sha256(json.dumps(parts).encode()).hexdigest()[:20]


def _cut(tokens: np.ndarray) -> Cut:
    """Sum up the tokens that one length limit cut from each example (0 for the uncut ones)."""
    cut = tokens[tokens > 0]
    return Cut(len(cut), int(cut.sum()), int(cut.max(initial=0)))


def encode_split(
    source: RawSource,
    positions: np.ndarray,
    encoder: ExampleEncoder,
    format: str,
    cache_dir: str | None,
    num_proc: int | None,
) -> tuple[Dataset, list[str], Truncation]:
    """Encode the records at `positions` (indices into `source.rows`); returns (good rows, error messages, what
    the length limits cut from the good rows).

    The result is cached under `cache_dir` (default: the datasets cache) and reused when the key matches.
    Fewer than `PARALLEL_MIN_RECORDS` records are encoded in-process.
    """
    rows = source.rows[positions]
    folder = cache_root(cache_dir) / "qlora_lightning"
    folder.mkdir(exist_ok=True)
    cache = folder / f"tokenized-{cache_key(source, positions, encoder, format)}.arrow"
    procs = num_proc if num_proc and num_proc > 1 and len(rows) >= PARALLEL_MIN_RECORDS else None
    subset = source.dataset.select(rows)
    fn_kwargs = dict(
        encoder=encoder, format=format, parts=source.parts, kind=source.kind, rows=rows, bad_rows=source.bad_rows
    )
    with _children_die_with_this_process(), _writing_cache(folder, f"tokenizing {source.label}"):
        encoded = subset.map(
            _encode_batch,
            batched=True,
            with_indices=True,
            remove_columns=subset.column_names,
            features=_FEATURES,
            fn_kwargs=fn_kwargs,
            cache_file_name=str(cache),
            load_from_cache_file=True,
            new_fingerprint=cache.stem,
            num_proc=procs,
            desc=f"Tokenizing {source.label}",
        )
    error_column = encoded.data.column("error")
    bad = pc.not_equal(error_column, "").to_numpy(zero_copy_only=False)
    errors = error_column.filter(bad).to_pylist()
    good = encoded.select(np.flatnonzero(~bad)) if errors else encoded
    # error rows cut nothing, so the whole columns give the good rows' numbers
    source_cut, target_cut = (_cut(encoded.data.column(c).to_numpy()) for c in ("source_cut", "target_cut"))
    truncation = Truncation(len(good), source_cut, target_cut)
    return good.remove_columns(["error", "source_cut", "target_cut"]), errors, truncation
