"""Listwise ranking losses over groups of K responses per prompt (torch only).

Inputs are padded groups, every tensor [B, K]: `mask` marks real responses (a group may hold fewer than K;
padded entries hold arbitrary finite values and reach neither the loss nor its gradient), `scores` orders
them (higher = better, equal = tie). Each group must hold >= 2 real responses with different scores.

- "plackett_luce": listwise DPO -- Rafailov et al. 2023, https://arxiv.org/abs/2305.18290, Appendix A.3,
  Eq. 20 (the Plackett-Luce model, Eq. 18, under the implicit reward r = beta*(log pi - log ref)), with
  tau ordering the responses best first:
      L = -sum_{k=1}^{K-1} [ r_tau(k) - log sum_{j>=k} exp r_tau(j) ]
- "lipo": LiPO-lambda -- Liu et al. 2024, https://arxiv.org/abs/2402.01878, with s = beta*(log pi - log ref):
      L = -sum_{psi_i > psi_j} Delta_ij * log sigma(s_i - s_j)
      Delta_ij = |G_i - G_j| * |1/D(tau_i) - 1/D(tau_j)|,  G = 2^psi - 1,  D(tau) = log2(1 + tau)
- "pro": PRO -- Song et al. 2024, https://arxiv.org/abs/2306.17492, reference-free; the same listwise
  softmax as above on r = log pi(y|x) / |y|, plus sft_weight * (-log pi(y_best|x) / |y_best|).
- "rrhf": RRHF -- Yuan et al. 2023, https://arxiv.org/abs/2304.05302, Eqs. 1-4, on p = log pi(y|x) / |y|:
      L = sum_{score_i < score_j} max(0, p_i - p_j) + sft_weight * (-log pi(y_best|x))

Ties use Breslow's approximation (Breslow 1974, from Cox regression): every real response i above the
worst tie group contributes r_i - log sum_{j real, score_j <= score_i} exp r_j. Its risk sets do not
depend on how ties are broken, it is a sum of log-softmax terms (so as cheap and convex as PL), and it is
exactly PL when there are no ties; the exact tied likelihood would sum over every ordering of each tie.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F

from align.losses.preference import PreferenceLoss, register

RANK_LOSS_TYPES = ("plackett_luce", "lipo", "pro", "rrhf")


@dataclass
class RankLossOutput:
    losses: torch.Tensor  # [B] per-group loss; take .mean() for the batch loss
    rewards: torch.Tensor  # [B, K] what the loss ranks by, detached: beta*(pi - ref) or log pi / |y|


def plackett_luce_loss(
    policy_logps: torch.Tensor,  # [B, K] log pi(y_k|x), summed over tokens
    ref_logps: torch.Tensor,  # [B, K] log ref(y_k|x), no grad needed
    scores: torch.Tensor,  # [B, K] float, higher = better, equal = tie
    mask: torch.Tensor,  # [B, K] bool, True for real responses
    *,
    beta: float,
) -> RankLossOutput:
    """Listwise DPO under Plackett-Luce, ties by Breslow; at K=2 it is DPO's sigmoid loss."""
    _check_beta(beta)
    rewards = beta * (policy_logps - ref_logps)  # [B, K]
    return RankLossOutput(losses=_breslow_pl_nll(rewards, scores, mask), rewards=rewards.detach())


def lipo_lambda_loss(
    policy_logps: torch.Tensor,  # [B, K]
    ref_logps: torch.Tensor,  # [B, K]
    scores: torch.Tensor,  # [B, K]
    mask: torch.Tensor,  # [B, K] bool
    *,
    beta: float,
) -> RankLossOutput:
    """LiPO-lambda: DPO's pairwise logistic loss over all ranked pairs, each weighted by its Lambda weight.

    G = 2^psi - 1 is exponential in the label, so labels must be small graded values. The paper puts its
    labels into G as given; raw reward-model scores, large or negative, would make the weights explode or
    vanish (or G < 0). So here psi_i = the number of real responses in the group scored strictly below i
    (worst = 0, ties share a label; n-1-rank for n distinct scores): only the order of `scores` matters.
    tau_i is i's 1-based rank under the model's current s (detached; ties in s broken by position).
    D uses log2 as in LambdaLoss/NDCG (natural log would scale every weight by 1/ln 2), with no 1/maxDCG
    normalisation, as in the paper. At K=2 the loss is (1 - 1/log2 3) ~ 0.369 times DPO's.
    """
    _check_beta(beta)
    s = beta * (policy_logps - ref_logps)  # [B, K]
    weights = _lambda_weights(s.detach(), scores, mask)  # [B, K, K], zero off the ranked pairs
    pair_logsig = F.logsigmoid(s[:, :, None] - s[:, None, :])  # [B, K, K]: log sigma(s_i - s_j)
    return RankLossOutput(losses=-(weights * pair_logsig).sum(dim=(1, 2)), rewards=s.detach())


