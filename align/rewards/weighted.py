"""A stage's rewards: several sources, each with its weight, summed (PPO's and GRPO's `rewards:`)."""

from __future__ import annotations

from align.errors import DataError
from align.rewards.base import Reward
from align.rewards.sources import RewardSource, load_reward

WeightedRewards = list[tuple[Reward, float, str]]  # (reward, weight, label such as "rule:synthetic_tasks")


def load_weighted(sources: list[RewardSource], model, tokenizer, lengths: tuple[int, int]) -> WeightedRewards:
    """Each source's reward (a learned one as the frozen adapter `reward<i>` on `model`), weight and label."""
    rewards = []
    for i, source in enumerate(sources):
        reward = load_reward(source, model, tokenizer, f"reward{i}", lengths)
        rewards.append((reward, source.weight, f"{source.key}:{reward.name}"))
    return rewards


def require_rules(rewards: WeightedRewards, loaded) -> None:
    """Every prompt of `loaded` has a rule where a reward checks answers against one."""
    if any(reward.needs_rules for reward, _, _ in rewards):
        for row, ex in enumerate(loaded.examples, 1):
            if not ex.rule:
                raise DataError("has no 'rule', which a rule reward with a 'task' check needs",
                                file=loaded.source, row=row, field="rule")
