"""`align sweep` (align.sweep): the sweep file's checks, a study that prunes by the rule and writes the best recipe, a
sweep killed mid-trial that completes without repeating finished trials, and two processes sharing one study and its
SFT stage. All on the tiny random model."""

import json
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from align.config import load_recipe
from align.errors import ConfigError
from align.run_folder import PRUNED
from align.sweep.space import load_sweep
from align.sweep.study import Sweep
from tests.conftest import _repository_first, tiny_recipe

RECIPES = Path(__file__).parents[1] / "recipes"
SWEEP_FILES = sorted(RECIPES.glob("sweep_*.yaml"))


def _files(tmp_path, space: str, dpo_steps: int = 6, save_steps: int = 50) -> Path:
    (tmp_path / "tiny.yaml").write_text(tiny_recipe(tmp_path / "runs", dpo_steps=dpo_steps, save_steps=save_steps)
                                        + 'eval:\n  tasks: {path: "synthetic:heldout", max_rows: 8}\n'
                                          "  max_new_tokens: 8\n")
    path = tmp_path / "space.yaml"
    path.write_text("recipe: tiny.yaml\n" + space)
    return path


TRIAL = """\
trial:
  eval.tasks: {path: "synthetic:validation", max_rows: 8}
  eval.stages: [dpo]
  eval.report: false
  stages.dpo.eval_data: {path: "synthetic:preference_validation", max_rows: 16}
  stages.dpo.train.eval_steps: 2
"""


@pytest.mark.parametrize("path", [pytest.param(p, id=p.name) for p in SWEEP_FILES])
def test_shipped_sweep_file_is_valid_for_its_recipe(path):
    sweep = load_sweep(path)
    recipe_path = path.parent / sweep.recipe
    sweep.check(recipe_path.read_text(), str(recipe_path), [])
    trial = load_recipe(recipe_path, sweep.overrides({p.key: p.grid()[0] if p.kind == "choices" else
                                                      getattr(p, p.kind)[0] for p in sweep.space}))
    held_out = load_recipe(recipe_path).eval.tasks.path
    assert trial.eval.tasks.path != held_out  # trials are scored off the reported held-out prompts


@pytest.mark.parametrize("space, words", [
    ("space: {stages.dpo.train.lrr: {log_uniform: [1.0e-4, 1.0e-2]}}\nobjective: {metric: x}\n",
     ["lrr", "unknown key", "did you mean 'lr'"]),
    ("space:\n  stages.dpo.train.lr: {uniform: [0.1, 0.01]}\nobjective: {metric: x}\n",
     ["space.yaml:3", "low < high"]),
    ("space:\n  stages.dpo.loss.beta: 0.1\nobjective: {metric: x}\n", ["space.yaml:3", "stages.dpo.loss.beta"]),
    ("space: {stages.dpo.loss.beta: [0.1, 0.3]}\nobjective: {metric: x}\n"
     "pruning: {stage: dpo, metric: eval_loss}\n", ["eval_loss is not comparable"]),
    ("space: {stages.dpo.loss.beta: [0.1, 0.3]}\nobjective: [{metric: x}, {metric: y, direction: minimize}]\n"
     "pruning: {stage: dpo, metric: eval_rewards/accuracies}\n", ["pruning needs a single objective"]),
    ("space: {stages.dpo.loss.beta: [0.1, 0.3]}\nobjective: {metric: x}\n"
     "pruning: {stage: ppo, metric: eval_rewards/accuracies}\n", ["no stage 'ppo'"]),
])
def test_a_bad_sweep_file_fails_before_any_trial_naming_file_line_and_key(tmp_path, space, words):
    path = _files(tmp_path, space)
    with pytest.raises(ConfigError) as err:
        sweep = load_sweep(path)
        Sweep(sweep, str(tmp_path / "tiny.yaml"), [])
    assert all(w in str(err.value) for w in words), str(err.value)
    assert not (tmp_path / "runs").exists()


