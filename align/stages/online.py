"""The loop of every online RL stage (PPO now; GRPO and RLOO join it): each step draws a batch of prompts, the
algorithm makes experience from them (rollout, score, advantages) and updates on it. The loop owns what all such
stages share: the prompt order, checkpoints and resume, and reporting each step to the same observers
(`align.ui.StepObserver`) that the Trainer stages report to: the progress bar and the stage's metrics log.

Checkpoints (`checkpoints/step-N/state.pt`, written to a temporary folder and renamed, so a kill never leaves a half
one) hold the algorithm's state, every RNG and the step: a resumed run continues exactly where the checkpoint was
taken, with the same prompt order, and logs each step once. Only what the algorithm trains is saved, where
accelerate's save_state would also write the whole quantized base.

Under a launcher (align.distributed; grpo trains so, ppo does not) every process runs the loop over the same batches
and the algorithm shares out the work; the main process alone writes the checkpoints, with every process's RNGs, and
the metrics log, and tells the observers.
"""

from __future__ import annotations

import random
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np
import torch

from align import distributed
from align.errors import require
from align.method_configs import ReplayConfig, ReplayOutConfig
from align.models.generation import Decoding, generate
from align.rewards import RewardSource
from align.rewards.weighted import WeightedRewards
from align.run_folder import StageFolder
from align.settings import EarlyStoppingConfig, StageConfig
from align.stages.early_stopping import EarlyStopping
from align.ui import StepObserver, work_progress

KEPT_CHECKPOINTS = 2


@dataclass(kw_only=True)
class OnlineStageConfig(StageConfig):
    """What every online RL stage's config has: the rewards it samples for, a KL reference, replay of SFT data."""

    reference: str | None = None  # the frozen KL reference adapter, e.g. ${sft.adapter}; None = `init`
    rewards: list[RewardSource]  # required, summed with their weights: {model: ...} or {rule: ...} (align.rewards)
    replay: ReplayConfig | None = None  # SFT data mixed into the policy loss, InstructGPT's "ptx" term
    replay_out: ReplayOutConfig | None = None  # it trains on prompts: it has no answers to keep

    def __post_init__(self):
        super().__post_init__()
        require(bool(self.rewards), "rewards", f"a {self.kind} stage needs at least one reward (model: or rule:)")
        require(self.replay_out is None, "replay_out",
                f"a {self.kind} stage trains on prompts: it has no answers to keep")


class OnlineAlgorithm(Protocol):
    batch_size: int  # prompts per step

    def experience(self, prompts: list[int], step: int) -> tuple[object, dict[str, float]]:
        """Generate from the prompts at these indices, score the replies and compute their advantages: the rollout,
        and the step's metrics so far."""

    def update(self, rollout, step: int) -> dict[str, float]:
        """Train on the rollout; its metrics."""

    def state_dict(self) -> dict:
        """Everything but the RNGs that a resumed run needs to continue as this one would."""

    def load_state_dict(self, state: dict) -> None: ...


def checkpoints(stage_dir: Path) -> list[Path]:
    """The complete checkpoints, oldest first: a kill mid-save leaves `step-N.tmp`, which is not one."""
    found = [p for p in (stage_dir / "checkpoints").glob("step-*")
             if p.name.removeprefix("step-").isdigit() and (p / "state.pt").is_file()]
    return sorted(found, key=lambda p: int(p.name.removeprefix("step-")))


