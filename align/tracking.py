"""Experiment trackers: every stage's logged metrics, under the names and at the steps of its `metrics.jsonl`, in the
trackers a recipe's `tracking.report_to` names (TensorBoard, W&B, MLflow, Trackio), one tracker run per stage,
grouped by the recipe (or a sweep's study), and the evaluation's summary in a run of its own.

One observer class per tracker (`Tracker`, an align.ui.StepObserver), so Trainer stages and the RL loop report alike.
A resumed stage logs each step once: TensorBoard purges the killed run's events after the checkpoint (`purge_step`,
which its readers honour), and the other trackers reopen the stage's run (its id is kept in the stage folder's
`tracking.json`) and are sent only the steps the killed run had not sent; align's resume redoes those steps exactly.
Each tracker's package is imported when a stage starts, so none is needed unless a recipe names it
(`pip install align[track]` installs them all). Nothing leaves the machine unless the tracker is set up to send it:
TensorBoard writes event files into the stage folder, W&B honours `WANDB_MODE=offline`, MLflow writes where
`MLFLOW_TRACKING_URI` points, Trackio into its local database under `TRACKIO_DIR` (read when trackio is first imported).
"""

from __future__ import annotations

import contextlib
import importlib.util
import io
import json
import secrets
import time
from pathlib import Path

from align.errors import AlignError
from align.run_folder import TENSORBOARD_DIR, TRACKING_FILE, StageFolder, read_json, write_json
from align.ui import StepObserver


def default_trackers() -> list[str]:
    """What a recipe without `tracking.report_to` reports to: TensorBoard event files where tensorboard is installed."""
    return ["tensorboard"] if importlib.util.find_spec("tensorboard") else []


def numbers(metrics: dict) -> dict[str, float]:
    return {k: float(v) for k, v in metrics.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}


class Tracker(StepObserver):
    """One stage's run in one tracker. `sent_through`: the last step an earlier, killed run of the stage logged (0 for
    a new stage); `config`: the stage's settings, shown beside its curves."""

    package = ""

    def __init__(self, folder: Path, run: str, group: str, project: str, config: dict, sent_through: int = 0):
        if importlib.util.find_spec(self.package) is None:
            raise AlignError(f"tracking.report_to names {self.name()}, but its package '{self.package}' is not "
                             "installed: pip install 'align[track]' (or the package alone)")
        self.folder, self.run, self.group, self.project = folder, run, group, project
        self.config, self.sent_through = config, sent_through

    @classmethod
    def name(cls) -> str:
        return next(k for k, v in TRACKERS.items() if v is cls)

    def begin(self, step: int, total: int) -> None:
        self.open(step)

    def logged(self, step: int, metrics: dict) -> None:
        if step > self.sent_through:
            self.log(step, numbers(metrics))

    def end(self) -> None:
        self.close()

    def saved_id(self) -> str | None:
        return read_json(self.folder / TRACKING_FILE).get(self.name())

    def save_id(self, run_id: str) -> None:
        write_json(self.folder / TRACKING_FILE, {**read_json(self.folder / TRACKING_FILE), self.name(): run_id})

    def open(self, step: int) -> None:
        raise NotImplementedError

    def log(self, step: int, metrics: dict[str, float]) -> None:
        raise NotImplementedError

    def close(self) -> None:
        raise NotImplementedError


class TensorBoard(Tracker):
    """Event files in `<stage>/tensorboard/`: `tensorboard --logdir runs` shows every run's stages."""

    package = "tensorboard"

    def open(self, step: int) -> None:
        from torch.utils.tensorboard import SummaryWriter

        # purge_step: readers drop what a killed run wrote at this step or later, which this run writes again
        self.writer = SummaryWriter(str(self.folder / TENSORBOARD_DIR), purge_step=step + 1 if step else None)
        if not step:
            self.writer.add_text("config", f"```\n{json.dumps(self.config, indent=2, default=str)}\n```", 0)

    def logged(self, step: int, metrics: dict) -> None:
        self.log(step, numbers(metrics))  # the purge already dropped the killed run's later events

    def log(self, step: int, metrics: dict[str, float]) -> None:
        for key, value in metrics.items():
            self.writer.add_scalar(key, value, step)

    def close(self) -> None:
        self.writer.close()


