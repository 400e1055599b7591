"""Early stopping (align.stages.early_stopping): the rule by hand, and stages whose held-out metric rises then falls
stop before their last step and hand on the adapter of their best evaluation (a Trainer stage, also across a SIGKILL,
and the online loop). The metric is scripted by step, so that it rises and falls for certain: the stage's own
evaluation still runs, and only the number it reports is replaced."""

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from align.config import parse_recipe
from align.errors import ConfigError
from align.pipeline import run_recipe
from align.settings import EarlyStoppingConfig
from align.stages.early_stopping import EarlyStopping
from tests.conftest import _tiny_head, kill_run_after, rerun

# eval_score by step: best at step 6, then two evaluations without an improvement (patience 2) stop it at step 10
SCRIPT = {2: 0.2, 4: 0.5, 6: 0.9, 8: 0.7, 10: 0.85, 12: 0.95, 14: 1.0}
HOOK = f"""\
from align.stages import engine

SCRIPT = {SCRIPT!r}
_log = engine.AlignTrainer.log


def scripted_log(self, logs, start_time=None):
    if "eval_loss" in logs:  # the stage's evaluation ran; its score is the script's
        logs["eval_score"] = SCRIPT[self.state.global_step]
    return _log(self, logs, start_time)


engine.AlignTrainer.log = scripted_log
"""


def test_the_rule_by_hand():
    stopping = EarlyStopping(EarlyStoppingConfig(metric="eval_score", patience=2))
    for step, value in [(2, 0.2), (4, 0.5), (6, 0.9), (8, 0.7)]:
        stopping.record(step, {"eval_score": value, "loss": 1.0})
    stopping.record(9, {"loss": 1.0})  # a training log: not an evaluation
    assert stopping.best() == (6, 0.9) and stopping.waited() == 1 and not stopping.should_stop
    stopping.record(10, {"eval_score": 0.85})
    assert stopping.should_stop
    report = stopping.report(10)
    assert report["stopped_at"] == 10 and "did not improve on 0.9 (step 6)" in report["reason"]

    small = EarlyStopping(EarlyStoppingConfig(metric="eval_loss", mode="min", patience=1, min_delta=0.1))
    for step, value in [(1, float("nan")), (2, 1.0), (3, 0.95)]:  # 0.95 is better, but not by more than 0.1
        small.record(step, {"eval_loss": value})
    assert small.best() == (2, 1.0) and small.should_stop


def _recipe(output_dir, steps: int = 20, extra: str = "") -> str:
    text = _tiny_head("stops", output_dir, "none", sft_steps=steps)
    return text.replace('data: {path: "synthetic:sft", max_rows: 64}',
                        'data: {path: "synthetic:sft", max_rows: 64}\n'
                        '    eval_data: {path: "synthetic:heldout", max_rows: 8}').replace(
        "max_prompt_length: 64}", "max_prompt_length: 64, eval_steps: 2, save_steps: 50,\n"
        "            early_stopping: {metric: eval_score, mode: max, patience: 2}" + extra + "}")


def _policy(folder: Path) -> dict[str, torch.Tensor]:
    return load_file(str(folder / "adapter_model.safetensors"))


def _same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.fixture
def scripted(tmp_path, monkeypatch):
    hooks = tmp_path / "hooks"
    hooks.mkdir()
    (hooks / "sitecustomize.py").write_text(HOOK)
    namespace: dict = {}
    exec(HOOK.replace("engine.AlignTrainer.log = scripted_log", ""), namespace)
    from align.stages import engine

    monkeypatch.setattr(engine.AlignTrainer, "log", namespace["scripted_log"])
    return hooks


