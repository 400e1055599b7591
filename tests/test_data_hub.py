"""`datasets` sources (align.data.hub): a saved local dataset and load_dataset-able folders of JSONL and Parquet
load as any file does; a Hub name that is not cached fails with one line, without a network call."""

import json
import socket

import datasets
import pytest

from align.config import parse_recipe
from align.data.formats import load_examples
from align.errors import ConfigError, DataError
from align.settings import DataConfig
from tests.conftest import _tiny_head

ROWS = [{"prompt": f"Say {w}.", "completion": w} for w in ("one", "two", "three", "four")]


@pytest.fixture(autouse=True)
def _own_cache(tmp_path, monkeypatch):
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "hf_cache"))


@pytest.fixture
def no_network(monkeypatch):
    calls = []

    def refuse(self, *args, **kwargs):
        calls.append(args)
        raise OSError("the test forbids network access")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    return calls


def _sft(path: str) -> list[str]:
    return [e.completion[-1]["content"] for e in load_examples(path, "sft").examples]


def test_a_saved_dataset_loads_with_its_split(tmp_path):
    folder = tmp_path / "saved"
    datasets.DatasetDict({"train": datasets.Dataset.from_list(ROWS[:2]),
                          "test": datasets.Dataset.from_list(ROWS[2:])}).save_to_disk(str(folder))
    assert _sft(DataConfig(dataset=str(folder)).path) == ["one", "two"]
    assert _sft(DataConfig(dataset=str(folder), split="test").path) == ["three", "four"]
    with pytest.raises(DataError, match="no split 'dev'; the dataset has train, test"):
        load_examples(DataConfig(dataset=str(folder), split="dev").path, "sft")


@pytest.mark.parametrize("kind", ["jsonl", "parquet"])
def test_a_folder_of_files_loads_through_load_dataset(tmp_path, kind, no_network):
    folder = tmp_path / kind
    folder.mkdir()
    if kind == "jsonl":
        (folder / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    else:
        datasets.Dataset.from_list(ROWS).to_parquet(str(folder / "train.parquet"))
    loaded = load_examples(DataConfig(dataset=str(folder)).path, "sft")
    assert [e.completion[-1]["content"] for e in loaded.examples] == ["one", "two", "three", "four"]
    assert loaded.format == "prompt_completion" and loaded.fingerprint and not no_network


def test_an_uncached_hub_name_fails_in_one_line_without_a_network_call(no_network):
    with pytest.raises(DataError) as err:
        load_examples(DataConfig(dataset="someone/not-cached-anywhere", split="train").path, "sft")
    message = str(err.value)
    assert "not in the local datasets cache" in message and "someone/not-cached-anywhere" in message
    assert "\n" not in message and not no_network


def test_a_recipe_stage_reads_a_dataset_source(tmp_path):
    folder = tmp_path / "chats"
    folder.mkdir()
    (folder / "part-0.jsonl").write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    text = _tiny_head("hub", tmp_path, "none", sft_steps=2).replace(
        'data: {path: "synthetic:sft", max_rows: 64}', f'data: {{dataset: "{folder}", split: train}}')
    stage = parse_recipe(text).stage("sft")
    assert stage.data.path.startswith("dataset:") and _sft(stage.data.path)[0] == "one"
    with pytest.raises(ConfigError, match="not both"):
        parse_recipe(text.replace("{dataset:", "{path: x.jsonl, dataset:"))
