"""`datasets` sources: `{dataset: NAME_OR_FOLDER, config: C, split: S}` in a recipe, read through
`datasets.load_dataset` and converted by the same format detection as files (align.data.formats).

A name loads only from the local cache: align fetches nothing at run time (`ALIGN_ALLOW_HUB=1` lets datasets go to
the Hub), so a name that is not cached fails at once, before any network call, saying how to fetch it. A folder
loads as load_dataset builds it (JSONL, Parquet, CSV files: its `data_files` inferred), or, saved with
`save_to_disk`, with load_from_disk. Rows are numbered from 1 in the split, as in a file.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from urllib.parse import parse_qs

from align.errors import DataError
from align.settings import DATASET_PREFIX

SAVED_SUPPORTED = "a folder saved with datasets' save_to_disk"


def parse(path: str) -> tuple[str, str | None, str | None]:
    """dataset:NAME?config=C&split=S -> (NAME, C, S)."""
    name, _, query = path.removeprefix(DATASET_PREFIX).partition("?")
    fields = {k: v[0] for k, v in parse_qs(query).items()}
    return name, fields.get("config"), fields.get("split")


@contextmanager
def _offline():
    """datasets and huggingface_hub read HF_HUB_OFFLINE when imported; set both here, whenever that was."""
    import datasets
    import huggingface_hub.constants as hub_constants

    if os.environ.get("ALIGN_ALLOW_HUB") == "1":
        yield
        return
    before = datasets.config.HF_HUB_OFFLINE, hub_constants.HF_HUB_OFFLINE
    datasets.config.HF_HUB_OFFLINE = hub_constants.HF_HUB_OFFLINE = True
    try:
        yield
    finally:
        datasets.config.HF_HUB_OFFLINE, hub_constants.HF_HUB_OFFLINE = before


def _is_saved(folder: str) -> bool:
    return any(os.path.isfile(os.path.join(folder, f)) for f in ("state.json", "dataset_dict.json"))


def load(path: str):
    """The `datasets.Dataset` a dataset: path stands for."""
    import datasets

    name, config, split = parse(path)
    if os.path.isdir(name) and _is_saved(name):
        return saved_dataset(name, split, path)
    with _offline():
        try:
            loaded = datasets.load_dataset(name, config, split=split)
        except ConnectionError:
            raise DataError(f"'{name}' is not in the local datasets cache, and align fetches nothing at run time: "
                            f"fetch it once where there is network (python -c \"import datasets; datasets.load_dataset("
                            f"'{name}'{f', {config!r}' if config else ''})\"), or give a local folder",
                            file=path) from None
        except (FileNotFoundError, ValueError, datasets.exceptions.DatasetNotFoundError) as e:
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise DataError(f"datasets cannot load it: {first}", file=path) from None
    return pick_split(loaded, None, path)


def saved_dataset(folder: str, split: str | None, source: str):
    """The dataset a `save_to_disk` folder holds: `split`, else its train split, else its only one."""
    import datasets

    try:
        loaded = datasets.load_from_disk(folder)
    except FileNotFoundError as e:
        raise DataError(f"folder is not a dataset saved with save_to_disk ({e}); expected {SAVED_SUPPORTED}",
                        file=source) from e
    except IndexError as e:  # datasets saves a split of no rows without data files, then cannot load it
        raise DataError("no rows in the dataset, or in one of its splits (datasets cannot load a split saved empty); "
                        "save the split to use on its own", file=source) from e
    return pick_split(loaded, split, source)


def pick_split(loaded, split: str | None, source: str):
    """`split` of a DatasetDict (default: train, else its only split); a Dataset as it is."""
    import datasets

    if not isinstance(loaded, datasets.DatasetDict):
        return loaded
    splits = list(loaded)
    if split is not None:
        if split not in loaded:
            raise DataError(f"no split '{split}'; the dataset has {', '.join(splits)}", file=source, field="split")
        return loaded[split]
    if "train" in loaded:
        return loaded["train"]
    if len(splits) == 1:
        return loaded[splits[0]]
    raise DataError(f"dataset has splits {splits} and none is 'train'; name the one to use (split: ...)", file=source)


def read_dataset(path: str) -> Iterator[tuple[int, object]]:
    yield from enumerate(load(path), start=1)


def fingerprint(path: str) -> str:
    """datasets' own fingerprint of the loaded split: it changes when its files or its processing do."""
    return load(path)._fingerprint
