"""Rewards: rule cards and rule files and their errors, the one factory for cards and learned rewards, reward
sources in recipes, PPO's reward and config checks, and the cards of a non-editable install."""

import dataclasses
import json
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import torch

from align.config import parse_recipe
from align.data.formats import load_examples
from align.data.rules import check, gold_answer
from align.errors import AlignError, ConfigError, DataError
from align.pipeline import run_recipe
from align.rewards import (
    REWARD_SOURCES,
    ModelSource,
    Reward,
    RewardSource,
    RuleSource,
    cards,
    load_reward,
    register_source,
)
from tests.conftest import tiny_ppo_recipe


def test_shipped_rule_rewards_parse():
    assert cards()
    for name in cards():
        # recipes name the file, PPO's metrics (reward/rule:NAME) the name inside it: one name for both
        assert load_reward(name).spec.name == name


def test_task_check_uses_each_prompts_own_rule():
    reward = load_reward("synthetic_tasks")
    rules = [{"kind": "exact", "answer": "12"}, {"kind": "one_of", "answers": ["Paris", "paris"]},
             {"kind": "json", "answer": {"a": 1}}]
    scores = reward.score(None, ["12.", "Lyon", '{"a": 1}'], rules)
    assert scores.tolist() == [1.0, 0.0, 1.0]


def test_checks_add_up(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text("name: r\nchecks:\n  - {kind: regex, pattern: '^\\d+$', reward: 1.0, penalty: -1.0}\n"
                    "  - {kind: max_chars, limit: 3, reward: 0.5}\n")
    scores = load_reward(str(path)).score(None, ["12", "1234", "abc"])
    assert scores.tolist() == [1.5, 1.0, -0.5]  # 1234: regex +1, too long +0; abc: regex -1, short +0.5


@pytest.mark.parametrize("text, where", [
    ("name: r\nchecks:\n  - {kind: regex, pattern: '('}\n",
     ["r.yaml:3:", "'checks[0].pattern'", "not a regular expression"]),
    ("name: r\nchecks:\n  - {kind: regexp, pattern: a}\n", ["r.yaml:3:", "'checks[0].kind'", "regexp"]),
    ("name: r\nchecks:\n  - {kind: max_chars}\n", ["r.yaml:3:", "'checks[0].limit'"]),
    ("name: r\nchecks: []\n", ["r.yaml:2:", "'checks'", "at least one check"]),
])
def test_bad_rule_file_names_file_line_and_key(tmp_path, monkeypatch, text, where):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "r.yaml").write_text(text)
    with pytest.raises(ConfigError) as info:
        load_reward("r.yaml")
    for piece in where:
        assert piece in str(info.value), str(info.value)


def test_unknown_reward_lists_the_known_names():
    with pytest.raises(AlignError, match="synthetic_tasks"):
        load_reward("no_such_reward")


@pytest.mark.parametrize("old, new, key, words", [
    ("rewards: [{rule: synthetic_tasks, weight: 1.0}]", "rewards: [{rule: synthetic_task}]", "rule",
     "no rule-reward file 'synthetic_task'"),
    ("rewards: [{rule: synthetic_tasks, weight: 1.0}]", "rewards: []", "rewards", "at least one reward"),
    ("rewards: [{rule: synthetic_tasks, weight: 1.0}]", "rewards: [{weight: 1.0}]", "model", "exactly one of"),
    ("minibatch_size: 4", "minibatch_size: 3", "minibatch_size", "must divide rollout_batch_size"),
])
def test_ppo_config_mistakes_are_named(tmp_path, old, new, key, words):
    text = tiny_ppo_recipe(tmp_path, rewards="[{rule: synthetic_tasks, weight: 1.0}]")
    assert old in text
    with pytest.raises(ConfigError) as info:
        parse_recipe(text.replace(old, new), "tiny.yaml")
    assert info.value.key.endswith(key) and words in str(info.value), str(info.value)
    assert info.value.line == text[: text.index(old)].count("\n") + 1  # the line of the mistake


def test_rule_reward_on_prompts_without_rules_names_the_row(tmp_path):
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": f"Say {i}."}) + "\n" for i in range(16)))
    text = tiny_ppo_recipe(tmp_path, rewards="[{rule: synthetic_tasks, weight: 1.0}]").replace(
        '"synthetic:prompts", max_rows: 32', f'"{prompts}"')
    with pytest.raises(DataError) as info:
        run_recipe(parse_recipe(text), quiet=True)
    assert info.value.row == 1 and info.value.field == "rule" and str(prompts) in str(info.value)


