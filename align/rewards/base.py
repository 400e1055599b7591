"""The one interface every reward implements: PPO, eval's judge and the collection's AI judge call only this."""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # torch is only named here: recipes validate without importing it
    import torch


class Reward(ABC):
    """Scores responses to prompts, one number each; higher is better."""

    name: str  # what metrics and reports call it: a card's name, an rm stage's name
    kind: str  # what reports say it is: "rule" or "learned"
    needs_rules: bool  # True where it checks answers against each prompt's rule, so every prompt needs one

    @abstractmethod
    def score(self, prompts: list[list[dict]], responses: list[str], rules: list[dict] | None = None) -> torch.Tensor:
        """[B] rewards (on the CPU) of `responses` to `prompts`, whose rules are `rules` ({} for none)."""

    def score_sampled(self, prompts: list[list[dict]], responses: list[str], rules: list[dict] | None,
                      input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """[B] rewards of sampled responses, given also as the token ids that were sampled (prompt + response,
        [B, T], padded on either side): a reward that reads tokens scores those rather than a re-encoding."""
        return self.score(prompts, responses, rules)
