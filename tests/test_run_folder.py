"""align.run_folder: the stage.json life cycle, the metrics log's truncation on resume, whole-or-nothing writes, and a
finished stage found by its identity from another run folder."""

import json

from align.config import parse_recipe
from align.pipeline import run_recipe
from align.run_folder import DONE, FINISHED, PRUNED, STOPPED_EARLY, MetricsLog, StageFolder, find_finished, write_json
from tests.conftest import _tiny_head


def test_the_metrics_log_drops_what_a_killed_run_logged_after_its_checkpoint(tmp_path):
    log = MetricsLog(tmp_path / "metrics.jsonl")
    assert log.records() == []
    for step in range(1, 8):
        log.append({"step": step, "loss": 1.0 / step})
    log.keep_until(4)
    assert [r["step"] for r in log.records()] == [1, 2, 3, 4]
    log.append({"step": 5, "loss": 0.5})
    assert [r["step"] for r in log.records()] == [1, 2, 3, 4, 5]


def test_a_json_write_replaces_the_file_whole(tmp_path):
    path = tmp_path / "stage.json"
    write_json(path, {"status": "running"})
    write_json(path, {"status": "done", "metrics": {"loss": 0.1}})
    assert json.loads(path.read_text()) == {"status": "done", "metrics": {"loss": 0.1}}
    assert [p.name for p in tmp_path.iterdir()] == ["stage.json"]  # no temporary file left behind


def test_only_finished_stages_with_an_adapter_are_found_by_their_identity(tmp_path):
    assert set(FINISHED) == {DONE, STOPPED_EARLY} and PRUNED not in FINISHED
    for run, status in (("a", PRUNED), ("b", STOPPED_EARLY), ("c", DONE)):
        folder = StageFolder(tmp_path / run / "sft")
        (folder.dir / "adapter").mkdir(parents=True)
        folder.write({"status": status, "config_hash": "abc"})
    assert find_finished(tmp_path, "abc").dir == tmp_path / "b" / "sft"  # the first finished one, pruned skipped
    assert find_finished(tmp_path, "other") is None


def test_the_same_stage_in_another_run_folder_has_the_same_identity(tmp_path):
    def recipe(name):
        return parse_recipe(_tiny_head(name, tmp_path / "runs", "none", sft_steps=2))

    run_recipe(recipe("first"), quiet=True)
    second = run_recipe(recipe("second"), quiet=True)
    first_state = StageFolder(tmp_path / "runs" / "first" / "sft").state()
    second_state = StageFolder(tmp_path / "runs" / "second" / "sft").state()
    assert first_state["config_hash"] == second_state["config_hash"]  # the run's name and folder are not in it
    found = find_finished(tmp_path / "runs", second_state["config_hash"])
    assert found.dir == tmp_path / "runs" / "first" / "sft" and found.outputs()["adapter"].endswith("first/sft/adapter")
    assert second["stages"]["sft"]["status"] == DONE


def test_a_record_half_written_when_the_run_was_killed_goes_on_resume(tmp_path):
    log = MetricsLog(tmp_path / "metrics.jsonl")
    log.append({"step": 1, "loss": 1.0})
    with log.path.open("a") as f:
        f.write('{"step": 2, "lo')  # SIGKILL mid-append
    log.keep_until(2)
    assert log.records() == [{"step": 1, "loss": 1.0}]


def test_a_checkpoint_killed_while_being_saved_is_not_resumed_from(tmp_path):
    from align.stages.online import checkpoints

    for name, content in (("step-2", b"x"), ("step-10", b"x"), ("step-12.tmp", b"")):
        (tmp_path / "checkpoints" / name).mkdir(parents=True)
        (tmp_path / "checkpoints" / name / "state.pt").write_bytes(content)
    assert [p.name for p in checkpoints(tmp_path)] == ["step-2", "step-10"]