# --- rules and their gold answers -------------------------------------------------------------------


@pytest.mark.parametrize("rule, gold", [
    ({"kind": "exact", "answer": 12}, "12"),
    ({"kind": "one_of", "answers": ["Paris", "paris"]}, "Paris"),
    ({"kind": "json", "answer": {"a": [1, "é"]}}, '{"a": [1, "é"]}'),
    ({}, None),
])
def test_gold_answer_is_an_answer_its_rule_accepts(rule, gold):
    assert gold_answer(rule) == gold
    assert gold is None or check(rule, gold)


def test_every_task_rule_accepts_its_gold_answer():
    examples = load_examples("synthetic:heldout", "task").examples
    assert examples and all(check(ex.rule, gold_answer(ex.rule)) for ex in examples)
    with pytest.raises(ValueError, match="unknown rule kind 'regex'"):
        gold_answer({"kind": "regex"})


# --- the factory --------------------------------------------------------------------------------------


def test_a_card_scores_the_same_however_it_is_named():
    rules = [{"kind": "exact", "answer": "12"}, {"kind": "one_of", "answers": ["Paris"]},
             {"kind": "json", "answer": [1]}]
    replies = ["12", "Lyon", "[1]"]
    expected = [float(check(rule, reply)) for rule, reply in zip(rules, replies)]
    for spec in ("synthetic_tasks", "synthetic_tasks.yaml", str(cards()["synthetic_tasks"]),
                 RuleSource(rule="synthetic_tasks")):
        reward = load_reward(spec)
        assert (isinstance(reward, Reward)
                and (reward.name, reward.kind, reward.needs_rules) == ("synthetic_tasks", "rule", True))
        assert reward.score(None, replies, rules).tolist() == expected


def test_a_learned_reward_scores_as_its_rm_stage_measured_and_as_eval_judges(tiny_rm_run):
    """Through the factory (by folder, by source, and as eval's judge with the rm stage's own truncation), an
    rm stage's adapter and head give the held-out margin and accuracy the stage itself recorded."""
    from align.eval.judges import JUDGE_ADAPTER, load_judge
    from align.models.adapters import with_frozen
    from align.models.load import load_base
    from align.runs import open_run

    run = open_run(tiny_rm_run)
    folder = run.adapter("rm")
    recorded = run.state("rm")["metrics"]
    pairs = load_examples("synthetic:preference_heldout", "preference", max_rows=10).examples
    base, tokenizer = load_base(run.recipe.model)
    model = with_frozen(base, {JUDGE_ADAPTER: folder})
    judge = load_judge("rm", run, model, tokenizer)
    assert (judge.name, judge.kind) == ("rm", "learned")
    prompts = [p.prompt for p in pairs]
    for reward in (load_reward(folder, model, tokenizer, JUDGE_ADAPTER, (96, 64)),
                   load_reward(ModelSource(model=folder), model, tokenizer, JUDGE_ADAPTER, (96, 64)), judge.reward):
        chosen = reward.score(prompts, [p.chosen[-1]["content"] for p in pairs])
        rejected = reward.score(prompts, [p.rejected[-1]["content"] for p in pairs])
        assert float((chosen - rejected).mean()) == pytest.approx(recorded["eval_margin"], abs=1e-4)
        assert float((chosen > rejected).float().mean()) == pytest.approx(recorded["eval_accuracy"])
    with pytest.raises(AlignError, match="needs the base model it was trained on"):
        load_reward(folder)


def test_a_spec_that_names_no_reward_says_what_it_could_name(tmp_path):
    for spec in ("no_such_card", str(tmp_path)):  # a folder without a score head is no rm stage's
        with pytest.raises(AlignError) as info:
            load_reward(spec)
        assert f"'{spec}' is neither a reward card ({', '.join(cards())}), a rule file, nor a folder written by " \
               "an rm stage" in str(info.value)


# --- reward sources in recipes ------------------------------------------------------------------------