def pro_loss(
    policy_logps: torch.Tensor,  # [B, K] log pi(y_k|x), summed over tokens
    lengths: torch.Tensor,  # [B, K] token counts, >= 1 for real responses
    scores: torch.Tensor,  # [B, K]
    mask: torch.Tensor,  # [B, K] bool
    *,
    sft_weight: float,
) -> RankLossOutput:
    """PRO's base form: Plackett-Luce (Breslow ties) on mean token log-probs, plus SFT on the best response.

    Differences from the paper: no dynamic temperature (PRO scales each softmax term by the reward-model
    gaps r_phi(y_k) - r_phi(y_i); `scores` here need not be reward-model values, so all temperatures are 1),
    and the SFT term is the per-token mean NLL with a fixed sft_weight, whereas the official code uses the
    summed NLL and multiplies its weight by (n - 1)^2 for a list of n. The best response is the first one
    with the top score.
    """
    r = policy_logps / _real_lengths(lengths, mask, policy_logps.dtype)  # [B, K] mean token log-prob
    nll_best = -r.gather(-1, _best_index(scores, mask)).squeeze(-1)  # [B]
    losses = _breslow_pl_nll(r, scores, mask) + sft_weight * nll_best
    return RankLossOutput(losses=losses, rewards=r.detach())


def rrhf_loss(
    policy_logps: torch.Tensor,  # [B, K] log pi(y_k|x), summed over tokens
    lengths: torch.Tensor,  # [B, K] token counts, >= 1 for real responses
    scores: torch.Tensor,  # [B, K]
    mask: torch.Tensor,  # [B, K] bool
    *,
    sft_weight: float = 1.0,
) -> RankLossOutput:
    """RRHF: hinge on every mis-ordered pair of mean token log-probs, plus SFT on the best response.

    L_ft is the NLL summed over the best response's tokens, as in the paper's Eq. 3 (the official code
    averages over padded positions instead). The paper's total is L_rank + L_ft, i.e. sft_weight = 1;
    ties in `scores` form no pair. The best response is the first one with the top score.
    """
    p = policy_logps / _real_lengths(lengths, mask, policy_logps.dtype)  # [B, K]
    real_pair = mask[:, :, None] & mask[:, None, :]  # [B, K, K]
    worse = (scores[:, :, None] < scores[:, None, :]) & real_pair  # [b, i, j]: i scored below j
    rank_loss = torch.where(worse, torch.relu(p[:, :, None] - p[:, None, :]), 0.0).sum(dim=(1, 2))  # [B]
    nll_best = -policy_logps.gather(-1, _best_index(scores, mask)).squeeze(-1)  # [B]
    return RankLossOutput(losses=rank_loss + sft_weight * nll_best, rewards=p.detach())


def ranking_metrics(
    rewards: torch.Tensor,  # [B, K] what the model ranks by (RankLossOutput.rewards)
    scores: torch.Tensor,  # [B, K] the given scores
    mask: torch.Tensor,  # [B, K] bool
) -> dict[str, float]:
    """Batch means: pair accuracy (strict; reward ties are wrong), per-group Kendall tau-b (0 where the
    rewards are all equal), and rewards/rank_i, the mean reward at given-order position i (0 = best)."""
    rewards, scores = rewards.detach(), scores.detach()
    real_pair = mask[:, :, None] & mask[:, None, :]  # [B, K, K]
    score_sign = torch.sign(scores[:, :, None] - scores[:, None, :]) * real_pair  # [B, K, K]
    reward_sign = torch.sign(rewards[:, :, None] - rewards[:, None, :]) * real_pair  # [B, K, K]

    ranked = score_sign > 0  # ordered pairs (i, j) with i scored above j
    accuracy = (ranked & (reward_sign > 0)).sum() / ranked.sum()
    # tau-b over ordered pairs: each unordered pair is counted twice above and below, which cancels
    concordance = (score_sign * reward_sign).sum(dim=(1, 2))  # [B] n_concordant - n_discordant, doubled
    untied = (score_sign != 0).sum(dim=(1, 2)) * (reward_sign != 0).sum(dim=(1, 2))  # [B]
    tau = torch.where(untied > 0, concordance / untied.clamp_min(1).to(concordance.dtype).sqrt(), 0.0)

    metrics = {"rank/accuracy": accuracy.item(), "rank/kendall_tau": tau.mean().item()}
    # real responses sort ahead of padding, so position i exists in a group iff it has > i responses
    order = torch.sort(scores.masked_fill(~mask, float("-inf")), dim=-1, descending=True, stable=True).indices
    by_position, present = rewards.gather(-1, order), mask.gather(-1, order)  # [B, K], best first
    for i in range(int(mask.sum(-1).max())):
        metrics[f"rewards/rank_{i}"] = by_position[:, i][present[:, i]].mean().item()
    return metrics


