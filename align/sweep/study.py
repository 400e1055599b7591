"""`align sweep`: an Optuna study over a recipe's keys, each trial an `align run` of the recipe with the trial's
values, in `<output_dir>/<study>/trial_NNN/`.

The study lives in `<output_dir>/<study>/study.db` (SQLite), so the sweep resumes and several processes share it:
- `trials` counts complete and pruned trials across every process (Optuna's MaxTrialsCallback);
- each running trial beats (Optuna's heartbeat); a trial whose process died is failed once its beat is `grace`
  seconds old and retried with the same parameters (RetryFailedTrialCallback) under the run name of the trial it
  retries, so its stages resume from their checkpoints instead of starting over;
- a stage that trials share (the SFT stage a DPO sweep starts from) has the same identity hash in each, so the first
  trial builds it under a lock and the others reuse it (align.pipeline), and its reference log-probs with it
  (the run's shared cache, align.stages.groups).
Trials run in this process on one loaded base, lent to each in turn (align.models.host).
"""

from __future__ import annotations

import json
import os
import warnings
from dataclasses import asdict
from pathlib import Path

from filelock import FileLock
from rich.markup import escape

from align.config import parse_recipe
from align.errors import AlignError, ConfigError, StagePruned
from align.models.host import ModelHost
from align.pipeline import run_recipe
from align.sweep.space import Pruning, SweepFile
from align.ui import StepObserver, console

STUDY_FILE = "study.db"
RUN_ATTR = "run"  # a trial's user attribute: the run folder it trains in


class TrialPruner(StepObserver):
    """Reports the pruned stage's eval metric to the trial at each eval step, and ends the stage when Optuna's pruner
    says the trial has fallen behind."""

    def __init__(self, trial, pruning: Pruning):
        self.trial, self.pruning = trial, pruning

    def logged(self, step: int, metrics: dict) -> None:
        if self.pruning.metric not in metrics:
            return
        self.trial.report(float(metrics[self.pruning.metric]), step)
        if self.trial.should_prune():
            raise StagePruned(f"{self.pruning.stage}: {self.pruning.metric} = {metrics[self.pruning.metric]:.4g} at "
                              f"step {step} is behind the median of earlier trials")