class WandB(Tracker):
    package = "wandb"

    def open(self, step: int) -> None:
        import wandb

        run_id = self.saved_id() or secrets.token_hex(4)
        self.save_id(run_id)
        self.handle = wandb.init(project=self.project, name=self.run, group=self.group, id=run_id, resume="allow",
                                 dir=str(self.folder), config=self.config, reinit="create_new")

    def log(self, step: int, metrics: dict[str, float]) -> None:
        self.handle.log(metrics, step=step)

    def close(self) -> None:
        self.handle.finish()


class MLflow(Tracker):
    package = "mlflow"

    def open(self, step: int) -> None:
        from mlflow import MlflowClient

        self.client = MlflowClient()
        run_id = self.saved_id()
        if run_id is None:
            experiment = self.client.get_experiment_by_name(self.project)
            experiment_id = (experiment.experiment_id if experiment else self.client.create_experiment(self.project))
            run_id = self.client.create_run(experiment_id, run_name=self.run, tags={"group": self.group}).info.run_id
            for key, value in flatten(self.config).items():
                self.client.log_param(run_id, key, value)
            self.save_id(run_id)
        else:
            self.client.update_run(run_id, status="RUNNING")
        self.run_id = run_id

    def log(self, step: int, metrics: dict[str, float]) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        self.client.log_batch(self.run_id, metrics=[Metric(k, v, now, step) for k, v in metrics.items()])

    def close(self) -> None:
        self.client.set_terminated(self.run_id)


class Trackio(Tracker):
    """Trackio's local database (`trackio show` opens it; `trackio sync` sends a project to a Space). Its logging
    thread writes a batch at a time, so a SIGKILL loses the last steps sent: a resumed stage asks the database
    what the run holds and sends it the rest of the steps before its checkpoint from metrics.jsonl."""

    package = "trackio"

    def open(self, step: int) -> None:
        import trackio
        from trackio.sqlite_storage import SQLiteStorage

        saved = self.saved_id()
        stored = SQLiteStorage.get_max_step_for_run(self.project, run_id=saved) if saved else None
        # Trackio resumes a run by name; a new stage starts a new run even where an earlier run folder used the name
        with contextlib.redirect_stdout(io.StringIO()):  # its notes would break the progress bars' lines
            self.handle = trackio.init(project=self.project, name=self.run, group=self.group, config=self.config,
                                       resume="never" if stored is None else "must", auto_log_cpu=False,
                                       auto_log_gpu=False)
        if stored is not None and self.handle.id != saved:
            self.close()
            raise AlignError(f"Trackio's latest run named '{self.run}' in project '{self.project}' is not this "
                             f"stage's run ({saved}, in {self.folder / TRACKING_FILE}): a later run took the name. "
                             "Give the recipe another name or tracking.project to resume it.")
        self.save_id(self.handle.id)
        self.sent_through = stored or 0
        for record in StageFolder(self.folder).metrics.records():
            if self.sent_through < record["step"] <= step:
                self.log(record["step"], numbers({k: v for k, v in record.items() if k != "step"}))

    def log(self, step: int, metrics: dict[str, float]) -> None:
        self.handle.log(metrics, step=step)

    def close(self) -> None:
        with contextlib.redirect_stdout(io.StringIO()):
            self.handle.finish()


TRACKERS: dict[str, type[Tracker]] = {"tensorboard": TensorBoard, "wandb": WandB, "mlflow": MLflow,
                                      "trackio": Trackio}


def flatten(config: dict, prefix: str = "") -> dict[str, str]:
    """`{"train": {"lr": 1e-4}}` -> `{"train.lr": "0.0001"}`: the parameters of trackers that take flat strings."""
    out: dict[str, str] = {}
    for key, value in config.items():
        if isinstance(value, dict):
            out.update(flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = str(value)[:500]  # MLflow's limit on a parameter's value
    return out


def stage_trackers(names: list[str], folder: Path, run: str, group: str, project: str, config: dict,
                   sent_through: int) -> list[Tracker]:
    return [TRACKERS[name](folder, run, group, project, config, sent_through) for name in names]


def report_summary(names: list[str], folder: Path, group: str, project: str, summary: dict[str, float]) -> None:
    """The evaluation's numbers (`<stage>/<metric>`) at step 0 of a run of their own, `<group>/eval`."""
    for tracker in stage_trackers(names, folder, f"{group}/eval", group, project, {}, 0):
        tracker.begin(0, 0)
        tracker.log(0, summary)
        tracker.end()