def _breslow_pl_nll(r: torch.Tensor, scores: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """[B] -log Plackett-Luce likelihood of the order of `scores` under utilities r [B, K], Breslow ties."""
    K = r.shape[-1]
    real_pair = mask[:, :, None] & mask[:, None, :]  # [B, K, K]
    at_or_below = (scores[:, None, :] <= scores[:, :, None]) & mask[:, None, :]  # [b, i, j]: score_j <= score_i
    # i's own entry keeps a padded row's set non-empty: an empty logsumexp is -inf, a NaN risk in backward
    risk_set = at_or_below | torch.eye(K, dtype=torch.bool, device=r.device)
    log_norm = torch.logsumexp(r[:, None, :].masked_fill(~risk_set, float("-inf")), dim=-1)  # [B, K]
    # the worst tie group has no one below it: choosing among what is left carries no information
    above_someone = ((scores[:, :, None] > scores[:, None, :]) & real_pair).any(-1)  # [B, K]
    return -torch.where(above_someone, r - log_norm, 0.0).sum(-1)


def _lambda_weights(s: torch.Tensor, scores: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """[B, K, K] LiPO-lambda's Delta_ij for each real pair with psi_i > psi_j, zero elsewhere."""
    real_pair = mask[:, :, None] & mask[:, None, :]
    better = (scores[:, :, None] > scores[:, None, :]) & real_pair  # [b, i, j]: i scored above j
    gain = 2.0 ** better.sum(-1).to(s.dtype) - 1  # [B, K] G = 2^psi - 1, psi = #real responses below
    order = torch.sort(s.masked_fill(~mask, float("-inf")), dim=-1, descending=True, stable=True).indices
    tau = order.argsort(dim=-1) + 1  # [B, K] 1-based rank under s; padding ranks last
    inv_discount = 1 / torch.log2(1 + tau.to(s.dtype))  # [B, K] 1/D(tau)
    gain_gap = (gain[:, :, None] - gain[:, None, :]).abs()  # [B, K, K]
    discount_gap = (inv_discount[:, :, None] - inv_discount[:, None, :]).abs()  # [B, K, K]
    return torch.where(better, gain_gap * discount_gap, 0.0)


def _real_lengths(lengths: torch.Tensor, mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """[B, K] lengths as `dtype`, with padding's (possibly 0) replaced by 1 so no NaN reaches the gradient."""
    return torch.where(mask, lengths, torch.ones_like(lengths)).to(dtype)


def _best_index(scores: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """[B, 1] index of the first real response with the group's top score."""
    return scores.masked_fill(~mask, float("-inf")).argmax(dim=-1, keepdim=True)


def _check_beta(beta: float) -> None:
    if beta <= 0:
        raise ValueError(f"beta must be > 0, got {beta}")


# ---- the listwise losses as registered objects (align.losses.preference): a `rank` stage's loss ----


@dataclass(frozen=True, kw_only=True)
class ImplicitRewardRanking(PreferenceLoss):
    """A listwise loss on the implicit rewards beta * (log pi - log ref) of every response (`ranking_loss`)."""

    listwise: ClassVar[bool] = True
    ranking_loss: ClassVar[Callable[..., RankLossOutput]]

    def losses(self, logps, ref_logps, lengths, scores, mask):
        return self.ranking_loss(logps, ref_logps, scores, mask, beta=self.beta).losses, {}


@register
@dataclass(frozen=True, kw_only=True)
class PlackettLuce(ImplicitRewardRanking):
    name: ClassVar[str] = "plackett_luce"
    ranking_loss = staticmethod(plackett_luce_loss)


@register
@dataclass(frozen=True, kw_only=True)
class LiPO(ImplicitRewardRanking):
    name: ClassVar[str] = "lipo"
    ranking_loss = staticmethod(lipo_lambda_loss)


@dataclass(frozen=True, kw_only=True)
class _MeanLogProbRanking(PreferenceLoss):
    """PRO and RRHF: reference-free, ranking by the mean token log-prob itself (they have no beta), with the best
    response's NLL inside their loss (weight 1 unless asked otherwise)."""

    listwise: ClassVar[bool] = True
    needs_reference: ClassVar[bool] = False
    mean_logps: ClassVar[bool] = True
    own_nll_weight: ClassVar[float] = 1.0
    nll_in_loss: ClassVar[bool] = True

    def implicit_reward(self, logps, ref_logps, lengths):
        return self.sequence_logps(logps, lengths)


@register
@dataclass(frozen=True, kw_only=True)
class PRO(_MeanLogProbRanking):
    name: ClassVar[str] = "pro"

    def losses(self, logps, ref_logps, lengths, scores, mask):
        return pro_loss(logps, lengths, scores, mask, sft_weight=self.nll).losses, {}


@register
@dataclass(frozen=True, kw_only=True)
class RRHF(_MeanLogProbRanking):
    name: ClassVar[str] = "rrhf"

    def losses(self, logps, ref_logps, lengths, scores, mask):
        return rrhf_loss(logps, lengths, scores, mask, sft_weight=self.nll).losses, {}
