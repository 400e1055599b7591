"""Read rows from local data files, each numbered the way a person would find it again.

Row numbers count from 1: the line number in JSONL (blank lines are skipped but still counted, so the
number is what an editor shows), the element index + 1 in a JSON array, the row index + 1 in Parquet
and `datasets` folders. Converting rows into examples is `formats.py`'s job (with `converters.py`); this
module only reads.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import os
from collections.abc import Callable, Iterator

from align.errors import DataError
from align.settings import DATASET_PREFIX as DATASET  # dataset:NAME?config=&split=, read by align.data.hub

SUPPORTED = (
    ".txt (one prompt per line), .jsonl, .json (a top-level array, or an object with one list value such as "
    "{\"data\": [...]}), "
    "either gzipped (.jsonl.gz, .json.gz), .parquet, or a folder saved with datasets' save_to_disk"
)


def read_rows(path: str) -> Iterator[tuple[int, dict]]:
    """Yield `(row_number, row)` for every row of `path`; the first bad row raises its DataError."""
    for number, row in read_records(path):
        if isinstance(row, DataError):
            raise row
        yield number, row


def read_records(path: str) -> Iterator[tuple[int, dict | DataError]]:
    """Like `read_rows`, but a bad row comes out as its DataError instead of being raised.

    This lets a loader that skips bad rows carry on past a broken JSON line; a generator that raised
    could not be resumed. Problems with the whole file (missing, unsupported, unreadable, empty) still raise.
    """
    number = 0
    for number, row in _reader(path)(path):
        if not isinstance(row, (dict, DataError)):
            row = DataError(f"row is a JSON {_json_type(row)}, expected an object with named fields",
                            file=path, row=number)
        yield number, row
    if not number:
        raise DataError(f"no rows: the {'dataset' if os.path.isdir(path) else 'file'} is empty", file=path)


def _reader(path: str) -> Callable[[str], Iterator[tuple[int, object]]]:
    if path.startswith(DATASET):
        from align.data import hub

        return hub.read_dataset
    if os.path.isdir(path):
        return _read_datasets_folder
    if not os.path.isfile(path):
        raise DataError(f"file not found (supported: {SUPPORTED})", file=path)
    name = path.lower()
    if name.endswith((".jsonl", ".jsonl.gz")):
        return _read_jsonl
    if name.endswith((".json", ".json.gz")):
        return _read_json
    if name.endswith(".parquet"):
        return _read_parquet
    if name.endswith(".txt"):
        return _read_text_prompts
    raise DataError(f"unsupported file type; supported: {SUPPORTED}", file=path)


def _read_text_prompts(path: str) -> Iterator[tuple[int, dict | DataError]]:
    """A plain prompt list: every non-blank line is `{"prompt": line}`."""
    for number, line in _lines(path):
        yield number, line if isinstance(line, DataError) else {"prompt": line.rstrip("\r\n")}


def fingerprint(path: str) -> str:
    """sha256 of the file's bytes, or of a folder's files (relative names and bytes, in sorted order).

    Stages record it so that a rerun can tell whether their input data changed.
    """
    if path.startswith(DATASET):
        from align.data import hub

        return hub.fingerprint(path)
    digest = hashlib.sha256()
    if os.path.isdir(path):
        for root, dirs, files in os.walk(path):
            dirs.sort()  # os.walk visits sub-folders in this list's order
            for name in sorted(files):
                full = os.path.join(root, name)
                digest.update(os.path.relpath(full, path).replace(os.sep, "/").encode() + b"\0")
                _hash_file(digest, full)
    elif os.path.isfile(path):
        _hash_file(digest, path)
    else:
        raise DataError(f"file not found (supported: {SUPPORTED})", file=path)
    return digest.hexdigest()


def _hash_file(digest, path: str) -> None:
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)


def _open_bytes(path: str):
    return gzip.open(path, "rb") if path.lower().endswith(".gz") else open(path, "rb")


def _lines(path: str) -> Iterator[tuple[int, str | DataError]]:
    """The non-blank lines of a text file, gzipped or not, numbered as an editor shows them."""
    try:
        with _open_bytes(path) as f:
            for number, raw in enumerate(f, start=1):
                try:
                    # Decode per line so one bad byte costs one row, not the file. utf-8-sig drops a BOM.
                    line = raw.decode("utf-8-sig")
                except UnicodeDecodeError as e:
                    yield number, DataError(f"not valid UTF-8: {e}", file=path, row=number)
                    continue
                if line.strip():
                    yield number, line
    except (OSError, EOFError) as e:  # a truncated or corrupt gzip stream
        raise DataError(f"cannot read the file: {e}", file=path) from e


def _read_jsonl(path: str) -> Iterator[tuple[int, object]]:
    for number, line in _lines(path):
        if isinstance(line, DataError):
            yield number, line
            continue
        try:
            yield number, json.loads(line)
        except json.JSONDecodeError as e:
            yield number, DataError(f"not valid JSON: {e.msg} (column {e.colno})", file=path, row=number)


def _read_json(path: str) -> Iterator[tuple[int, object]]:
    try:
        with _open_bytes(path) as f:
            text = f.read().decode("utf-8-sig")
        data = json.loads(text) if text.strip() else []  # a blank file is an empty one, not a JSON error
    except json.JSONDecodeError as e:
        raise DataError(f"not valid JSON: {e.msg} (line {e.lineno}, column {e.colno})", file=path) from e
    except (OSError, EOFError, UnicodeDecodeError) as e:
        raise DataError(f"cannot read the file: {e}", file=path) from e
    if isinstance(data, dict):
        # Many published files wrap the rows, e.g. {"data": [...]} or {"version": "1", "rows": [...]}.
        lists = [key for key, value in data.items() if isinstance(value, list)]
        if len(lists) != 1:
            raise DataError(
                f"expected a JSON array of rows, or an object with exactly one list value; "
                f"found an object whose list values are {lists or 'none'}",
                file=path,
            )
        data = data[lists[0]]
    if not isinstance(data, list):
        raise DataError(f"expected a JSON array of rows, found a JSON {_json_type(data)}", file=path)
    yield from enumerate(data, start=1)


def _read_parquet(path: str) -> Iterator[tuple[int, object]]:
    import pyarrow.parquet as pq  # imported here: only Parquet users pay for it

    try:
        table = pq.ParquetFile(path)
    except Exception as e:  # pyarrow raises several types for a file that is not Parquet
        raise DataError(f"cannot read the file as Parquet: {e}", file=path) from e
    number = 0
    for batch in table.iter_batches():  # batches keep memory flat on large files
        for row in batch.to_pylist():
            number += 1
            yield number, row


def _read_datasets_folder(path: str) -> Iterator[tuple[int, object]]:
    from align.data import hub  # datasets is slow to import, and only folders and dataset: sources need it

    yield from enumerate(hub.saved_dataset(path, None, path), start=1)


def _json_type(value: object) -> str:
    names = {list: "array", str: "string", bool: "boolean", int: "number", float: "number", type(None): "null"}
    return names.get(type(value), type(value).__name__)
