"""End-to-end runs of SFT -> DPO on the tiny model: outputs, reference choice, QLoRA and skip (resume after a
SIGKILL: tests/test_resume_metrics.py)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from align.config import parse_recipe
from align.pipeline import run_recipe
from tests.conftest import tiny_recipe


def _run(text):
    return run_recipe(parse_recipe(text), quiet=True)


def test_two_stage_run_writes_outputs_and_dpo_raises_heldout_margin(tmp_path):
    summary = _run(tiny_recipe(tmp_path))
    run_dir = tmp_path / "tiny"
    for stage in ("sft", "dpo"):
        state = json.loads((run_dir / stage / "stage.json").read_text())
        assert state["status"] == "done"
        assert state["config_hash"] and state["versions"]["torch"] and state["data"]["train"]["fingerprint"]
        assert (run_dir / stage / "adapter" / "adapter_config.json").is_file()
        assert (run_dir / stage / "metrics.jsonl").read_text().strip()
    assert json.loads((run_dir / "dpo" / "stage.json").read_text())["parents"] == ["sft"]
    dpo = summary["stages"]["dpo"]["metrics"]
    for name in ("rewards/chosen", "rewards/margins", "rewards/accuracies", "logps/chosen", "logps/rejected"):
        assert name in dpo
    # The policy starts equal to its reference, so the held-out margin starts at exactly 0.
    assert dpo["eval_rewards/margins"] > 0.01
    assert dpo["eval_rewards/accuracies"] > 0.5
    on_disk = json.loads((run_dir / "summary.json").read_text())
    assert on_disk["stages"]["dpo"]["status"] == "done"
    assert on_disk["heldout"]["rewards"]["dpo"]["margin"] == dpo["eval_rewards/margins"]


def test_finished_stages_are_skipped_and_a_changed_stage_reruns(tmp_path):
    _run(tiny_recipe(tmp_path, dpo_steps=2))
    sft_state = (tmp_path / "tiny" / "sft" / "stage.json").read_text()
    summary = _run(tiny_recipe(tmp_path, dpo_steps=3))
    assert (tmp_path / "tiny" / "sft" / "stage.json").read_text() == sft_state  # untouched
    assert summary["stages"]["dpo"]["metrics"]["global_step"] == 3


def test_reference_logps_are_the_sft_adapters_not_the_bare_base(tmp_path):
    from peft import PeftModel

    from align.data import synthetic
    from align.models.tiny import tiny_model_and_tokenizer
    from align.stages.groups import collate_groups, encode_groups, group_logps

    recipe = parse_recipe(tiny_recipe(tmp_path, dpo_steps=1))
    run_recipe(recipe, quiet=True)
    cached = torch.tensor(torch.load(tmp_path / "tiny" / "dpo" / "ref_logps_train.pt"))  # [N, 2] chosen, rejected

    base, tokenizer = tiny_model_and_tokenizer()
    pairs = [ex.as_ranked() for ex in synthetic.load("preference", "preference")[:8]]
    batch = collate_groups(tokenizer.pad_token_id)(encode_groups(pairs, tokenizer, recipe.stage("dpo").train))
    with torch.no_grad():
        bare = group_logps(base, batch)[0]  # [8, 2]: chosen, rejected
        sft = PeftModel.from_pretrained(base, str(tmp_path / "tiny" / "sft" / "adapter"))
        with_sft = group_logps(sft, batch)[0]
    assert torch.allclose(cached[:8], with_sft, atol=1e-4)
    assert (cached[:8] - bare).abs().max() > 1e-2


def test_nf4_qlora_path_runs_sft_then_dpo(tmp_path):
    import bitsandbytes as bnb

    from align.pipeline import Pipeline

    recipe = parse_recipe(tiny_recipe(tmp_path, quantization="nf4", dpo_steps=3))
    pipeline = Pipeline(recipe, quiet=True)
    summary = pipeline.run()
    with pipeline.host.bare() as base:
        assert any(isinstance(m, bnb.nn.Linear4bit) for m in base.modules())
    assert summary["stages"]["dpo"]["status"] == "done"
    assert summary["stages"]["dpo"]["metrics"]["global_step"] == 3


@pytest.mark.parametrize("loss", ["type: ipo", "type: hinge", "type: sigmoid, rpo_alpha: 1.0"])
def test_other_dpo_losses_train(tmp_path, loss):
    text = tiny_recipe(tmp_path, dpo_steps=3).replace("type: sigmoid", loss)
    metrics = _run(text)["stages"]["dpo"]["metrics"]
    assert metrics["global_step"] == 3 and metrics["train_loss"] > 0
    assert ("nll_loss" in metrics) == ("rpo_alpha" in loss)


def test_eval_reports_task_accuracy_for_base_and_stages(tmp_path):
    text = tiny_recipe(tmp_path, dpo_steps=2) + """