# eval_rewards/accuracies by learning rate, whatever the tiny model computes: the trials' order decides the prunes
ACCURACY = {0.001: 0.2, 0.002: 0.6, 0.003: 0.4, 0.004: 0.8}


def test_a_sweep_prunes_trials_behind_the_median_and_writes_the_best_recipe(tmp_path, monkeypatch):
    from align.stages import engine

    log = engine.AlignTrainer.log

    def scripted(self, logs, start_time=None):
        if "eval_loss" in logs:
            logs["eval_rewards/accuracies"] = ACCURACY[round(self.args.learning_rate, 6)]
        return log(self, logs, start_time)

    monkeypatch.setattr(engine.AlignTrainer, "log", scripted)
    path = _files(tmp_path, "space: {stages.dpo.train.lr: [0.001, 0.002, 0.003, 0.004]}\n"
                  "objective: {metric: stages.dpo.metrics.eval_rewards/accuracies}\n" + TRIAL
                  + "pruning: {stage: dpo, metric: eval_rewards/accuracies, startup_trials: 1}\n"
                  "sampler: {type: grid, seed: 3}\ntrials: 4\n")
    sweep = Sweep(load_sweep(path), str(tmp_path / "tiny.yaml"), [])
    result = sweep.run()
    study_dir = tmp_path / "runs" / "space"
    rows = list(csvrows(study_dir / "trials.csv"))
    assert [r["state"] for r in rows].count("COMPLETE") + [r["state"] for r in rows].count("PRUNED") == 4
    finished: list[float] = []
    for row in rows:  # in trial order: pruned exactly when behind the median of the trials finished before it
        value = ACCURACY[float(row["stages.dpo.train.lr"])]
        behind = bool(finished) and value < sorted(finished)[(len(finished) - 1) // 2]
        assert (row["state"] == "PRUNED") == behind, rows
        stage = json.loads((study_dir / row["run"] / "dpo" / "stage.json").read_text())
        assert stage["status"] == (PRUNED if behind else "done")
        objective = row["stages.dpo.metrics.eval_rewards/accuracies"]
        assert (objective == "") == behind and (row["pruned_value"] != "") == behind  # no objective when pruned
        if not behind:
            finished.append(value)
    assert any(r["state"] == "PRUNED" for r in rows)
    best = yaml.safe_load(Path(result["best"][0]).read_text())
    assert best["stages"][1]["train"]["lr"] == 0.004 and best["eval"]["tasks"]["path"] == "synthetic:heldout"
    sft = [json.loads(p.read_text()) for p in study_dir.glob("trial_*/sft/stage.json")]
    assert sum("reused_from" not in s for s in sft) == 1  # one SFT for all trials
    assert len(list((tmp_path / "runs" / "space" / ".cache").glob("*/ref_logps_*.pt"))) == 2  # train and eval rows
    assert "<svg" in (study_dir / "report.html").read_text()


def csvrows(path: Path):
    import csv

    with path.open() as f:
        yield from csv.DictReader(f)


def _states(study_dir: Path) -> list[str]:
    with sqlite3.connect(study_dir / "study.db") as db:
        return [s for (s,) in db.execute("SELECT state FROM trials ORDER BY number")]


def _sweep_cmd(path: Path) -> list[str]:
    return [sys.executable, "-m", "align.cli", "sweep", "--space", str(path), "--quiet"]


def test_a_killed_sweep_completes_without_repeating_finished_trials(tmp_path):
    path = _files(tmp_path, "space: {stages.dpo.loss.beta: [0.05, 0.1, 0.3]}\nobjective: {metric: "
                  "stages.dpo.metrics.eval_rewards/accuracies}\n" + TRIAL
                  + "sampler: {type: grid}\ntrials: 3\nheartbeat: {interval: 1, grace: 2}\n",
                  dpo_steps=12, save_steps=2)
    study_dir = tmp_path / "runs" / "space"
    killed = study_dir / "trial_001" / "dpo"
    cmd = _sweep_cmd(path)
    kill_run_after_cmd(cmd, lambda: (killed / "checkpoints" / "checkpoint-4").is_dir())
    first = json.loads((study_dir / "trial_000" / "dpo" / "stage.json").read_text())
    time.sleep(2)  # the killed trial's heartbeat goes stale
    subprocess.run(cmd, env=_repository_first(), check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                   cwd=tmp_path)
    states = _states(study_dir)
    assert states.count("COMPLETE") == 3 and states.count("FAIL") == 1 and "RUNNING" not in states, states
    assert json.loads((study_dir / "trial_000" / "dpo" / "stage.json").read_text()) == first  # not trained again
    resumed = json.loads((killed / "stage.json").read_text())
    assert resumed["status"] == "done" and "/checkpoints/checkpoint-" in resumed["resumed_from"]  # not from scratch
    # trial 2 retried trial 1 in its folder; trial 3 is the third parameter set
    assert sorted(p.name for p in study_dir.glob("trial_*")) == ["trial_000", "trial_001", "trial_003"]


def kill_run_after_cmd(cmd, ready, timeout: float = 240):
    """SIGKILL `cmd` once `ready()` (kill_run_after for a command other than `align run`)."""
    import signal

    proc = subprocess.Popen(cmd, env=_repository_first(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + timeout
    while time.time() < deadline and not ready():
        assert proc.poll() is None, "the sweep ended before it could be killed"
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()


def test_two_sweep_processes_share_the_trials_and_build_the_sft_stage_once(tmp_path):
    path = _files(tmp_path, "space: {stages.dpo.train.lr: {log_uniform: [1.0e-4, 1.0e-2]}}\nobjective: {metric: "
                  "stages.dpo.metrics.eval_rewards/accuracies}\n" + TRIAL + "sampler: {type: random}\ntrials: 4\n")
    procs = [subprocess.Popen(_sweep_cmd(path), env=_repository_first(), stdout=subprocess.DEVNULL,
                              stderr=subprocess.PIPE, cwd=tmp_path) for _ in range(2)]
    for proc in procs:
        assert proc.wait(timeout=240) == 0, proc.stderr.read().decode()[-3000:]
    study_dir = tmp_path / "runs" / "space"
    states = _states(study_dir)
    assert 4 <= states.count("COMPLETE") <= 5 and set(states) == {"COMPLETE"}, states  # one may start as the 4th ends
    sft = [json.loads(p.read_text()) for p in study_dir.glob("trial_*/sft/stage.json")]
    assert len(sft) == len(states) and sum("reused_from" not in s for s in sft) == 1


def test_a_multi_objective_study_writes_a_recipe_per_pareto_trial(tmp_path):
    path = _files(tmp_path, "space: {stages.dpo.loss.beta: {uniform: [0.05, 0.5]}}\nobjective:\n"
                  "  - {metric: stages.dpo.metrics.eval_rewards/margins, direction: maximize}\n"
                  "  - {metric: stages.dpo.metrics.eval_logps/chosen, direction: minimize}\n"
                  + TRIAL + "sampler: {type: random}\ntrials: 3\n")
    result = Sweep(load_sweep(path), str(tmp_path / "tiny.yaml"), []).run()
    rows = list(csvrows(tmp_path / "runs" / "space" / "trials.csv"))
    points = {int(r["trial"]): (float(r["stages.dpo.metrics.eval_rewards/margins"]),
                                float(r["stages.dpo.metrics.eval_logps/chosen"])) for r in rows}

    def dominated(p):
        return any(q != p and q[0] >= p[0] and q[1] <= p[1] for q in points.values())

    front = {n for n, p in points.items() if not dominated(p)}
    assert {t["trial"] for t in result["best_trials"]} == front
    assert sorted(Path(p).name for p in result["best"]) == [f"pareto_trial_{n:03d}.yaml" for n in sorted(front)]
