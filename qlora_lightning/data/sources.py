"""Reading instruction data and turning it into cached, checked token rows.

Sources: a hub dataset (`datasets.load_dataset(name, split=...)`, which also reads a local folder laid out
like a hub dataset repository), a local `.jsonl`/`.json`/`.parquet`/`.csv` file, a folder written by
`save_to_disk`, or `bundled:<name>` for the sample shipped in `data/bundled/`. JSON is read line by line as text and parsed per record, so a malformed line or a field
with the wrong type is reported with its file, line and field instead of failing inside pyarrow.

Each record is formatted, templated and tokenized in one `Dataset.map` (batched, `num_proc` workers)
whose output is cached in a file keyed by the source, the subset, the format, the template, the tokenizer
and the length limits. Bad records become rows with an `error` message; `on_bad_record` then raises on the
first one or drops them all and reports how many.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import datasets
import numpy as np
import pandas as pd
import pyarrow.compute as pc
from datasets import Dataset, DatasetDict, Features, Sequence, Value

from .formats import RecordError, format_record
from .sample import BUNDLED
from .tokenize import ExampleEncoder

__all__ = ["BadRecordError", "RawSource", "load_source", "pick_subset", "encode_split", "resolve_bundled"]

PARALLEL_MIN_RECORDS = 10_000  # below this, starting `num_proc` workers costs more than it saves
CACHE_VERSION = 1  # bump when the encoding of a record changes, so old cache files are not reused
_FEATURES = Features(
    {
        "input_ids": Sequence(Value("int32")),
        "n_source": Value("int32"),
        "length": Value("int32"),
        "error": Value("string"),
    }
)


class BadRecordError(ValueError):
    """A record of the data cannot be used; the message names the file (or dataset), line or row, and field."""


@dataclass
class RawSource:
    """A loaded source: `dataset` rows, the usable `rows` (blank JSONL lines excluded), how to name things."""

    dataset: Dataset
    rows: np.ndarray
    label: str  # the file, folder or hub name, for messages
    kind: str  # "jsonl" (a `text` column, one JSON document per line), "json" (one per record) or "table"
    identity: str  # what the cache key uses to recognise this exact data



def _where(kind: str, row: int) -> str:
    """Name a row the way the user would look for it: JSONL line (from 1), JSON record or table row (from 0)."""
    return {"jsonl": f"line {row + 1}", "json": f"record {row}", "table": f"row {row}"}[kind]


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


def _load_json_file(path: Path, cache_dir: str | None) -> tuple[Dataset, str]:
    """A .json file is either JSON Lines or one JSON array of records; .jsonl is always JSON Lines."""
    with open(path, encoding="utf-8") as f:
        head = f.read(4096).lstrip()
    if path.suffix.lower() == ".json" and head.startswith("["):
        try:
            with open(path, encoding="utf-8") as f:
                records = json.load(f)
        except json.JSONDecodeError as e:
            raise BadRecordError(f"{path}: line {e.lineno}: malformed JSON: {e.msg} (column {e.colno})") from None
        return Dataset.from_dict({"text": [json.dumps(r) for r in records]}), "json"
    ds = datasets.load_dataset("text", data_files=str(path), split="train", cache_dir=cache_dir)
    return ds, "jsonl"


def load_source(name: str, split: str = "train", cache_dir: str | None = None) -> RawSource:
    """Load `name`: `bundled:<name>`, a local file, a `save_to_disk` folder, else `load_dataset(name, split)`."""
    path = resolve_bundled(name) if name.startswith("bundled:") else Path(name).expanduser()
    if path.is_file():
        if path.stat().st_size == 0:
            raise BadRecordError(f"{path}: the file is empty")
        suffix = path.suffix.lower()
        if suffix not in (".jsonl", ".json", ".csv", ".parquet"):
            raise ValueError(f"{path}: unsupported file type {suffix!r}; use .jsonl, .json, .parquet or .csv")
        try:
            if suffix in (".jsonl", ".json"):
                ds, kind = _load_json_file(path, cache_dir)
            elif suffix == ".csv":
                # every cell is text (an answer "42" must not become an int, nor "NA" a null); empty cells are null
                ds, kind = Dataset.from_pandas(pd.read_csv(path, dtype=str, keep_default_na=False, na_values=[""])), "table"
            else:
                ds, kind = datasets.load_dataset("parquet", data_files=str(path), split="train", cache_dir=cache_dir), "table"
        except BadRecordError:
            raise
        except Exception as e:  # pyarrow/pandas errors do not name the file
            raise BadRecordError(f"{path}: cannot be read as {suffix[1:]}: {e}") from e
        label, identity = str(path), _file_identity(path)
    elif path.is_dir() and ((path / "state.json").is_file() or (path / "dataset_dict.json").is_file()):
        loaded = datasets.load_from_disk(str(path))
        if isinstance(loaded, DatasetDict):
            if split not in loaded:
                raise ValueError(f"{path}: no split {split!r}; splits: {', '.join(loaded)}")
            loaded = loaded[split]
        ds, kind, label, identity = loaded, "table", str(path), loaded._fingerprint
    elif path.suffix.lower() in (".jsonl", ".json", ".parquet", ".csv"):
        raise FileNotFoundError(f"dataset file {name!r} does not exist")
    else:  # a dataset repository: a hub id, or a local folder laid out like one (data files named by split)
        try:
            ds = datasets.load_dataset(name, split=split, cache_dir=cache_dir)
        except Exception as e:
            raise ValueError(f"cannot load dataset {name!r} (split {split!r}) with datasets.load_dataset: {e}") from e
        kind, label, identity = "table", f"{name} (split {split})", ds._fingerprint
    if kind == "jsonl":
        text = ds.data.column("text")
        rows = np.flatnonzero(pc.greater(pc.utf8_length(pc.utf8_trim_whitespace(text)), 0).to_numpy(zero_copy_only=False))
    else:
        rows = np.arange(len(ds))
    if len(rows) == 0:
        raise BadRecordError(f"{label}: no records")
    return RawSource(ds, rows, label, kind, identity)


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


def _encode_batch(
    batch: dict, indices: list[int], *, encoder: ExampleEncoder, format: str, label: str, kind: str, rows: np.ndarray
) -> dict:
    """Format, template and tokenize a batch of raw records; bad records give rows carrying `error`."""
    n = len(indices)
    if kind == "table":
        records = [{k: batch[k][j] for k in batch} for j in range(n)]
    else:
        records = batch["text"]
    examples, owners, errors = [], [], {}
    for j, (i, record) in enumerate(zip(indices, records)):
        where = f"{label}: {_where(kind, int(rows[i]))}"
        try:
            if kind != "table":
                try:
                    record = json.loads(record)
                except json.JSONDecodeError as e:
                    raise RecordError(None, f"malformed JSON: {e.msg} (column {e.colno})") from None
            found = format_record(record, format)
        except RecordError as e:
            errors[j] = f"{where}: {e}"
            continue
        examples += found
        owners += [j] * len(found)
    encoded = encoder.encode(examples) if examples else {"input_ids": [], "n_source": []}
    out: dict[str, list] = {"input_ids": [], "n_source": [], "length": [], "error": []}
    k = 0
    for j in range(n):
        if j in errors:
            out["input_ids"].append([])
            out["n_source"].append(0)
            out["length"].append(0)
            out["error"].append(errors[j])
        while k < len(owners) and owners[k] == j:
            ids = encoded["input_ids"][k]
            out["input_ids"].append(ids)
            out["n_source"].append(encoded["n_source"][k])
            out["length"].append(len(ids))
            out["error"].append("")
            k += 1
    return out


def _tokenizer_identity(encoder: ExampleEncoder) -> str:
    tok = encoder.tokenizer
    vocab = hashlib.sha256(json.dumps(sorted(tok.get_vocab().items())).encode()).hexdigest()
    return json.dumps([type(tok).__name__, tok.name_or_path, vocab, tok.all_special_tokens, getattr(tok, "chat_template", None)])


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


def encode_split(
    source: RawSource,
    positions: np.ndarray,
    encoder: ExampleEncoder,
    format: str,
    cache_dir: str | None,
    num_proc: int | None,
) -> tuple[Dataset, list[str]]:
    """Encode the records at `positions` (indices into `source.rows`); returns (good rows, error messages).

    The result is cached under `cache_dir` (default: the datasets cache) and reused when the key matches.
    Fewer than `PARALLEL_MIN_RECORDS` records are encoded in-process.
    """
    rows = source.rows[positions]
    root = Path(cache_dir) if cache_dir else Path(datasets.config.HF_DATASETS_CACHE)
    cache = root / "qlora_lightning" / f"tokenized-{cache_key(source, positions, encoder, format)}.arrow"
    cache.parent.mkdir(parents=True, exist_ok=True)
    procs = num_proc if num_proc and num_proc > 1 and len(rows) >= PARALLEL_MIN_RECORDS else None
    subset = source.dataset.select(rows)
    encoded = subset.map(
        _encode_batch,
        batched=True,
        with_indices=True,
        remove_columns=subset.column_names,
        features=_FEATURES,
        fn_kwargs={"encoder": encoder, "format": format, "label": source.label, "kind": source.kind, "rows": rows},
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
    return good.remove_columns("error"), errors
