"""Early stopping, for every stage kind: the stage evaluates its held-out metric every `train.eval_steps` steps and
checkpoints there, stops once `patience` evaluations in a row brought no improvement of more than `min_delta` on the
best so far, and hands on the adapter of its best evaluation, read back from that evaluation's checkpoint (which the
checkpoint rotation keeps).

What it decides from is the stage's own log of evaluations: a resumed stage rebuilds it from the metrics it logged up
to its checkpoint, so a kill anywhere changes nothing. The Trainer stages use it through `StopWhenNoBetter` (a
TrainerCallback), the online loop (align.stages.online) directly.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

from transformers import TrainerCallback

from align.settings import EarlyStoppingConfig


@dataclass
class EarlyStopping:
    cfg: EarlyStoppingConfig
    evaluations: list[tuple[int, float]] = field(default_factory=list)  # (step, value), in order

    @classmethod
    def from_log(cls, cfg: EarlyStoppingConfig, records: list[dict]) -> EarlyStopping:
        """From a stage's metrics.jsonl records (a resumed stage's: up to its checkpoint)."""
        stopping = cls(cfg)
        for record in records:
            stopping.record(record["step"], record)
        return stopping

    def record(self, step: int, metrics: dict) -> None:
        if self.cfg.metric in metrics:
            self.evaluations.append((step, float(metrics[self.cfg.metric])))

    def _improves(self, value: float, best: float) -> bool:
        if math.isnan(best):
            return not math.isnan(value)
        if self.cfg.mode == "max":
            return value > best + self.cfg.min_delta
        return value < best - self.cfg.min_delta

    def best(self) -> tuple[int, float] | None:
        """(step, value) of the best evaluation so far; None before the first."""
        best = None
        for step, value in self.evaluations:
            if best is None or self._improves(value, best[1]):
                best = (step, value)
        return best

    def waited(self) -> int:
        """Evaluations since the best one."""
        best = self.best()
        return 0 if best is None else sum(step > best[0] for step, _ in self.evaluations)

    @property
    def should_stop(self) -> bool:
        return self.waited() >= self.cfg.patience

    def report(self, last_step: int) -> dict:
        """What stage.json records: the best evaluation, and when and why the stage stopped (None: it ran to the
        end)."""
        best = self.best()
        out = {"metric": self.cfg.metric, "mode": self.cfg.mode, "patience": self.cfg.patience,
               "min_delta": self.cfg.min_delta, "evaluations": len(self.evaluations),
               "best_step": best[0] if best else None, "best_value": best[1] if best else None,
               "stopped_at": last_step if self.should_stop else None, "reason": None}
        if self.should_stop:
            out["reason"] = (f"{self.cfg.metric} did not improve on {best[1]:.6g} (step {best[0]}) by more than "
                             f"{self.cfg.min_delta:g} in {self.cfg.patience} evaluation(s) ({self.cfg.mode} is better)")
        return out


class StopWhenNoBetter(TrainerCallback):
    """`EarlyStopping` in the Trainer: every evaluation is recorded and saved as a checkpoint, the best evaluation's
    checkpoint is kept out of the rotation (as the Trainer keeps its own best model's), and training stops when the
    metric has stopped improving. The Trainer calls it in every process, with the metrics of all of them."""

    def __init__(self, stopping: EarlyStopping):
        self.stopping = stopping

    def on_step_end(self, args, state, control, **kwargs):
        if control.should_evaluate:  # a checkpoint that closes a logging window, as every checkpoint does
            control.should_save = control.should_log = True

    def on_evaluate(self, args, state, control, metrics=None, **kwargs):
        self.stopping.record(state.global_step, metrics or {})
        best = self.stopping.best()
        if best is not None:
            state.best_model_checkpoint = str(Path(args.output_dir) / f"checkpoint-{best[0]}")
        if self.stopping.should_stop:
            control.should_training_stop = True
