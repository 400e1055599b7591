"""Preference losses as objects in one registry (torch only).

A preference loss scores groups of K responses per prompt, laid out [B, K] with a `mask` for groups smaller than K
and `scores` that order them (higher = better; a pair is a group of two, chosen 1 and rejected 0). Each loss says
what it needs and how it ranks responses:

- `needs_reference` (of `ImplicitReward`, which KTO's loss also is): whether `ref_logps` must be given (the stages
  then load and cache a frozen reference);
- `mean_logps`: whether its sequence log-probs are averaged over answer tokens instead of summed;
- `implicit_reward(logps, ref_logps, lengths)`: what it ranks responses by, beta * (log pi - log ref) or, without a
  reference, beta * log pi; `dpo`, `rank` and eval's implicit-reward accuracy all call this one method;
- `listwise`: whether it trains on whole rankings (`rank` stages) or on each group's best against its worst
  (`dpo` stages);
- `nll_weight`: the weight of an NLL term on each group's best response (RPO's alpha, ORPO's SFT term, PRO's and
  RRHF's own), of which `added_nll_weight` is the part the training stage adds to `loss`.

A new loss is one subclass registered with `@register`: its name becomes a value the recipe's `loss.type` accepts.
The built-in ones live next to their equations, in `align.losses.dpo` (pairwise) and `align.losses.rank` (listwise).
"""

from __future__ import annotations

import dataclasses
from abc import ABC, abstractmethod
from typing import ClassVar

import torch

LOSSES: dict[str, type[PreferenceLoss]] = {}


@dataclasses.dataclass(frozen=True, kw_only=True)
class ImplicitReward:
    """What a preference-trained policy rewards, read off its log-probs (DPO Sec. 5): beta * (log pi - log ref), or
    beta * log pi for a reference-free loss, on log-probs averaged over answer tokens where the loss averages them."""

    beta: float = 0.1

    needs_reference: ClassVar[bool] = True
    mean_logps: ClassVar[bool] = False

    def __post_init__(self):
        if self.beta <= 0:
            raise ValueError(f"beta must be > 0, got {self.beta}")

    def sequence_logps(self, logps: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """[B, K] summed log-probs, as averages over answer tokens where the loss uses those."""
        return logps / lengths.clamp(min=1) if self.mean_logps else logps

    def implicit_reward(self, logps: torch.Tensor, ref_logps: torch.Tensor | None,
                        lengths: torch.Tensor) -> torch.Tensor:
        """[B, K] what the loss ranks responses by (logps, ref_logps: summed over tokens; lengths: token counts)."""
        policy = self.sequence_logps(logps, lengths)
        if not self.needs_reference:
            return self.beta * policy
        return self.beta * (policy - self.sequence_logps(ref_logps, lengths))


@dataclasses.dataclass(frozen=True, kw_only=True)
class PreferenceLoss(ImplicitReward, ABC):
    """A registered loss over groups of scored responses: a `dpo` stage's (pairwise) or a `rank` stage's (listwise)."""

    nll_weight: float | None = None  # weight of the best response's NLL; None = the method's own (`own_nll_weight`)

    name: ClassVar[str]
    listwise: ClassVar[bool]
    own_nll_weight: ClassVar[float] = 0.0  # the NLL weight that is part of the method's definition
    nll_in_loss: ClassVar[bool] = False  # the method's `losses` already holds the NLL term (PRO, RRHF)

    @property
    def nll(self) -> float:
        """The NLL term's weight: the one asked for, else the method's own."""
        return self.own_nll_weight if self.nll_weight is None else self.nll_weight

    @property
    def added_nll_weight(self) -> float:
        """The NLL weight the training stage adds to `losses` (0 where the loss holds the term itself)."""
        return 0.0 if self.nll_in_loss else self.nll

    @abstractmethod
    def losses(self, logps: torch.Tensor, ref_logps: torch.Tensor | None, lengths: torch.Tensor, scores: torch.Tensor,
               mask: torch.Tensor) -> tuple[torch.Tensor, dict[str, float]]:
        """([B] per-group loss, the loss's own batch metrics) from [B, K] inputs."""


def register(cls: type[PreferenceLoss]) -> type[PreferenceLoss]:
    """Make `cls` a value of `loss.type`: of dpo stages when it is pairwise, of rank stages when listwise."""
    if cls.name in LOSSES:
        raise ValueError(f"a preference loss called '{cls.name}' is registered already")
    LOSSES[cls.name] = cls
    return cls


def names(listwise: bool) -> list[str]:
    """The registered losses of a `rank` stage (listwise) or of a `dpo` stage (pairwise)."""
    return [name for name, cls in LOSSES.items() if cls.listwise == listwise]


def build(name: str, **settings) -> PreferenceLoss:
    """The loss `name` with those of `settings` that it has (a stage's loss section holds every loss's settings)."""
    cls = LOSSES[name]
    own = {f.name for f in dataclasses.fields(cls)}
    return cls(**{key: value for key, value in settings.items() if key in own})


def best_and_worst(scores: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """[B] index of each group's first best and last worst response (scores, mask: [B, K])."""
    big = torch.finfo(scores.dtype).max
    best = scores.masked_fill(~mask, -big).argmax(1)  # argmax gives the first of equal maxima
    worst = scores.shape[1] - 1 - scores.masked_fill(~mask, big).flip(1).argmin(1)
    return best, worst


def pick(values: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    return values.gather(1, index[:, None]).squeeze(1)  # [B, K] -> [B]
