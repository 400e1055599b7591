"""Rewards: what PPO optimises, what eval's judge and the collection's AI judge score replies with.

- `Reward` (`base`): the one interface, `score(prompts, responses, rules) -> Tensor[B]`, with `name`,
  `kind` and `needs_rules`. `RuleReward` (`rule`) checks responses by rules in a YAML file;
  `LearnedReward` (`learned`) is an rm stage's adapter and score head on the shared base.
- Sources (`sources`): `{model: ...}` and `{rule: ...}` in a recipe, one dataclass each; `load_reward`
  turns a source, or a string naming one, into its `Reward`.
- Reward cards: rule files shipped as package data in `align/rewards/cards/`, so an installed align
  finds them; `cards()` lists them, and a recipe or a judge names one by its name (`synthetic_tasks`).

Importing this package does not import torch, so recipes validate quickly.
"""

from align.rewards.base import Reward
from align.rewards.sources import (
                                   REWARD_SOURCES,
                                   ModelSource,
                                   RewardSource,
                                   RuleSource,
                                   cards,
                                   load_reward,
                                   register_source,
                                   reward_source,
                                   rule_file,
)

__all__ = ["REWARD_SOURCES", "ModelSource", "Reward", "RewardSource", "RuleSource", "cards", "load_reward",
           "register_source", "reward_source", "rule_file"]
