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

from abc import abstractmethod
from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F

from align.losses.preference import ImplicitReward, PreferenceLoss, best_and_worst, pick, register

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


# ---- reference-free pairwise losses (SimPO, ORPO) and unpaired KTO ----


def simpo_loss(
    policy_chosen_logps: torch.Tensor,  # [B] log pi(y_w|x) / |y_w|, *averaged* over completion tokens
    policy_rejected_logps: torch.Tensor,  # [B] log pi(y_l|x) / |y_l|
    *,
    beta: float,
    gamma_beta_ratio: float,
    label_smoothing: float = 0.0,
) -> DPOLossOutput:
    """SimPO -- Meng et al. 2024, "Simple Preference Optimization with a Reference-Free Reward",
    https://arxiv.org/abs/2405.14734, Eq. 6, with gamma = gamma_beta_ratio * beta (the paper's own knob):

        L = -log sigma( beta * (c - r) - gamma ),   c, r = length-averaged log-probs of chosen, rejected

    The reward is beta * mean log-prob, so no reference model. label_smoothing eps applies the cDPO form, as the
    SimPO code and TRL do: -(1-eps) log sigma(z) - eps log sigma(-z). TRL 1.16 (CPOTrainer, loss_type="simpo",
    cpo_alpha=0) takes gamma itself as `simpo_gamma`, i.e. simpo_gamma = gamma_beta_ratio * beta.
    """
    if beta <= 0:
        raise ValueError(f"beta must be > 0, got {beta}")
    if not 0.0 <= label_smoothing < 0.5:
        raise ValueError(f"label_smoothing must lie in [0, 0.5), got {label_smoothing}")
    z = beta * (policy_chosen_logps - policy_rejected_logps) - gamma_beta_ratio * beta  # [B]
    losses = -(1 - label_smoothing) * F.logsigmoid(z) - label_smoothing * F.logsigmoid(-z)
    return DPOLossOutput(
        losses=losses,
        chosen_rewards=beta * policy_chosen_logps.detach(),
        rejected_rewards=beta * policy_rejected_logps.detach(),
    )


def orpo_loss(
    policy_chosen_logps: torch.Tensor,  # [B] length-averaged log pi(y_w|x), < 0
    policy_rejected_logps: torch.Tensor,  # [B] length-averaged log pi(y_l|x), < 0
    *,
    beta: float,
) -> DPOLossOutput:
    """ORPO's odds-ratio term -- Hong et al. 2024, "ORPO: Monolithic Preference Optimization without Reference
    Model", https://arxiv.org/abs/2403.07691, Eqs. 4 and 7:

        odds(y|x) = p / (1 - p),  p = exp(mean log pi(y|x))
        L_OR = -log sigma( log odds(y_w|x) - log odds(y_l|x) )

    Returns beta * L_OR per pair (beta is the paper's lambda, as in TRL). The full ORPO objective
    L_SFT + lambda * L_OR (Eq. 6) also needs the chosen answer's NLL, which the training stage adds itself from
    its token-level loss. Rewards are what TRL logs: beta * mean log-prob.
    """
    if beta <= 0:
        raise ValueError(f"beta must be > 0, got {beta}")
    log_odds = _log_odds(policy_chosen_logps) - _log_odds(policy_rejected_logps)  # [B]
    return DPOLossOutput(
        losses=-beta * F.logsigmoid(log_odds),
        chosen_rewards=beta * policy_chosen_logps.detach(),
        rejected_rewards=beta * policy_rejected_logps.detach(),
    )


def _log_odds(logp: torch.Tensor) -> torch.Tensor:
    """log(p / (1 - p)) = logp - log(1 - exp(logp)), for logp <= 0 ([B] -> [B])."""
    # p = 1 exactly (logp = 0, e.g. a float32 log_softmax saturating) makes the odds infinite and the gradient
    # NaN; nudging to -eps changes nothing at working precision and keeps both finite.
    logp = logp.clamp(max=-torch.finfo(logp.dtype).eps)
    # log1mexp (Maechler 2012): log1p(-exp(x)) loses precision as x -> 0, log(-expm1(x)) as x -> -inf, so
    # switch at -log 2. Each branch sees only its own side of the switch: torch.where still backpropagates
    # through the unused branch, and an inf there would turn the gradient into NaN (0 * inf).
    t = -0.6931471805599453
    log1mexp = torch.where(
        logp < t, torch.log1p(-torch.exp(logp.clamp(max=t))), torch.log(-torch.expm1(logp.clamp(min=t)))
    )
    return logp - log1mexp


@dataclass
class KTOLossOutput:
    losses: torch.Tensor  # [B] per-example loss, weighted; take .mean() for the batch loss (as TRL does)
    rewards: torch.Tensor  # [B] beta * (pi - ref), detached; split by `desirable` for chosen/rejected metrics
    kl: torch.Tensor  # [] the reference point z0 actually used (clamped at 0, detached)