class Sweep:
    def __init__(self, sweep: SweepFile, recipe_path: str, overrides: list[str], study_name: str | None = None,
                 quiet: bool = False):
        self.sweep, self.recipe_path, self.overrides, self.quiet = sweep, recipe_path, list(overrides), quiet
        try:
            self.recipe_text = Path(recipe_path).read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as e:
            raise ConfigError(f"cannot read the recipe: {e}", file=recipe_path) from None
        self.recipe = parse_recipe(self.recipe_text, recipe_path, self.overrides)
        sweep.check(self.recipe_text, recipe_path, self.overrides)
        self.name = study_name or Path(sweep.path).stem
        self.dir = Path(self.recipe.output_dir) / self.name
        self.hosts: dict[str, ModelHost] = {}

    def trial_recipe(self, params: dict, run_name: str):
        return parse_recipe(self.recipe_text, self.recipe_path, [
            *self.overrides, *self.sweep.overrides(params), f"name={run_name}", f"output_dir={self.dir}",
            f"tracking.group={self.name}"])

    def host(self, recipe) -> ModelHost:
        """One loaded base for every trial with the same model section (a space over LoRA ranks needs several)."""
        key = json.dumps(asdict(recipe.model), sort_keys=True)
        if key not in self.hosts:
            self.hosts = {key: ModelHost(recipe.model)}  # one base in memory at a time
        return self.hosts[key]

    def study(self):
        import optuna
        from optuna.storages import RDBStorage, RetryFailedTrialCallback

        self.dir.mkdir(parents=True, exist_ok=True)
        beat = self.sweep.heartbeat
        # Two processes opening a new study file race to create its tables and stamp its schema version: one at a time
        with FileLock(str(self.dir / "study.lock")):
            storage = RDBStorage(f"sqlite:///{(self.dir / STUDY_FILE).resolve()}", heartbeat_interval=beat.interval,
                                 grace_period=beat.grace, failed_trial_callback=RetryFailedTrialCallback(max_retry=3),
                                 engine_kwargs={"connect_args": {"timeout": 60}})
            study = optuna.create_study(study_name=self.name, storage=storage, load_if_exists=True,
                                        directions=self.sweep.directions, pruner=self.pruner())
        # A second process or a restart draws new random settings, not the first process's again.
        study.sampler = self.sampler(len(study.trials))
        return study

    def sampler(self, offset: int):
        import optuna

        cfg = self.sweep.sampler
        seed = (self.recipe.seed if cfg.seed is None else cfg.seed) + offset
        if cfg.type == "grid":
            return optuna.samplers.GridSampler({p.key: p.grid() for p in self.sweep.space}, seed=seed)
        if cfg.type == "random":
            return optuna.samplers.RandomSampler(seed=seed)
        startup = cfg.startup_trials or max(2, self.sweep.trials // 3)
        return optuna.samplers.TPESampler(n_startup_trials=startup, seed=seed, multivariate=True)

    def pruner(self):
        import optuna

        if self.sweep.pruning is None:
            return optuna.pruners.NopPruner()
        return optuna.pruners.MedianPruner(n_startup_trials=self.sweep.pruning.startup_trials,
                                           n_warmup_steps=self.sweep.pruning.warmup_steps)

    def objective(self, trial):
        import optuna
        from optuna.storages import RetryFailedTrialCallback

        params = {p.key: p.suggest(trial) for p in self.sweep.space}
        frozen = next(t for t in trial.study.get_trials(deepcopy=False) if t.number == trial.number)
        number = RetryFailedTrialCallback.retried_trial_number(frozen)
        run_name = f"trial_{trial.number if number is None else number:03d}"
        trial.set_user_attr(RUN_ATTR, run_name)
        shown = ", ".join(f"{key.split('.')[-1]}={value:.4g}" if isinstance(value, float) else
                          f"{key.split('.')[-1]}={value}" for key, value in params.items())
        console.rule(f"[bold]trial {trial.number}[/] ({run_name}{', retried' if number is not None else ''}): "
                     f"{escape(shown)}")
        recipe = self.trial_recipe(params, run_name)
        pruning = self.sweep.pruning
        watchers = (lambda stage: [TrialPruner(trial, pruning)] if stage.name == pruning.stage else []) \
            if pruning else (lambda stage: [])
        try:
            summary = run_recipe(recipe, quiet=self.quiet, host=self.host(recipe), watchers=watchers)
        except StagePruned as pruned:
            console.print(f"[yellow]pruned[/] {escape(str(pruned))}")
            raise optuna.TrialPruned(str(pruned)) from None
        where = f"{self.dir / run_name / 'summary.json'}"
        values = [o.value(summary, where) for o in self.sweep.objective]
        console.print(f"[green]trial {trial.number}[/]: " + ", ".join(f"{o.metric} = {v:.4g}" for o, v in
                                                                   zip(self.sweep.objective, values)))
        return values if len(values) > 1 else values[0]

    def run(self, trials: int | None = None) -> dict:
        """Run trials until `trials` (default: the sweep file's) are complete or pruned, across every process on the
        study; then the table, the best recipe and the report. Returns what report.write returns."""
        import optuna
        from optuna.study import MaxTrialsCallback
        from optuna.trial import TrialState

        from align.sweep import report

        optuna.logging.set_verbosity(optuna.logging.WARNING)
        # heartbeats, their stale-trial check and retries are all marked experimental, and work as documented
        warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
        total = trials or self.sweep.trials
        study = self.study()
        counted = (TrialState.COMPLETE, TrialState.PRUNED)
        if len(study.get_trials(deepcopy=False, states=counted)) < total:
            study.optimize(self.objective, callbacks=[MaxTrialsCallback(total, states=counted)],
                           catch=(), gc_after_trial=True)
        optuna.storages.fail_stale_trials(study)  # a dead process's trial is not left `running` in the table
        return report.write(self, study)


def sweep_command(space_path: str, recipe_path: str | None, overrides: list[str], trials: int | None,
                  study_name: str | None, quiet: bool) -> dict:
    from align.sweep.space import load_sweep

    sweep = load_sweep(space_path)
    if recipe_path is None:
        if sweep.recipe is None:
            raise AlignError(f"{space_path}: name the recipe to sweep (align sweep RECIPE --space {space_path}), or "
                             "give it in the sweep file's `recipe` key")
        recipe_path = str(Path(space_path).parent / sweep.recipe)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    return Sweep(sweep, recipe_path, overrides, study_name, quiet).run(trials)
