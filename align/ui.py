"""What a person sees: one rich progress bar per stage, and summary tables at the end."""

from __future__ import annotations

import logging
from contextlib import contextmanager
from pathlib import Path

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table

console = Console(stderr=True)


class StepObserver:
    """What a training loop tells those who watch it, whoever runs the loop (the Trainer, through
    align.stages.engine's callback, or align.stages.online): where it starts and how many steps it runs, each logged
    step's metrics, each finished step, and its end."""

    def begin(self, step: int, total: int) -> None:
        pass

    def logged(self, step: int, metrics: dict) -> None:
        pass

    def stepped(self, step: int) -> None:
        pass

    def end(self) -> None:
        pass


class StageProgress(StepObserver):
    """A bar per stage showing step, loss, reward margin (preference stages) or score and KL (PPO) and
    ETA; plain log lines instead when `quiet` (for CI logs and files)."""

    def __init__(self, stage_name: str, quiet: bool = False):
        self.stage_name, self.quiet = stage_name, quiet
        self.progress: Progress | None = None
        self.task = None
        self.total = 0

    def begin(self, step: int, total: int) -> None:
        self.total = total
        if self.quiet:
            return
        self.progress = Progress(
            TextColumn("[bold]{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("{task.fields[info]}"),
            TimeElapsedColumn(),
            TextColumn("eta"),
            TimeRemainingColumn(),
            console=console,
        )
        self.progress.start()
        self.task = self.progress.add_task(self.stage_name, total=total, completed=step, info="")

    def stepped(self, step: int) -> None:
        if self.progress is not None:
            self.progress.update(self.task, completed=step)

    def logged(self, step: int, logs: dict) -> None:
        parts = [f"loss {logs['loss']:.4f}"] if "loss" in logs else []
        if "rewards/margins" in logs:
            parts.append(f"margin {logs['rewards/margins']:+.3f}")
        if "rank/kendall_tau" in logs and "rewards/margins" not in logs:  # rank (dpo shows its margin)
            parts.append(f"tau {logs['rank/kendall_tau']:+.3f}")
        if "objective/scores" in logs:
            parts.append(f"score {logs['objective/scores']:+.3f} kl {logs['objective/kl']:.2f}")
        if "frac_reward_zero_std" in logs:  # grpo
            parts.append(f"reward {logs['reward']:.3f} tied {logs['frac_reward_zero_std']:.2f}")
        if "eval_rewards/accuracies" in logs:
            parts.append(f"eval acc {logs['eval_rewards/accuracies']:.2f}")
        if "eval_rank/kendall_tau" in logs:
            parts.append(f"eval tau {logs['eval_rank/kendall_tau']:+.2f}")
        if not parts:
            return
        if self.progress is not None:
            self.progress.update(self.task, info=" ".join(parts))
        else:
            logging.getLogger("align").info("%s step %d/%d %s", self.stage_name, step, self.total, " ".join(parts))

    def end(self) -> None:
        if self.progress is not None:
            self.progress.stop()
            self.progress = None

    @contextmanager
    def subtask(self, description: str, total: int):
        """A second bar under the stage's while training runs (rich shows one live display at a time), else a bar of
        its own; yields `advance(n=1)`."""
        if self.progress is None:
            with work_progress(f"{self.stage_name} {description}", total, self.quiet) as advance:
                yield advance
            return
        task = self.progress.add_task(f"  {description}", total=total, info="")
        try:
            yield lambda n=1: self.progress.advance(task, n)
        finally:
            self.progress.remove_task(task)


def _fmt(value) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.4f}" if abs(value) < 100 else f"{value:.1f}"
    return str(value)


def _heldout_cell(metrics: dict) -> str:
    tau = f", tau {metrics['eval_rank/kendall_tau']:+.2f}" if "eval_rank/kendall_tau" in metrics else ""
    if "eval_rewards/accuracies" in metrics:  # dpo
        return (f"reward acc {metrics['eval_rewards/accuracies']:.2f}, "
                f"margin {metrics['eval_rewards/margins']:+.2f}{tau}")
    if tau:  # rank
        return f"rank acc {metrics['eval_rank/accuracy']:.2f}{tau}"
    if "eval_accuracy" in metrics:  # rm
        return f"reward acc {metrics['eval_accuracy']:.2f}, margin {metrics['eval_margin']:+.2f}"
    if "labels" in metrics:  # label: what the round's budget bought
        return f"{metrics['labels']} labels from {metrics['selected']} pairs judged"
    if "eval_objective/scores" in metrics:  # ppo: the starting policy's held-out score, then the trained one's
        return f"score {metrics['eval_init_objective/scores']:+.3f} -> {metrics['eval_objective/scores']:+.3f}"
    return f"loss {metrics['eval_loss']:.3f}" if "eval_loss" in metrics else "-"


def stages_table(summary: dict) -> Table:
    table = Table(title=f"run {summary['recipe']}  ({summary['run_dir']})")
    for col in ("stage", "kind", "status", "steps", "time", "train loss", "held-out"):
        table.add_column(col)
    for name, st in summary["stages"].items():
        metrics = st.get("metrics") or {}
        seconds = st.get("seconds")
        table.add_row(
            name,
            st.get("kind", ""),
            st.get("status", ""),
            _fmt(metrics.get("global_step")),
            f"{seconds // 60:.0f}m{seconds % 60:02.0f}s" if seconds is not None else "-",
            _fmt(metrics.get("train_loss")),
            _heldout_cell(metrics),
        )
    return table


def _change(before, after, fmt: str) -> str:
    if before is None or after is None:
        return "-"
    return f"{before:{fmt}} -> {after:{fmt}}"


def forgetting_table(forgetting: dict) -> Table:
    """Per stage: the retention set's NLL and the retention tasks' accuracy of the policy the stage started
    from and of the one it made, and the per-token KL between the two on general prompts."""
    table = Table(title="forgetting: each stage's policy against the one it started from")
    for col in ("stage", "started from", "retention NLL", "retention task accuracy", "KL to start / token"):
        table.add_column(col)
    for name, f in forgetting.items():
        if "skipped" in f:  # a reward model stage
            continue
        before, after = f["before"], f["after"]
        start = f["start"] if f["start"] == "base" else Path(f["start"]).parent.name
        table.add_row(name, start, _change(before.get("retention_nll"), after.get("retention_nll"), ".3f"),
                      _change(before.get("task_accuracy"), after.get("task_accuracy"), ".1%"), _fmt(f["kl_to_start"]))
    return table


@contextmanager
def work_progress(description: str, total: int, quiet: bool = False):
    """A bar for long work outside training (generation, scoring); yields `advance(n=1)`. Quiet: no bar."""
    if quiet:
        yield lambda n=1: None
        return
    columns = (TextColumn(f"[bold]{description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
               TextColumn("eta"), TimeRemainingColumn())
    with Progress(*columns, console=console, transient=False) as progress:
        task = progress.add_task(description, total=total)
        yield lambda n=1: progress.advance(task, n)