def kto_loss(
    policy_logps: torch.Tensor,  # [B] log pi(y|x), summed over completion tokens
    ref_logps: torch.Tensor,  # [B] log ref(y|x), summed
    desirable: torch.Tensor,  # [B] bool, True where y is a desirable answer to x
    kl: torch.Tensor,  # [] reference point z0, from kto_kl_estimate
    *,
    beta: float,
    desirable_weight: float = 1.0,
    undesirable_weight: float = 1.0,
) -> KTOLossOutput:
    """KTO -- Ethayarajh et al. 2024, "KTO: Model Alignment as Prospect Theoretic Optimization",
    https://arxiv.org/abs/2402.01306, Sec. 4.1 (L_KTO = E[lambda_y - v(x, y)]; TRL cites it as Eq. 7), on
    unpaired answers. With r = log pi(y|x) - log ref(y|x) and z0 the KL reference point (no gradient):

        desirable:    L = w_D * (1 - sigma(beta * (r - z0)))
        undesirable:  L = w_U * (1 - sigma(beta * (z0 - r)))

    TRL 1.16 inlines this in KTOTrainer._compute_loss (loss_type="kto"); the paper suggests weights with
    w_D * n_D / (w_U * n_U) in [1, 4/3] when the classes are imbalanced.
    """
    if beta <= 0:
        raise ValueError(f"beta must be > 0, got {beta}")
    z0 = kl.detach().clamp(min=0)  # [] a KL is >= 0; the batch estimate can dip below
    logratios = policy_logps - ref_logps  # [B]
    losses = torch.where(
        desirable,
        desirable_weight * (1 - torch.sigmoid(beta * (logratios - z0))),
        undesirable_weight * (1 - torch.sigmoid(beta * (z0 - logratios))),
    )  # [B]
    return KTOLossOutput(losses=losses, rewards=beta * logratios.detach(), kl=z0)


def kto_kl_estimate(
    policy_kl_logps: torch.Tensor,  # [M] log pi(y'|x) on mismatched pairs, summed over tokens
    ref_kl_logps: torch.Tensor,  # [M] log ref(y'|x) on the same pairs
) -> torch.Tensor:
    """KTO's reference point z0 = max(0, mean(log pi(y'|x) - log ref(y'|x))) (paper Sec. 4.2), detached.

    The pairs (x, y') must be mismatched: TRL 1.16 pairs each prompt in a batch with the previous example's
    completion (x_i, y_{i-1}), the first with the last's -- i.e. completions rolled by one, torch.roll(y, 1) --
    so the estimate uses the same answers as the batch itself. Returns a scalar [].
    """
    return (policy_kl_logps - ref_kl_logps).mean().detach().clamp(min=0)


# ---- the pairwise losses as registered objects (align.losses.preference): each group's best against its worst ----


@dataclass(frozen=True, kw_only=True)
class PairwiseLoss(PreferenceLoss):
    """A loss on each group's first best response against its last worst: a `dpo` stage's loss."""

    listwise: ClassVar[bool] = False

    def losses(self, logps, ref_logps, lengths, scores, mask):
        best, worst = best_and_worst(scores, mask)  # [B]
        policy = self.sequence_logps(logps, lengths)  # [B, K]
        ref = self.sequence_logps(ref_logps, lengths) if self.needs_reference else None
        out = self.pair_losses(pick(policy, best), pick(policy, worst),
                               *((pick(ref, best), pick(ref, worst)) if ref is not None else ()))
        return out.losses, dpo_metrics(out, pick(logps, best).detach(), pick(logps, worst).detach())

    @abstractmethod
    def pair_losses(self, chosen: torch.Tensor, rejected: torch.Tensor, *ref: torch.Tensor) -> DPOLossOutput:
        """The [B] pair losses from the chosen and rejected sequence log-probs (and the reference's, if it needs
        one)."""


@dataclass(frozen=True, kw_only=True)
class LogRatioLoss(PairwiseLoss):
    """A loss of the margin between the two answers' log-ratios to the reference (`dpo_loss`, whose `loss_type` is
    the registered name)."""

    label_smoothing: float = 0.0  # cDPO: sigmoid only

    def pair_losses(self, chosen, rejected, *ref):
        return dpo_loss(chosen, rejected, *ref, beta=self.beta, loss_type=self.name,
                        label_smoothing=self.label_smoothing)


@register
@dataclass(frozen=True, kw_only=True)
class Sigmoid(LogRatioLoss):
    """DPO's loss, with cDPO's label smoothing."""

    name: ClassVar[str] = "sigmoid"


@register
@dataclass(frozen=True, kw_only=True)
class IPO(LogRatioLoss):
    name: ClassVar[str] = "ipo"
    mean_logps: ClassVar[bool] = True  # as TRL: see uses_mean_logps


@register
@dataclass(frozen=True, kw_only=True)
class Hinge(LogRatioLoss):
    name: ClassVar[str] = "hinge"


@register
@dataclass(frozen=True, kw_only=True)
class SimPO(PairwiseLoss):
    name: ClassVar[str] = "simpo"
    needs_reference: ClassVar[bool] = False
    mean_logps: ClassVar[bool] = True
    gamma_beta_ratio: float = 0.5
    label_smoothing: float = 0.0

    def pair_losses(self, chosen, rejected, *ref):
        return simpo_loss(chosen, rejected, beta=self.beta, gamma_beta_ratio=self.gamma_beta_ratio,
                          label_smoothing=self.label_smoothing)


@register
@dataclass(frozen=True, kw_only=True)
class ORPO(PairwiseLoss):
    name: ClassVar[str] = "orpo"
    needs_reference: ClassVar[bool] = False
    mean_logps: ClassVar[bool] = True

    @property
    def nll(self) -> float:
        return 1.0  # ORPO is SFT plus the odds-ratio term by definition (Eq. 6)

    def pair_losses(self, chosen, rejected, *ref):
        return orpo_loss(chosen, rejected, beta=self.beta)


@dataclass(frozen=True, kw_only=True)
class KTOLoss(ImplicitReward):
    """KTO's loss (`kto_loss`) with its settings: a `kto` stage's, on unpaired answers rather than groups."""

    desirable_weight: float = 1.0
    undesirable_weight: float = 1.0

    def losses(self, policy_logps, ref_logps, desirable, kl) -> KTOLossOutput:
        return kto_loss(policy_logps, ref_logps, desirable, kl, beta=self.beta, desirable_weight=self.desirable_weight,
                        undesirable_weight=self.undesirable_weight)
