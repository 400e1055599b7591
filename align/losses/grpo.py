"""Critic-free policy-gradient losses on groups of G sampled completions per prompt: GRPO and its variants.

Advantages (one per completion, from the G rewards of its prompt):
- `group_norm`: GRPO (Shao et al. 2024, DeepSeekMath, eq. 3): A_i = (r_i - mean(r)) / (std(r) + 1e-4), std with
  Bessel's correction, as TRL 1.16's GRPOTrainer computes it.
- `group_mean`: A_i = r_i - mean(r), no std (Liu et al. 2025, Dr. GRPO: dividing by std favours easy and hard prompts).
- `rloo`: REINFORCE leave-one-out (Ahmadian et al. 2024, eq. 6; TRL's RLOOTrainer): the sequence's summed k1 KL
  to the reference is taken off its reward first, r'_i = r_i - beta * sum_t (log pi - log ref), then
  A_i = r'_i - mean_{j != i} r'_j.

The loss is PPO's clipped surrogate per token (Schulman et al. 2017) with DAPO's asymmetric clip (Yu et al. 2025,
"clip-higher"): ratio = exp(log pi - log pi_old), loss_t = -min(ratio A, clip(ratio, 1 - eps_low, 1 + eps_high) A),
plus, for the group advantages, beta times the k3 estimate of KL(pi || ref) per token (Schulman 2020:
exp(ref - logp) - (ref - logp) - 1), as GRPO's eq. 3 has it. Aggregated over a batch of N completions as
- `sequence`: the mean over completions of each one's mean over its tokens (TRL `grpo`);
- `token`: the sum over all tokens / their number (TRL `bnpo`; DAPO's token-level loss);
- `constant`: the sum over all tokens / (N * max completion length) (TRL `dr_grpo`; Dr. GRPO with `group_mean`).

Under W processes, each holding an equal share of a minibatch and averaging its gradients with the others', `sequence`
and `constant` need nothing more: a share's mean over its N / W completions, or its sum over N / W * max length, is
what the whole minibatch's is on average over the shares. `token` divides by the whole minibatch's tokens / W
(`tokens`), DAPO's token-level loss over the global batch, as TRL's `dapo` normalises it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

ADVANTAGES = ("group_norm", "group_mean", "rloo")
AGGREGATIONS = ("sequence", "token", "constant")


def group_advantages(rewards: torch.Tensor, group_size: int, kind: str, kl: torch.Tensor | None = None,
                     beta: float = 0.0) -> torch.Tensor:
    """[N] advantages of N = prompts * G completions, the G of a prompt adjacent; `kl` [N]: each one's summed k1 KL
    to the reference (`rloo` takes beta * kl off the reward)."""
    grouped = rewards.view(-1, group_size)  # [N/G, G]
    if kind == "rloo":
        if kl is not None and beta:
            grouped = (rewards - beta * kl).view(-1, group_size)
        baseline = (grouped.sum(1, keepdim=True) - grouped) / (group_size - 1)  # [N/G, G] the others' mean
        return (grouped - baseline).reshape(-1)
    centred = grouped - grouped.mean(1, keepdim=True)  # [N/G, G]
    if kind == "group_norm":
        centred = centred / (grouped.std(1, keepdim=True) + 1e-4)  # unbiased std, as TRL's nanstd
    return centred.reshape(-1)


@dataclass(frozen=True)
class ClippedGroupLoss:
    clip_low: float = 0.2
    clip_high: float = 0.2
    beta: float = 0.0  # weight of the per-token k3 KL to the reference in the loss (0 for rloo: it is in the reward)
    aggregation: Literal["sequence", "token", "constant"] = "sequence"
    max_completion_length: int = 0  # `constant`'s denominator per completion

    def __call__(self, logps: torch.Tensor, old_logps: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor,
                 ref_logps: torch.Tensor | None = None,
                 tokens: torch.Tensor | None = None) -> tuple[torch.Tensor, dict[str, float]]:
        """`logps`, `old_logps`, `ref_logps`, `mask`: [N, T] per completion token; `advantages` [N]; `tokens`: what
        `token` aggregation and the per-token metrics divide by, by default the batch's own token count (a share of a
        minibatch passes the minibatch's count / W, so that the processes' mean is the whole minibatch's)."""
        tokens = (mask.sum() if tokens is None else tokens).clamp(min=1.0)
        adv = advantages[:, None]  # [N, 1]
        ratio = torch.exp(logps - old_logps)  # [N, T]
        clipped = torch.clamp(ratio, 1 - self.clip_low, 1 + self.clip_high)  # [N, T]
        per_token = -torch.min(ratio * adv, clipped * adv)  # [N, T]
        metrics = {}
        if self.beta and ref_logps is not None:
            kl = torch.exp(ref_logps - logps) - (ref_logps - logps) - 1  # [N, T] k3, >= 0
            per_token = per_token + self.beta * kl
            metrics["kl"] = float(_masked_mean(kl.detach(), mask, tokens))
        loss = self.aggregate(per_token, mask, tokens)
        low = (ratio < 1 - self.clip_low) & (adv < 0)  # [N, T] where the clip held a negative advantage's ratio
        high = (ratio > 1 + self.clip_high) & (adv > 0)
        metrics.update({"clip_ratio/low_mean": float(_masked_mean(low.float(), mask, tokens)),
                        "clip_ratio/high_mean": float(_masked_mean(high.float(), mask, tokens)),
                        "clip_ratio/region_mean": float(_masked_mean((low | high).float(), mask, tokens))})
        return loss, metrics

    def aggregate(self, per_token: torch.Tensor, mask: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        if self.aggregation == "sequence":
            return ((per_token * mask).sum(-1) / mask.sum(-1).clamp(min=1.0)).mean()
        if self.aggregation == "token":
            return (per_token * mask).sum() / tokens
        return (per_token * mask).sum() / (per_token.shape[0] * self.max_completion_length)


def _masked_mean(values: torch.Tensor, mask: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    return (values * mask).sum() / tokens
