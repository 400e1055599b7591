"""Data mixtures (align.data.mixture): shares by hand, deterministic draws, and a tiny SFT stage that trains on a
0.7/0.3 mixture, counted from the rows its dataloader yielded, and reruns when a weight changes."""

import json

import pytest

from align.config import parse_recipe
from align.data.formats import LoadedData
from align.data.mixture import load_mixture, shares
from align.errors import ConfigError
from align.pipeline import run_recipe
from align.settings import DataConfig
from align.stages import sft
from tests.conftest import _tiny_head

MARK = "zz-from-the-file"


def test_shares_split_the_total_by_weight_and_add_up():
    assert shares([448, 100], [0.7, 0.3]) == [384, 164]  # 548 rows: 383.6 and 164.4, rounded
    assert shares([10, 10, 10], [1, 1, 1]) == [10, 10, 10]
    assert sum(shares([7, 5, 3], [0.5, 0.25, 0.25])) == 15


def _fake(sizes: dict[str, int]):
    def load(source: DataConfig) -> LoadedData:
        rows = [f"{source.path}-{i}" for i in range(sizes[source.path])]
        return LoadedData(rows, "fake", source.path, len(rows), [], f"fp-{source.path}")
    return load


def test_a_weighted_mixture_repeats_the_small_source_and_is_the_same_for_a_seed():
    sources = [DataConfig(path="big", weight=0.7), DataConfig(path="small", weight=0.3)]
    mixed = load_mixture(sources, _fake({"big": 100, "small": 10}), seed=0)
    small = [r for r in mixed.examples if r.startswith("small")]
    assert len(mixed.examples) == 110 and len(small) == 33  # 110 x 0.3: three passes over its 10 rows, and 3 more
    assert all(small.count(f"small-{i}") in (3, 4) for i in range(10))
    assert len(set(r for r in mixed.examples if r.startswith("big"))) == 77  # a subset, without repeats
    assert [c["rows"] for c in mixed.composition] == [77, 33]
    assert load_mixture(sources, _fake({"big": 100, "small": 10}), seed=0).examples == mixed.examples
    assert load_mixture(sources, _fake({"big": 100, "small": 10}), seed=1).examples != mixed.examples
    reweighted = [DataConfig(path="big", weight=0.6), DataConfig(path="small", weight=0.4)]
    assert load_mixture(reweighted, _fake({"big": 100, "small": 10}), seed=0).fingerprint != mixed.fingerprint
    plain = load_mixture([DataConfig(path="big"), DataConfig(path="small")], _fake({"big": 3, "small": 2}), seed=0)
    assert plain.examples == ["big-0", "big-1", "big-2", "small-0", "small-1"]


def test_weights_are_all_or_none_and_only_in_a_list(tmp_path):
    head = _tiny_head("mix", tmp_path, "none", sft_steps=2)
    mixed = head.replace('data: {path: "synthetic:sft", max_rows: 64}',
                         'data: [{path: "synthetic:sft", weight: 0.7}, {path: "synthetic:prompts"}]')
    with pytest.raises(ConfigError, match=r"data\[1\]\.weight.*every source has a weight or none"):
        parse_recipe(mixed)
    single = head.replace('max_rows: 64}', 'max_rows: 64, weight: 0.5}')
    with pytest.raises(ConfigError, match="give data as a list of sources"):
        parse_recipe(single)


def _recipe(tmp_path, weights: tuple[float, float]) -> str:
    rows = [{"prompt": f"{MARK} {i}: say ok", "completion": "ok"} for i in range(100)]
    (tmp_path / "extra.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return _tiny_head("mix", tmp_path / "runs", "none", sft_steps=30).replace(
        'data: {path: "synthetic:sft", max_rows: 64}',
        f'data: [{{path: "synthetic:sft", max_rows: 200, weight: {weights[0]}}}, '
        f'{{path: "{tmp_path / "extra.jsonl"}", weight: {weights[1]}}}]')


def test_a_stage_trains_on_the_mixture_it_was_given_and_a_weight_change_reruns_it(tmp_path, monkeypatch):
    yielded: list[bool] = []
    encode, collate = sft.encode_sft, sft.collate

    def tagged(examples, tokenizer, train_cfg):
        rows = encode(examples, tokenizer, train_cfg)
        for row, ex in zip(rows, examples):
            row["from_file"] = MARK in ex.prompt[-1]["content"]
        return rows

    def counted(pad_id):
        inner = collate(pad_id)
        return lambda rows: (yielded.extend(r["from_file"] for r in rows), inner(rows))[1]

    monkeypatch.setattr(sft, "encode_sft", tagged)
    monkeypatch.setattr(sft, "collate", counted)
    summary = run_recipe(parse_recipe(_recipe(tmp_path, (0.7, 0.3))), quiet=True)
    assert len(yielded) >= 240  # 30 steps of 8 rows (the Trainer fetches a batch ahead)
    assert abs(sum(yielded) / len(yielded) - 0.3) <= 0.05, (sum(yielded), len(yielded))
    stage = json.loads((tmp_path / "runs" / "mix" / "sft" / "stage.json").read_text())
    assert [(m["weight"], m["available"], m["rows"]) for m in stage["data"]["train"]["mixture"]] == \
        [(0.7, 200, 210), (0.3, 100, 90)]
    assert summary["stages"]["sft"]["status"] == "done"

    yielded.clear()
    run_recipe(parse_recipe(_recipe(tmp_path, (0.7, 0.3))), quiet=True)
    assert not yielded  # unchanged: skipped
    run_recipe(parse_recipe(_recipe(tmp_path, (0.5, 0.5))), quiet=True)
    assert len(yielded) >= 240 and abs(sum(yielded) / len(yielded) - 0.5) <= 0.05  # a new weight: trained again


def test_data_inspect_shows_a_recipe_stages_mixture(tmp_path, capsys):
    from align.cli import main

    (tmp_path / "mix.yaml").write_text(_recipe(tmp_path, (0.7, 0.3)))
    assert main(["data", "inspect", str(tmp_path / "mix.yaml"), "--stage", "sft", "--model", "builtin:tiny"]) == 0
    captured = capsys.readouterr()
    out = captured.out + captured.err
    assert "mixture" in out and "synthetic:s" in out and "prompt_comp" in out  # both sources; paths fold
    assert "210" in out and "90" in out and "70.0%" in out and "30.0%" in out  # rows in the mixture, their share
