"""DPO-family pairwise preference losses (torch only).

DPO -- Rafailov et al. 2023, "Direct Preference Optimization", https://arxiv.org/abs/2305.18290, Eq. 7:

    L_DPO = -log sigma( beta * [ (log pi(y_w|x) - log ref(y_w|x)) - (log pi(y_l|x) - log ref(y_l|x)) ] )

Write h = (pi_c - ref_c) - (pi_r - ref_r) for the difference of log-ratios (chosen minus rejected).

- "sigmoid": -log sigma(beta*h); with label smoothing eps (conservative DPO, cDPO -- E. Mitchell 2023,
  "A note on DPO with noisy preferences", which assumes each label is flipped with probability eps):
      L = -(1 - eps) * log sigma(beta*h) - eps * log sigma(-beta*h)
- "ipo": IPO -- Azar et al. 2023, https://arxiv.org/abs/2310.12036, Eq. 17, with tau = beta:
      L = (h - 1/(2*beta))^2
  Like TRL 1.16, h is built from per-token *averaged* log-probs here (see `uses_mean_logps`).
- "hinge": SLiC -- Zhao et al. 2023, https://arxiv.org/abs/2305.10425, as in TRL:
      L = max(0, 1 - beta*h)

Implicit rewards (DPO Sec. 5): r_c = beta*(pi_c - ref_c), r_r = beta*(pi_r - ref_r), detached.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

LOSS_TYPES = ("sigmoid", "ipo", "hinge")


@dataclass
class DPOLossOutput:
    losses: torch.Tensor  # [B] per-pair loss; take .mean() for the batch loss
    chosen_rewards: torch.Tensor  # [B] beta * (pi_c - ref_c), detached
    rejected_rewards: torch.Tensor  # [B] beta * (pi_r - ref_r), detached


def uses_mean_logps(loss_type: str) -> bool:
    """True where sequence log-probs must be averaged over completion tokens instead of summed.

    TRL 1.16 (DPOTrainer._compute_loss) sums token log-probs for every loss, then for "ipo" divides each
    log-ratio by its completion length; since policy and reference share that length this equals using
    mean log-probs for both. Its logged rewards/logps stay summed (ours follow whatever is passed in).
    """
    _check_loss_type(loss_type)
    return loss_type == "ipo"


def dpo_loss(
    policy_chosen_logps: torch.Tensor,  # [B] log pi(y_w|x), sum (or mean, see uses_mean_logps) over tokens
    policy_rejected_logps: torch.Tensor,  # [B] log pi(y_l|x)
    ref_chosen_logps: torch.Tensor,  # [B] log ref(y_w|x), no grad needed
    ref_rejected_logps: torch.Tensor,  # [B] log ref(y_l|x)
    *,
    beta: float,
    loss_type: str = "sigmoid",
    label_smoothing: float = 0.0,
) -> DPOLossOutput:
    _check_loss_type(loss_type)
    if beta <= 0:
        raise ValueError(f"beta must be > 0, got {beta}")
    if not 0.0 <= label_smoothing < 0.5:
        raise ValueError(f"label_smoothing must lie in [0, 0.5), got {label_smoothing}")
    if label_smoothing and loss_type != "sigmoid":
        raise ValueError(f"label_smoothing (cDPO) applies to loss_type 'sigmoid' only, not {loss_type!r}")

    chosen_logratios = policy_chosen_logps - ref_chosen_logps  # [B]
    rejected_logratios = policy_rejected_logps - ref_rejected_logps  # [B]
    h = chosen_logratios - rejected_logratios  # [B]

    if loss_type == "sigmoid":
        losses = -(1 - label_smoothing) * F.logsigmoid(beta * h) - label_smoothing * F.logsigmoid(-beta * h)
    elif loss_type == "ipo":
        losses = (h - 1 / (2 * beta)) ** 2
    else:  # hinge
        losses = torch.relu(1 - beta * h)

    return DPOLossOutput(
        losses=losses,
        chosen_rewards=beta * chosen_logratios.detach(),
        rejected_rewards=beta * rejected_logratios.detach(),
    )


def dpo_metrics(
    out: DPOLossOutput,
    policy_chosen_logps: torch.Tensor,  # [B]
    policy_rejected_logps: torch.Tensor,  # [B]
) -> dict[str, float]:
    """Batch means under TRL 1.16's names and definitions (accuracy is strict: ties count as wrong)."""
    c, r = out.chosen_rewards, out.rejected_rewards  # [B]
    return {
        "rewards/chosen": c.mean().item(),
        "rewards/rejected": r.mean().item(),
        "rewards/accuracies": (c > r).float().mean().item(),
        "rewards/margins": (c - r).mean().item(),
        "logps/chosen": policy_chosen_logps.detach().mean().item(),
        "logps/rejected": policy_rejected_logps.detach().mean().item(),
    }


def _check_loss_type(loss_type: str) -> None:
    if loss_type not in LOSS_TYPES:
        raise ValueError(f"unknown DPO loss_type {loss_type!r}; expected one of {', '.join(LOSS_TYPES)}")