def test_reward_sources_are_one_dataclass_per_key(tmp_path):
    ppo = parse_recipe(tiny_ppo_recipe(tmp_path)).stage("ppo")
    assert ppo.rewards == [RuleSource(rule="synthetic_tasks", weight=1.0),
                           ModelSource(model="${rm.adapter}", weight=0.5)]
    assert ([s.key for s in ppo.rewards] == ["rule", "model"]
            and [s.adapter_folder for s in ppo.rewards] == [None, "${rm.adapter}"])
    # run folders saved before sources were variants wrote the other key as null
    old = tiny_ppo_recipe(tmp_path, rewards='[{model: "${rm.adapter}", rule: null, weight: 0.5}]')
    assert parse_recipe(old).stage("ppo").rewards == [ModelSource(model="${rm.adapter}", weight=0.5)]


@pytest.mark.parametrize("rewards, offset, key, words", [
    ("[{rule: concise, model: x}]", 0, "model",
     "needs exactly one of the keys model, rule, not both 'rule' and 'model'"),
    ("[{weight: 2.0}]", 0, "model", "needs exactly one of the keys model, rule; this one has none"),
    ("[{rule: concise}, {rule: nope}]", 0, "rule",
     "no rule-reward file 'nope': give a path, or the name of a reward card (answer_format, concise, math_answer, "
     "synthetic_tasks)"),
    ("[{rule: concise, wieght: 2.0}]", 0, "wieght", "did you mean 'weight'?"),
    ("\n      - rule: concise\n      - weight: 1.0\n        model: x\n        rule: concise", 4, "rule", "not both"),
])
def test_a_bad_reward_source_names_its_line_and_key(tmp_path, rewards, offset, key, words):
    text = tiny_ppo_recipe(tmp_path, rewards=rewards)
    with pytest.raises(ConfigError) as info:
        parse_recipe(text, "tiny.yaml")
    error = info.value
    assert error.file == "tiny.yaml" and error.key.endswith(key) and words in error.message, str(error)
    assert error.line == text[: text.index("rewards:")].count("\n") + 1 + offset


def test_a_reward_source_is_one_dataclass_and_one_registration(tmp_path):
    """A source kind of the test's own: recipes take it by its key, the factory builds its reward."""

    class Constant(Reward):
        name, kind, needs_rules = "constant", "constant", False

        def __init__(self, value):
            self.value = value

        def score(self, prompts, responses, rules=None):
            return torch.full((len(responses),), self.value)

    @dataclasses.dataclass(kw_only=True)
    class ConstantSource(RewardSource):
        constant: float

        def load(self, model=None, tokenizer=None, adapter="reward", lengths=(512, 256)):
            return Constant(self.constant)

    register_source("constant")(ConstantSource)
    try:
        ppo = parse_recipe(tiny_ppo_recipe(tmp_path, rewards="[{constant: 2.5, weight: 2.0}]")).stage("ppo")
        assert load_reward(ppo.rewards[0]).score(None, ["a", "b"]).tolist() == [2.5, 2.5]
        with pytest.raises(ConfigError, match="exactly one of the keys model, rule, constant"):
            parse_recipe(tiny_ppo_recipe(tmp_path, rewards="[{weight: 2.0}]"))
    finally:
        del REWARD_SOURCES["constant"]


# --- an installed align ---------------------------------------------------------------------------------


def test_a_non_editable_install_finds_its_cards(tmp_path):
    """The wheel carries the cards as package data: align imported from the unpacked wheel, anywhere but the
    source tree, lists and loads them."""
    root = Path(__file__).resolve().parents[1]
    source = tmp_path / "source"  # built from a copy, so that the build leaves nothing in the source tree
    shutil.copytree(root / "align", source / "align", ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(root / name, source / name)
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index", "-q",
                    "-w", str(tmp_path / "wheel"), str(source)], check=True, capture_output=True)
    (wheel,) = (tmp_path / "wheel").glob("align-*.whl")
    assert "align/models/tiny_tokenizer.json" in zipfile.ZipFile(wheel).namelist()  # the fallback model's tokenizer
    installed = tmp_path / "installed"
    zipfile.ZipFile(wheel).extractall(installed)
    script = ("import align, align.rewards as r; print(align.__file__); "
              "print(*(f'{n}={r.load_reward(n).name}' for n in r.cards()))")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    out = subprocess.run([sys.executable, "-c", script], cwd=elsewhere,
                         env={**os.environ, "PYTHONPATH": str(installed)},
                         check=True, capture_output=True, text=True).stdout.split("\n")
    assert Path(out[0]).resolve().is_relative_to(installed.resolve())
    assert {"synthetic_tasks=synthetic_tasks", "concise=concise"} <= set(out[1].split())