def test_a_trainer_stage_stops_and_hands_on_its_best_checkpoint_also_after_a_sigkill(tmp_path, scripted,
                                                                                     monkeypatch):
    run_recipe(parse_recipe(_recipe(tmp_path / "whole")), quiet=True)
    stage = tmp_path / "whole" / "stops" / "sft"
    state = json.loads((stage / "stage.json").read_text())
    assert state["status"] == "stopped_early"
    record = state["early_stopping"]
    assert (record["best_step"], record["stopped_at"], record["evaluations"]) == (6, 10, 5)
    assert state["metrics"]["global_step"] == 10 and state["metrics"]["eval_score"] == 0.9
    adapter = _policy(stage / "adapter")
    assert _same(adapter, _policy(stage / "checkpoints" / "checkpoint-6" / "policy"))  # kept out of the rotation
    assert not _same(adapter, _policy(stage / "checkpoints" / "checkpoint-10" / "policy"))
    steps = [json.loads(line)["step"] for line in (stage / "metrics.jsonl").read_text().splitlines()]
    assert max(steps) == 10

    # the same run, killed after its checkpoint at step 4 and resumed, ends the same
    recipe = tmp_path / "stops.yaml"
    recipe.write_text(_recipe(tmp_path / "killed"))
    killed = tmp_path / "killed" / "stops" / "sft"
    monkeypatch.setenv("PYTHONPATH", str(scripted))  # kill_run_after puts the repository before it
    cmd = kill_run_after(recipe, lambda: (killed / "checkpoints" / "checkpoint-4" / "trainer_state.json").is_file())
    assert json.loads((killed / "stage.json").read_text())["status"] == "running"
    rerun(cmd)
    resumed = json.loads((killed / "stage.json").read_text())
    assert resumed["status"] == "stopped_early" and resumed["resumed_from"].endswith("checkpoint-4")
    assert {k: resumed["early_stopping"][k] for k in record} == record
    torch.testing.assert_close(_policy(killed / "adapter"), adapter, atol=1e-6, rtol=0)
    logged = [json.loads(line) for line in (killed / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in logged if "eval_score" in r] == [2, 4, 6, 8, 10]  # each evaluation once


def test_the_online_loop_stops_and_hands_on_its_best_evaluations_policy(tmp_path, monkeypatch):
    from align.stages import grpo

    calls = []

    def scripted_rewards(*args, **kwargs):  # the first call scores the starting policy, then one per evaluation
        calls.append(len(calls))
        return {"objective/scores": [0.1, 0.2, 0.6, 0.4, 0.3, 0.5, 0.9, 0.9][len(calls) - 1]}

    monkeypatch.setattr(grpo, "heldout_rewards", scripted_rewards)
    text = _tiny_head("stops", tmp_path, "none", sft_steps=2) + """\
  - name: grpo
    kind: grpo
    init: ${sft.adapter}
    data: {path: "synthetic:prompts", max_rows: 32}
    eval_data: {path: "synthetic:heldout", max_rows: 4}
    rewards: [{rule: synthetic_tasks}]
    replay: {fraction: 0.5}  # the random model earns no reward: the replayed SFT data move the policy
    grpo: {prompts_per_step: 2, num_generations: 2, max_new_tokens: 4, minibatch_size: 4}
    train: {max_steps: 12, save_steps: 50, eval_steps: 1, lr: 5.0e-2, max_length: 96, max_prompt_length: 64,
            early_stopping: {metric: eval_objective/scores, patience: 2}}
"""
    run_recipe(parse_recipe(text), quiet=True)
    stage = tmp_path / "stops" / "grpo"
    state = json.loads((stage / "stage.json").read_text())
    assert state["status"] == "stopped_early"
    assert (state["early_stopping"]["best_step"], state["early_stopping"]["stopped_at"]) == (2, 4)
    best = torch.load(stage / "checkpoints" / "step-2" / "state.pt", weights_only=False)["policy"]
    last = torch.load(stage / "checkpoints" / "step-4" / "state.pt", weights_only=False)["policy"]
    adapter = _policy(stage / "adapter")
    assert _same(adapter, best)
    assert any(not torch.equal(best[k], last[k]) for k in best)  # the policy moved after its best evaluation


def test_early_stopping_needs_held_out_data_and_an_evaluation_interval(tmp_path):
    no_eval_data = _recipe(tmp_path).replace('    eval_data: {path: "synthetic:heldout", max_rows: 8}\n', "")
    with pytest.raises(ConfigError, match="early_stopping.*needs eval_data"):
        parse_recipe(no_eval_data)
    with pytest.raises(ConfigError, match="early_stopping.*needs train.eval_steps"):
        parse_recipe(_recipe(tmp_path).replace("eval_steps: 2, ", ""))
    with pytest.raises(ConfigError, match="metric.*must be a held-out metric"):
        parse_recipe(_recipe(tmp_path).replace("metric: eval_score", "metric: loss"))