def save_checkpoint(stage_dir: Path, step: int, algorithm: OnlineAlgorithm, keep: int | None = None) -> None:
    """Save step `step`; of the older checkpoints keep the last `KEPT_CHECKPOINTS` - 1 and that of step `keep` (early
    stopping's best)."""
    rng = distributed.gather({  # each process's, in rank order
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
        "python": random.getstate(),
        "numpy": np.random.get_state(),
    })
    if not distributed.is_main():
        return
    state = {"step": step, **algorithm.state_dict(), "rng": rng}
    final = stage_dir / "checkpoints" / f"step-{step}"
    tmp = final.with_name(final.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    torch.save(state, tmp / "state.pt")
    tmp.rename(final)
    for old in checkpoints(stage_dir)[:-KEPT_CHECKPOINTS]:
        if old.name != f"step-{keep}":
            shutil.rmtree(old)


def load_checkpoint(path: Path, algorithm: OnlineAlgorithm) -> int:
    state = torch.load(path / "state.pt", weights_only=False)  # our own file: it holds Python RNG state
    algorithm.load_state_dict(state)
    per_process = state["rng"] if isinstance(state["rng"], list) else [state["rng"]]  # older: one dict
    if distributed.rank() < len(per_process):  # a process the checkpoint did not have keeps its own seeded RNGs
        rng = per_process[distributed.rank()]
        torch.set_rng_state(rng["torch"])
        if rng["cuda"] is not None:
            torch.cuda.set_rng_state_all(rng["cuda"])
        random.setstate(rng["python"])
        np.random.set_state(rng["numpy"])
    return state["step"]


@dataclass
class Evaluation:
    """The held-out evaluation inside the loop: `evaluate()` every `every` steps, its metrics logged with an `eval_`
    prefix at that step; with `early_stopping`, the stage stops when they stop improving
    (align.stages.early_stopping)."""

    evaluate: Callable[[], dict[str, float]]
    every: int
    early_stopping: EarlyStoppingConfig | None = None


def run_online(algorithm: OnlineAlgorithm, stage_dir: Path, prompts: int, steps: int, seed: int, save_steps: int,
               observers: list[StepObserver], evaluation: Evaluation | None = None
               ) -> tuple[dict[str, float], Path | None, EarlyStopping | None, int]:
    """Run `steps` steps over `prompts` prompts (resuming from the stage's last checkpoint): the last value of each
    metric, the checkpoint resumed from, the early stopping (None without), and the last step taken. A stage that
    stopped early ends with its best evaluation's policy. Only the main process tells the `observers`."""
    resumed = distributed.broadcast(checkpoints(stage_dir)[-1] if checkpoints(stage_dir) else None)
    start = load_checkpoint(resumed, algorithm) if resumed else 0
    records = []
    if distributed.is_main():
        metrics_log = StageFolder(stage_dir).metrics
        metrics_log.keep_until(start)
        records = metrics_log.records()
        observers = [metrics_log, *observers]
    else:
        observers = []
    stopping = None
    if evaluation and evaluation.early_stopping:  # every process decides alike, from the main process's log
        stopping = EarlyStopping.from_log(evaluation.early_stopping, distributed.broadcast(records))
    per_epoch = prompts // algorithm.batch_size
    last: dict[str, float] = {}
    for observer in observers:
        observer.begin(start, steps)
    done = start  # the steps taken
    try:
        for step in range(start, steps):
            if stopping and stopping.should_stop:  # killed after it stopped, before the stage was recorded done
                break
            # The prompt order depends only on the seed and the step, so a resumed run sees the same batches.
            order = torch.randperm(prompts, generator=torch.Generator().manual_seed(seed + step // per_epoch))
            batch = order[(step % per_epoch) * algorithm.batch_size :][: algorithm.batch_size].tolist()
            rollout, metrics = algorithm.experience(batch, step)
            metrics.update(algorithm.update(rollout, step))
            evaluated = evaluation is not None and (step + 1) % evaluation.every == 0
            if evaluated:
                metrics.update({f"eval_{k}": v for k, v in evaluation.evaluate().items()})
            for observer in observers:
                observer.logged(step + 1, metrics)
                observer.stepped(step + 1)
            last.update(metrics)
            done = step + 1
            if stopping:
                stopping.record(step + 1, metrics)
            best = stopping.best() if stopping else None
            if (step + 1) % save_steps == 0 or step + 1 == steps or (evaluated and stopping):
                save_checkpoint(stage_dir, step + 1, algorithm, keep=best[0] if best else None)
            if stopping and stopping.should_stop:
                break
    finally:
        for observer in observers:
            observer.end()
    best = stopping.best() if stopping else None
    if best and best[0] != done:  # the rest of the checkpoint (optimizer, RNGs) no longer matters: training is over
        load_checkpoint(stage_dir / "checkpoints" / f"step-{best[0]}", algorithm)
    return last, resumed, stopping, done


def train_online(algorithm: OnlineAlgorithm, stage, ctx, prompts: int, steps: int, seed: int,
                 evaluate: Callable[[], dict[str, float]] | None
                 ) -> tuple[dict, Path | None, EarlyStopping | None, int]:
    """An online stage's course: the starting policy's held-out evaluation (`eval_init_*`, the baseline to beat), the
    loop (evaluating every `train.eval_steps` steps, stopping early where the recipe asks), and the final policy's
    (`eval_*`: the best evaluation's policy where early stopping chose one). `run_online`'s results, the metrics
    first."""
    train, metrics = stage.train, {}
    if evaluate:
        metrics.update({f"eval_init_{k}": v for k, v in evaluate().items()})
    evaluation = Evaluation(evaluate, train.eval_steps, train.early_stopping) if evaluate and train.eval_steps else None
    trained, resumed, stopping, done = run_online(algorithm, ctx.stage_dir, prompts, steps, seed, train.save_steps,
                                                  ctx.observers(stage.name), evaluation)
    metrics.update(trained, global_step=done)
    if evaluate:
        metrics.update({f"eval_{k}": v for k, v in evaluate().items()})
    if stopping and stopping.best():
        metrics["best_step"] = stopping.best()[0]
    return metrics, resumed, stopping, done


def heldout_rewards(model, rewards: WeightedRewards, tokenizer, loaded, max_new_tokens: int, batch_size: int,
                    quiet: bool) -> dict[str, float]:
    """Mean reward of the active policy's greedy replies to held-out prompts, per reward and weighted in total. Under a
    launcher each process answers every W-th prompt and the processes' sums are added up."""
    examples = loaded.examples[distributed.rank() :: distributed.world_size()]
    with work_progress("held-out replies", len(examples), quiet or not distributed.is_main()) as advance:
        replies = generate(model, tokenizer, [ex.prompt for ex in examples], Decoding(max_new_tokens), batch_size,
                           on_batch=advance)
    texts = [r.text for r in replies]
    sums = {label: float(reward.score([ex.prompt for ex in examples], texts, [ex.rule for ex in examples]).sum())
            for reward, _, label in rewards}
    parts = distributed.gather((sums, len(examples)))
    count = sum(n for _, n in parts)
    total, out = 0.0, {}
    for _, weight, label in rewards:
        part = sum(shares[label] for shares, _ in parts) / count
        out[f"reward/{label}"] = part
        total += weight * part
    out["objective/scores"] = total
    return out


def init_and_final(section: str, metrics: dict) -> dict:
    """{section: {"init", "final"}}: the held-out rewards of the starting policy and of the trained one, for the
    run's summary."""
    if "eval_objective/scores" not in metrics:
        return {}
    return {section: {
        "init": {k.removeprefix("eval_init_"): v for k, v in metrics.items() if k.startswith("eval_init_")},
        "final": {k.removeprefix("eval_"): v for k, v in metrics.items()
                  if k.startswith("eval_") and not k.startswith("eval_init_")},
    }}
