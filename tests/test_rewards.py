"""Rule-based rewards (files under reward_models/) and their errors; PPO's reward and config checks."""

import json

import pytest

from align.config import parse_recipe
from align.errors import AlignError, ConfigError, DataError
from align.pipeline import run_recipe
from align.rewards import REWARD_MODELS_DIR, load_reward
from tests.conftest import tiny_ppo_recipe


def test_shipped_rule_rewards_parse():
    files = sorted(REWARD_MODELS_DIR.glob("*.yaml"))
    assert files
    for path in files:
        # recipes name the file, PPO's metrics (reward/rule:NAME) the name inside it: one name for both
        assert load_reward(path.stem).spec.name == path.stem


def test_task_check_uses_each_prompts_own_rule():
    reward = load_reward("synthetic_tasks")
    rules = [{"kind": "exact", "answer": "12"}, {"kind": "one_of", "answers": ["Paris", "paris"]}, {"kind": "json", "answer": {"a": 1}}]
    scores = reward.score(None, ["12.", "Lyon", '{"a": 1}'], rules)
    assert scores.tolist() == [1.0, 0.0, 1.0]


def test_checks_add_up(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text("name: r\nchecks:\n  - {kind: regex, pattern: '^\\d+$', reward: 1.0, penalty: -1.0}\n"
                    "  - {kind: max_chars, limit: 3, reward: 0.5}\n")
    scores = load_reward(str(path)).score(None, ["12", "1234", "abc"])
    assert scores.tolist() == [1.5, 1.0, -0.5]  # 1234: regex +1, too long +0; abc: regex -1, short +0.5


@pytest.mark.parametrize("text, where", [
    ("name: r\nchecks:\n  - {kind: regex, pattern: '('}\n", ["r.yaml:3:", "'checks[0].pattern'", "not a regular expression"]),
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
    ("rewards: [{rule: synthetic_tasks, weight: 1.0}]", "rewards: [{rule: synthetic_task}]", "rule", "no rule-reward file 'synthetic_task'"),
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
