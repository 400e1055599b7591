"""Forgetting measured before and after every stage of a run (the metrics themselves: test_forgetting_metrics.py)."""

import json

import pytest

from align.config import parse_recipe
from align.pipeline import run_recipe
from tests.conftest import tiny_ppo_recipe, tiny_recipe

FORGETTING = """
forgetting:
  retention: {path: "synthetic:heldout"}
  tasks: {path: "synthetic:heldout"}
  max_rows: 8
  max_new_tokens: 6
  batch_size: 4
"""


def test_forgetting_is_measured_before_and_after_every_stage(tmp_path):
    summary = run_recipe(parse_recipe(tiny_recipe(tmp_path, dpo_steps=4) + FORGETTING), quiet=True)
    forgetting = summary["forgetting"]
    assert set(forgetting) == {"sft", "dpo"}
    for name, f in forgetting.items():
        state = json.loads((tmp_path / "tiny" / name / "stage.json").read_text())
        assert state["forgetting"]["after"] == f["after"]
        for side in ("before", "after"):
            assert set(f[side]) >= {"retention_nll", "retention_perplexity", "task_accuracy", "task_per_family"}
        assert f["kl_to_start"] > 0
    assert forgetting["sft"]["start"] == "base" and forgetting["dpo"]["start"].endswith("sft/adapter")
    assert forgetting["dpo"]["before"] == forgetting["sft"]["after"]  # the SFT policy, measured once
    # SFT on the task's answers makes held-out answers of the same task likelier
    assert forgetting["sft"]["after"]["retention_nll"] < forgetting["sft"]["before"]["retention_nll"] - 0.05
    assert forgetting["sft"]["change"]["retention_nll"] == pytest.approx(
        forgetting["sft"]["after"]["retention_nll"] - forgetting["sft"]["before"]["retention_nll"])


def test_every_kind_of_stage_reports_forgetting_and_a_reward_model_says_why_not(tmp_path):
    text = tiny_ppo_recipe(tmp_path, ppo_steps=1, ppo_eval=False) + FORGETTING
    summary = run_recipe(parse_recipe(text), quiet=True)
    assert set(summary["forgetting"]) == {"sft", "rm", "ppo"}
    assert "no policy changed" in summary["forgetting"]["rm"]["skipped"]
    assert summary["forgetting"]["ppo"]["kl_to_start"] > 0


def test_without_sets_nothing_is_measured_and_forgetting_can_be_turned_off(tmp_path):
    assert run_recipe(parse_recipe(tiny_recipe(tmp_path, dpo_steps=1)), quiet=True)["forgetting"] == {}
    off = tiny_recipe(tmp_path / "off", dpo_steps=1) + FORGETTING.replace("forgetting:\n",
                                                                          "forgetting:\n  enabled: false\n")
    assert run_recipe(parse_recipe(off), quiet=True)["forgetting"] == {}
