"""Pairwise reward-model loss (torch only).

Bradley-Terry preference model -- Stiennon et al. 2020, "Learning to summarize from human feedback",
https://arxiv.org/abs/2009.01325, Eq. 1; Ouyang et al. 2022, "Training language models to follow
instructions with human feedback" (InstructGPT), https://arxiv.org/abs/2203.02155, Eq. 1:

    L_RM = -log sigma( r(x, y_c) - r(x, y_r) )

Two optional terms, with TRL 1.16's definitions (RewardTrainer.compute_loss):

- margin m (Touvron et al. 2023, "Llama 2", https://arxiv.org/abs/2307.09288, Eq. 2): a per-pair gap the
  chosen reward must clear, larger for pairs the annotators rated as more clearly separated:
      L = -log sigma( r_c - r_r - m )
- reward centering (Eisenstein et al. 2023, "Helping or Herding?", https://arxiv.org/abs/2312.09244,
  TRL's `center_rewards_coefficient` c): the BT loss sees only differences, so the rewards' offset drifts
  freely; a small penalty keeps them near zero mean:
      L += c * mean( (r_c + r_r)^2 )
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def reward_loss(
    chosen: torch.Tensor,  # [B] r(x, y_c), the reward head's scalar for the chosen response
    rejected: torch.Tensor,  # [B] r(x, y_r)
    margin: torch.Tensor | None = None,  # [B] required gap r_c - r_r, or None for none
    center_coef: float = 0.0,
) -> torch.Tensor:
    """Batch-mean Bradley-Terry loss, optionally with margin and reward centering; returns a scalar."""
    diff = chosen - rejected  # [B]
    if margin is not None:
        diff = diff - margin
    loss = -F.logsigmoid(diff).mean()
    if center_coef:
        loss = loss + center_coef * ((chosen + rejected) ** 2).mean()
    return loss


def reward_metrics(chosen: torch.Tensor, rejected: torch.Tensor) -> dict[str, float]:
    """Batch means as TRL 1.16 logs them: accuracy is strict (a tie counts as wrong), "margin" is the raw gap."""
    c, r = chosen.detach(), rejected.detach()  # [B]
    return {
        "accuracy": (c > r).float().mean().item(),
        "margin": (c - r).mean().item(),
        "rewards/chosen": c.mean().item(),
        "rewards/rejected": r.mean().item(),
    }
