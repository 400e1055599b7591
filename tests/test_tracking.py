"""Experiment tracking (align.tracking): every stage's metrics in the trackers at the steps and values of its
metrics.jsonl, read back with each tracker's own reader, also after a SIGKILL and a resume."""

import json
from pathlib import Path

import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from align.config import parse_recipe
from align.errors import ConfigError
from align.pipeline import run_recipe
from tests.conftest import _tiny_head, kill_run_after, rerun

GRPO = """\
  - name: grpo
    kind: grpo
    init: ${{sft.adapter}}
    data: {{path: "synthetic:prompts", max_rows: 32}}
    rewards: [{{rule: synthetic_tasks}}]
    grpo: {{prompts_per_step: 4, num_generations: 4, max_new_tokens: 8, minibatch_size: 8}}
    train: {{max_steps: {steps}, save_steps: 2, lr: 5.0e-3, max_length: 96, max_prompt_length: 64}}
"""


def _recipe(output_dir, report_to: str, sft_steps: int = 4, grpo_steps: int = 0, project: str = "align-tests") -> str:
    text = _tiny_head("tracked", output_dir, "none", sft_steps=sft_steps)
    text = text.replace("max_prompt_length: 64}", "max_prompt_length: 64, save_steps: 2}", 1)
    return (f"tracking: {{report_to: {report_to}, project: {project}}}\n" + text
            + (GRPO.format(steps=grpo_steps) if grpo_steps else ""))


def _jsonl(stage_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (stage_dir / "metrics.jsonl").read_text().splitlines()]


def _numeric(records: list[dict]) -> dict[str, dict[int, float]]:
    """metric -> {step: value} of a stage's metrics.jsonl."""
    out: dict[str, dict[int, float]] = {}
    for record in records:
        for key, value in record.items():
            if key != "step" and isinstance(value, (int, float)):
                out.setdefault(key, {})[record["step"]] = float(value)
    return out


def _tensorboard(stage_dir: Path) -> dict[str, list[tuple[int, float]]]:
    events = EventAccumulator(str(stage_dir / "tensorboard"))  # purge_orphaned_data: on, as in TensorBoard itself
    events.Reload()
    return {tag: [(e.step, e.value) for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]}


def _same_as_the_log(logged: dict[str, dict[int, float]], tracked: dict[str, list[tuple[int, float]]]) -> None:
    assert set(tracked) == set(logged)
    for key, by_step in logged.items():
        steps = [step for step, _ in tracked[key]]
        assert steps == sorted(by_step), key  # each step once, in order: nothing logged twice
        for step, value in tracked[key]:
            assert value == pytest.approx(by_step[step], rel=1e-6, abs=1e-7), (key, step)


def _trackio(stage_dir: Path, project: str) -> dict[str, list[tuple[int, float]]]:
    from trackio.sqlite_storage import SQLiteStorage

    run_id = json.loads((stage_dir / "tracking.json").read_text())["trackio"]
    rows = SQLiteStorage.get_logs(project, run_id=run_id)
    return {key: [(r["step"], r[key]) for r in rows if key in r]
            for key in {k for r in rows for k in r if k not in ("step", "timestamp")}}


def test_tensorboard_and_trackio_have_every_stages_metrics_at_their_steps_once_also_after_a_sigkill(tmp_path):
    recipe = tmp_path / "tracked.yaml"
    project = f"align-tests-{tmp_path.name}"
    recipe.write_text(_recipe(tmp_path / "runs", "[tensorboard, trackio]", grpo_steps=8, project=project))
    run = tmp_path / "runs" / "tracked"

    def grpo_logged_past_a_checkpoint() -> bool:  # killed with a step to redo, after SFT finished
        log = run / "grpo" / "metrics.jsonl"
        return bool(list((run / "grpo" / "checkpoints").glob("step-*/state.pt"))) and log.is_file() and \
            log.read_text().count("\n") % 2 == 1

    cmd = kill_run_after(recipe, grpo_logged_past_a_checkpoint)
    killed_at = len(_jsonl(run / "grpo"))
    rerun(cmd)
    assert json.loads((run / "grpo" / "stage.json").read_text())["resumed_from"]
    assert killed_at < 8 and killed_at % 2 == 1  # the resumed run logged step `killed_at` again
    for stage in ("sft", "grpo"):
        records = _jsonl(run / stage)
        assert [r["step"] for r in records] == list(range(1, len(records) + 1))
        _same_as_the_log(_numeric(records), _tensorboard(run / stage))
        _same_as_the_log(_numeric(records), _trackio(run / stage, project))


