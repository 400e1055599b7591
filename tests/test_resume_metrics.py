"""Every Trainer stage kind (sft, rm, dpo, rank, kto) SIGKILLed between a checkpoint and its next log resumes to
a metrics.jsonl that logs each training step once, with the values of an uninterrupted run."""

import json

import pytest

from align.config import parse_recipe
from align.pipeline import run_recipe
from tests.conftest import _tiny_head, kill_run_after, rerun

# A kill must land after a step's log and before the next checkpoint: two steps of each three are such windows.
STEPS, SAVE = 10, 3
TRAIN = f"max_steps: {STEPS}, save_steps: {SAVE}, lr: 3.0e-3, batch_size: 8, max_length: 96, max_prompt_length: 64"
KINDS = ("sft", "rm", "dpo", "rank", "kto")


def _recipe(output_dir) -> str:
    # sft comes from the shared head; the others start from it. rm evaluates every 5 steps, the last one included.
    stage = """\
  - name: {name}
    kind: {name}
    init: ${{sft.adapter}}
    data: {{path: "synthetic:{data}", max_rows: 32}}
    eval_data: {{path: "synthetic:{data}_heldout", max_rows: 8}}
    train: {{{train}{extra}}}
"""
    text = _tiny_head("killed", output_dir, "none", sft_steps=STEPS).replace(
        f"max_steps: {STEPS}, lr: 3.0e-3, batch_size: 8, max_length: 96, max_prompt_length: 64", TRAIN)
    for name, data in (("rm", "preference"), ("dpo", "preference"), ("rank", "ranked"), ("kto", "preference")):
        text += stage.format(name=name, data=data, train=TRAIN, extra=", eval_steps: 5" if name == "rm" else "")
    return text


def _records(stage_dir) -> list[dict]:
    return [json.loads(line) for line in (stage_dir / "metrics.jsonl").read_text().splitlines()]


def _logged_past_a_checkpoint(stage_dir) -> bool:
    """A checkpoint is complete and a later step has been logged: the kill must undo that log."""
    complete = stage_dir.glob("checkpoints/checkpoint-*/trainer_state.json")
    checkpoints = [int(p.parent.name.split("-")[1]) for p in complete]
    try:
        steps = [r["step"] for r in _records(stage_dir) if "loss" in r]
    except (OSError, ValueError):  # not written yet, or a line half written
        return False
    return bool(checkpoints and steps) and max(checkpoints) < steps[-1] < STEPS


@pytest.mark.timeout(600)
def test_every_trainer_stage_killed_after_a_checkpoint_logs_each_step_once_with_uninterrupted_values(tmp_path):
    straight = run_recipe(parse_recipe(_recipe(tmp_path / "straight")), quiet=True)
    recipe = tmp_path / "killed.yaml"
    recipe.write_text(_recipe(tmp_path / "runs"))
    for kind in KINDS:  # each launch resumes the stage killed before and is killed in the next one
        stage_dir = tmp_path / "runs" / "killed" / kind
        cmd = kill_run_after(recipe, lambda stage_dir=stage_dir: _logged_past_a_checkpoint(stage_dir))
        assert json.loads((stage_dir / "stage.json").read_text())["status"] == "running"
        assert _logged_past_a_checkpoint(stage_dir), kind  # killed before its next checkpoint: a log to undo
    rerun(cmd)

    for kind in KINDS:
        stage_dir = tmp_path / "runs" / "killed" / kind
        state = json.loads((stage_dir / "stage.json").read_text())
        assert state["status"] == "done" and "checkpoint-" in state["resumed_from"], kind
        records, expected = _records(stage_dir), _records(tmp_path / "straight" / "killed" / kind)
        training = [r["step"] for r in records if "loss" in r]
        assert training == list(range(1, STEPS + 1)), kind  # each step once; no end-of-training summary record
        assert [r["step"] for r in records] == [r["step"] for r in expected], kind
        for got, want in zip(records, expected):
            assert got.keys() == want.keys(), kind
            for key, value in want.items():
                assert got[key] == pytest.approx(value, rel=1e-6, abs=1e-6), (kind, got["step"], key)
    rm_evals = [r["step"] for r in _records(tmp_path / "straight" / "killed" / "rm") if "eval_loss" in r]
    assert rm_evals == [5, 10]  # the last step is evaluated once, by the periodic evaluation
    last_rm_record = _records(tmp_path / "straight" / "killed" / "rm")[-1]
    assert straight["stages"]["rm"]["metrics"]["eval_accuracy"] == last_rm_record["eval_accuracy"]