eval:
  tasks: {path: "synthetic:heldout", max_rows: 7}
  stages: [base, sft, dpo]
  max_new_tokens: 8
"""
    summary = _run(text)
    accuracy = summary["heldout"]["task_accuracy"]
    assert set(accuracy) == {"base", "sft", "dpo"}
    assert all(0.0 <= a <= 1.0 for a in accuracy.values())
    on_disk = json.loads((tmp_path / "tiny" / "summary.json").read_text())
    assert on_disk["heldout"]["task_accuracy"] == accuracy


def test_length_grouped_dpo_trains(tmp_path):
    text = tiny_recipe(tmp_path, dpo_steps=2).replace("save_steps: 50}", "save_steps: 50, group_by_length: true}")
    assert "group_by_length" in text
    metrics = _run(text)["stages"]["dpo"]["metrics"]
    assert metrics["global_step"] == 2 and metrics["train_loss"] > 0


def test_a_stage_finished_in_another_run_folder_is_reused_not_trained_again(tmp_path):
    """Two recipes under one output_dir whose SFT stages are the same: the second takes the first's adapter (a sweep's
    trials share their SFT so), its DPO stage starts from it and is evaluated against it as its reference."""
    first = run_recipe(parse_recipe(tiny_recipe(tmp_path, dpo_steps=2)), quiet=True)
    evaluation = ('eval: {tasks: {path: "synthetic:heldout", max_rows: 4}, max_new_tokens: 4,\n'
                  '       preferences: {path: "synthetic:preference_heldout", max_rows: 8}}')
    second_text = tiny_recipe(tmp_path, dpo_steps=2, extra_dpo=evaluation).replace("name: tiny", "name: tiny2", 1)
    second = run_recipe(parse_recipe(second_text.replace("beta: 0.1", "beta: 0.2")), quiet=True)
    sft = json.loads((tmp_path / "tiny2" / "sft" / "stage.json").read_text())
    assert sft["reused_from"] == str(tmp_path / "tiny" / "sft")
    assert not (tmp_path / "tiny2" / "sft" / "adapter").exists()
    assert second["stages"]["sft"]["adapter"] == first["stages"]["sft"]["adapter"]
    dpo = json.loads((tmp_path / "tiny2" / "dpo" / "stage.json").read_text())
    assert dpo["status"] == "done" and "reused_from" not in dpo  # beta differs: trained
    assert second["eval"]["stages"]["dpo"]["implicit_reward_accuracy"] is not None  # its reference: the reused SFT
    rerun = run_recipe(parse_recipe(second_text.replace("beta: 0.1", "beta: 0.2")), quiet=True)
    assert rerun["stages"]["sft"]["adapter"] == first["stages"]["sft"]["adapter"]  # skipped, still the first's


def test_two_processes_that_need_the_same_stage_at_once_build_it_once(tmp_path):
    """Two `align run`s started together on recipes with the same SFT stage: one trains it under the lock, the other
    waits and reuses it."""
    commands = []
    for name in ("left", "right"):
        recipe = tmp_path / f"{name}.yaml"
        recipe.write_text(tiny_recipe(tmp_path / "runs", dpo_steps=1).replace("name: tiny", f"name: {name}", 1))
        commands.append([sys.executable, "-m", "align.cli", "run", str(recipe), "--quiet"])
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    running = [subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE) for cmd in commands]
    for proc in running:
        assert proc.wait(timeout=300) == 0, proc.stderr.read().decode()[-2000:]
    states = [json.loads((tmp_path / "runs" / name / "sft" / "stage.json").read_text()) for name in ("left", "right")]
    trained = [s for s in states if "reused_from" not in s]
    assert len(trained) == 1 and len({s["adapter"] for s in states}) == 1
