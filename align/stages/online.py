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
from align.settings import StageConfig
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


def save_checkpoint(stage_dir: Path, step: int, algorithm: OnlineAlgorithm) -> None:
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


def run_online(algorithm: OnlineAlgorithm, stage_dir: Path, prompts: int, steps: int, seed: int, save_steps: int,
               observers: list[StepObserver]) -> tuple[dict[str, float], Path | None]:
    """Run `steps` steps over `prompts` prompts (resuming from the stage's last checkpoint); the last value of each
    metric, and the checkpoint resumed from. Only the main process tells the `observers`."""
    resumed = distributed.broadcast(checkpoints(stage_dir)[-1] if checkpoints(stage_dir) else None)
    start = load_checkpoint(resumed, algorithm) if resumed else 0
    if distributed.is_main():
        metrics_log = StageFolder(stage_dir).metrics
        metrics_log.keep_until(start)
        observers = [metrics_log, *observers]
    else:
        observers = []
    per_epoch = prompts // algorithm.batch_size
    last: dict[str, float] = {}
    for observer in observers:
        observer.begin(start, steps)
    try:
        for step in range(start, steps):
            # The prompt order depends only on the seed and the step, so a resumed run sees the same batches.
            order = torch.randperm(prompts, generator=torch.Generator().manual_seed(seed + step // per_epoch))
            batch = order[(step % per_epoch) * algorithm.batch_size :][: algorithm.batch_size].tolist()
            rollout, metrics = algorithm.experience(batch, step)
            metrics.update(algorithm.update(rollout, step))
            for observer in observers:
                observer.logged(step + 1, metrics)
                observer.stepped(step + 1)
            last.update(metrics)
            if (step + 1) % save_steps == 0 or step + 1 == steps:
                save_checkpoint(stage_dir, step + 1, algorithm)
    finally:
        for observer in observers:
            observer.end()
    return last, resumed


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