def test_unknown_tracker_is_a_config_error_naming_the_key(tmp_path):
    with pytest.raises(ConfigError, match=r"tracking.report_to\[0\].*unknown tracker 'tensorbored'"):
        parse_recipe(_recipe(tmp_path, "[tensorbored]"))


def test_mlflow_and_wandb_get_the_metrics_locally(tmp_path, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    run_recipe(parse_recipe(_recipe(tmp_path / "runs", "[mlflow, wandb]", sft_steps=3)), quiet=True)
    stage_dir = tmp_path / "runs" / "tracked" / "sft"
    logged = _numeric(_jsonl(stage_dir))
    ids = json.loads((stage_dir / "tracking.json").read_text())

    from mlflow import MlflowClient

    client = MlflowClient()
    assert client.get_run(ids["mlflow"]).info.run_name == "tracked/sft"
    _same_as_the_log(logged, {key: [(m.step, m.value) for m in client.get_metric_history(ids["mlflow"], key)]
                              for key in client.get_run(ids["mlflow"]).data.metrics})

    assert len(list((stage_dir / "wandb").glob(f"offline-run-*-{ids['wandb']}/run-{ids['wandb']}.wandb"))) == 1
    assert not (tmp_path / "runs" / "tracked" / "sft" / "tensorboard").exists()  # only what the recipe names


def test_a_new_run_folder_starts_new_trackio_runs_where_an_earlier_one_used_the_names(tmp_path):
    project = f"align-tests-{tmp_path.name}"
    for attempt in ("first", "second"):  # the same recipe name, so the same run names, in one Trackio project
        run_recipe(parse_recipe(_recipe(tmp_path / attempt, "[trackio]", sft_steps=3, project=project)), quiet=True)
    stages = [tmp_path / attempt / "tracked" / "sft" for attempt in ("first", "second")]
    assert len({json.loads((stage / "tracking.json").read_text())["trackio"] for stage in stages}) == 2
    for stage in stages:
        _same_as_the_log(_numeric(_jsonl(stage)), _trackio(stage, project))


def test_a_resumed_stage_sends_trackio_the_steps_its_database_lacks_once(tmp_path):
    """The killed run's logging thread wrote steps 1-2 before the kill; it logged 3 and 4 too (metrics.jsonl), and the
    resume starts from the checkpoint at step 4: Trackio gets 3-4 from the log, 5 from the loop, 1-2 not again."""
    from align.run_folder import StageFolder
    from align.tracking import Trackio

    project, stage_dir = f"align-tests-{tmp_path.name}", tmp_path / "sft"
    stage_dir.mkdir()
    log = StageFolder(stage_dir).metrics
    killed = Trackio(stage_dir, "tracked/sft", "tracked", project, {"lr": 1e-3})
    killed.begin(0, 5)
    for step in (1, 2):
        log.logged(step, {"loss": 1.0 / step})
        killed.logged(step, {"loss": 1.0 / step})
    killed.end()
    for step in (3, 4):
        log.logged(step, {"loss": 1.0 / step})

    resumed = Trackio(stage_dir, "tracked/sft", "tracked", project, {"lr": 1e-3}, sent_through=4)
    resumed.begin(4, 5)
    log.logged(5, {"loss": 0.2})
    resumed.logged(5, {"loss": 0.2})
    resumed.end()
    assert resumed.handle.id == killed.handle.id  # one run, reopened
    _same_as_the_log(_numeric(_jsonl(stage_dir)), _trackio(stage_dir, project))
