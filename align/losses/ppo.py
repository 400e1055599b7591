"""The math of PPO for RLHF (torch only; everything runs on CPU).

PPO -- Schulman et al. 2017, "Proximal Policy Optimization Algorithms", https://arxiv.org/abs/1707.06347,
Eq. 7 (clipped surrogate, maximised; `policy_loss` returns its negative):

    L_CLIP = E_t[ min( rho_t A_t, clip(rho_t, 1 - eps, 1 + eps) A_t ) ],   rho_t = pi(a_t|s_t) / pi_old(a_t|s_t)

GAE -- Schulman et al. 2016, "High-Dimensional Continuous Control Using Generalized Advantage Estimation",
https://arxiv.org/abs/1506.02438, Eq. 16, written as a recursion:

    delta_t = r_t + gamma V(s_{t+1}) - V(s_t),   A_t = delta_t + gamma lam A_{t+1}

KL-shaped reward and adaptive KL coefficient -- Ziegler et al. 2019, "Fine-Tuning Language Models from Human
Preferences", https://arxiv.org/abs/1909.08593, Sec. 2:

    R(x, y) = r(x, y) - beta log( pi(y|x) / ref(y|x) )
    e = clip( KL / KL_target - 1, -0.2, 0.2 ),   beta <- beta (1 + K_beta e)

Implementation details followed, from Huang, Liu & von Werra 2023, "The N Implementation Details of RLHF with
PPO" (https://huggingface.co/blog/the_n_implementation_details_of_rlhf_with_ppo, ICLR 2024 blogpost track;
a reproduction of openai/lm-human-preferences) and Huang et al. 2024, "The N+ Implementation Details of RLHF
with PPO: A Case Study on TL;DR Summarization" (https://arxiv.org/abs/2403.17031):

- The KL penalty is per token, -beta * (log pi - log ref) (the k1 estimator), and the reward model's sequence
  score is added only at the last real token -- the EOS token, or the last token of a truncated response
  (`kl_penalty_rewards`).
- Tokens after EOS are padding: they carry no reward, no advantage, no return, and take no part in any loss
  or statistic (every function takes `mask`). GAE treats the step after the last real token as terminal, so
  no value is bootstrapped past it (`gae`); the N+ runs use gamma = 1, lam = 0.95.
- Advantages are whitened over the batch's real tokens; rewards may be whitened too, keeping their mean
  (`masked_whiten(..., shift_mean=False)`), the `whiten_rewards` option of the N+ code.
- Policy loss: the clipped surrogate, averaged over real tokens, logging clipfrac and approxkl =
  0.5 * mean((log pi - log pi_old)^2) (`policy_loss`).
- Value loss: clipped around the rollout's values, 0.5 * max of the clipped and unclipped squared errors
  (`value_loss`).
- Adaptive KL controller with lm-human-preferences' update, 1 + e * n_steps / horizon, i.e. K_beta = n_steps /
  horizon (`AdaptiveKLController`).
- Reward-model scores normalised to mean 0, std 1: the N blog fits a fixed gain and bias once before PPO;
  `RunningMoments` does it online over all rollouts so far, like TRL's `use_score_scaling`.

Response tensors are [B, T] (T = response tokens); `mask` [B, T] (float or bool) is 1 on real response tokens,
up to and including EOS, and 0 on the padding after it.
"""

from __future__ import annotations

import math

import torch


def masked_mean(x: torch.Tensor, mask: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """Mean of x over positions where mask is 1; over all dims when dim is None."""
    mask = mask.to(x.dtype)
    if dim is None:
        return (x * mask).sum() / mask.sum()
    return (x * mask).sum(dim) / mask.sum(dim)


def masked_var(x: torch.Tensor, mask: torch.Tensor, unbiased: bool = True) -> torch.Tensor:
    """Variance of x over positions where mask is 1 (one number for the whole tensor)."""
    n = mask.sum()
    # fewer samples than that give NaN (0/0), which would silently poison whitened advantages
    if n < (2 if unbiased else 1):
        raise ValueError(f"masked_var needs at least {2 if unbiased else 1} unmasked values, got {int(n)}")
    var = masked_mean((x - masked_mean(x, mask)) ** 2, mask)
    return var * n / (n - 1) if unbiased else var


def masked_whiten(x: torch.Tensor, mask: torch.Tensor, shift_mean: bool = True) -> torch.Tensor:
    """(x - mean) / std with mean and (unbiased) var over masked positions; keeps the mean if not shift_mean.

    Positions where mask is 0 are transformed too (they do not affect the statistics); callers mask them out.
    """
    mean, var = masked_mean(x, mask), masked_var(x, mask)
    whitened = (x - mean) * torch.rsqrt(var + 1e-8)
    return whitened if shift_mean else whitened + mean


def kl_penalty_rewards(
    logprobs: torch.Tensor,  # [B, T] log pi(y_t | x, y_<t) under the rollout policy
    ref_logprobs: torch.Tensor,  # [B, T] the same under the frozen reference model
    scores: torch.Tensor,  # [B] reward-model score of each whole response
    mask: torch.Tensor,  # [B, T]
    kl_coef: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token rewards -kl_coef * KL, plus each row's score on its last real token; returns (rewards, kl)."""
    kl = (logprobs - ref_logprobs) * mask  # [B, T]
    positions = torch.arange(mask.shape[1], device=mask.device)  # [T]
    last = torch.where(mask.bool(), positions, -1).amax(dim=1)  # [B] index of the last real token
    if (last < 0).any():  # the score would have nowhere to go
        raise ValueError("every response needs at least one real token (a row of mask is all zero)")
    rewards = -kl_coef * kl  # [B, T]
    rewards[torch.arange(len(last), device=last.device), last] += scores.to(rewards.dtype)
    return rewards, kl


@torch.no_grad()
def gae(
    rewards: torch.Tensor,  # [B, T]
    values: torch.Tensor,  # [B, T] V(s_t) from the rollout's value head
    mask: torch.Tensor,  # [B, T]
    gamma: float,
    lam: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalized advantage estimates and returns (advantages + values), both [B, T] and 0 on padding."""
    mask = mask.to(values.dtype)
    next_value = torch.zeros_like(values[:, 0])  # [B] V(s_{t+1}); 0 past the end of every row
    next_advantage = torch.zeros_like(values[:, 0])  # [B] A_{t+1}
    advantages_reversed = []
    for t in reversed(range(values.shape[1])):
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        # zeroing padding here also stops the recursion: the last real token sees A_{t+1} = 0 and V(s_{t+1}) = 0
        next_advantage = (delta + gamma * lam * next_advantage) * mask[:, t]
        next_value = values[:, t] * mask[:, t]
        advantages_reversed.append(next_advantage)
    advantages = torch.stack(advantages_reversed[::-1], dim=1)  # [B, T]
    return advantages, (advantages + values) * mask


def policy_loss(
    logprobs: torch.Tensor,  # [B, T] log pi under the policy being trained (carries grad)
    old_logprobs: torch.Tensor,  # [B, T] log pi_old recorded at rollout time
    advantages: torch.Tensor,  # [B, T]
    mask: torch.Tensor,  # [B, T]
    clip: float,
) -> tuple[torch.Tensor, dict[str, float]]:
    """PPO's clipped surrogate as a loss to minimise, averaged over real tokens; plus clipfrac and approxkl."""
    log_ratio = logprobs - old_logprobs  # [B, T]
    ratio = torch.exp(log_ratio)
    unclipped = -advantages * ratio
    clipped = -advantages * torch.clamp(ratio, 1 - clip, 1 + clip)
    loss = masked_mean(torch.max(unclipped, clipped), mask)
    with torch.no_grad():
        metrics = {
            "clipfrac": masked_mean((clipped > unclipped).to(ratio.dtype), mask).item(),
            "approxkl": 0.5 * masked_mean(log_ratio**2, mask).item(),
        }
    return loss, metrics


def value_loss(
    values: torch.Tensor,  # [B, T] V(s_t) from the value head being trained (carries grad)
    old_values: torch.Tensor,  # [B, T] V(s_t) recorded at rollout time
    returns: torch.Tensor,  # [B, T] GAE returns, the regression target
    mask: torch.Tensor,  # [B, T]
    clip: float,
) -> tuple[torch.Tensor, dict[str, float]]:
    """Clipped value loss, 0.5 * max of clipped and unclipped squared errors over real tokens; plus clipfrac."""
    clipped = old_values + torch.clamp(values - old_values, -clip, clip)
    unclipped_loss = (values - returns) ** 2  # [B, T]
    clipped_loss = (clipped - returns) ** 2
    loss = 0.5 * masked_mean(torch.max(unclipped_loss, clipped_loss), mask)
    with torch.no_grad():
        clipfrac = masked_mean((clipped_loss > unclipped_loss).to(values.dtype), mask).item()
    return loss, {"clipfrac": clipfrac}


def entropy_from_logits(logits: torch.Tensor) -> torch.Tensor:
    """Entropy of softmax(logits) over the last dim, [..., V] -> [...]; H = logsumexp(l) - E_p[l]."""
    return torch.logsumexp(logits, dim=-1) - (torch.softmax(logits, dim=-1) * logits).sum(dim=-1)


class _KLCoefficient:
    """The KL coefficient `value` and its checkpoint state, shared by both controllers."""

    def __init__(self, kl_coef: float):
        self.value = kl_coef

    def state_dict(self) -> dict[str, float]:
        return {"value": self.value}

    def load_state_dict(self, d: dict[str, float]) -> None:
        self.value = float(d["value"])


class FixedKLController(_KLCoefficient):
    """A constant KL coefficient; `update` is a no-op so trainers can drive both controllers alike."""

    def update(self, current_kl: float, n_steps: int) -> None:
        pass


class AdaptiveKLController(_KLCoefficient):
    """Ziegler et al.'s proportional controller: moves the coefficient so the measured KL approaches `target`.

    The error is clipped to +-20% so one batch with an outlying KL cannot swing the coefficient; `horizon` is
    in the unit of `n_steps` (samples, in lm-human-preferences) and sets how fast the coefficient moves.
    """

    def __init__(self, init_kl_coef: float, target: float, horizon: int):
        if target <= 0 or horizon <= 0:
            raise ValueError(f"target and horizon must be > 0, got target={target}, horizon={horizon}")
        super().__init__(init_kl_coef)
        self.target = target
        self.horizon = horizon

    def update(self, current_kl: float, n_steps: int) -> None:
        proportional_error = min(max(float(current_kl) / self.target - 1, -0.2), 0.2)
        self.value *= 1 + proportional_error * n_steps / self.horizon


def kl_controller(
    init_kl_coef: float, target: float | None, horizon: int
) -> FixedKLController | AdaptiveKLController:
    """An AdaptiveKLController when a target KL is given, else a FixedKLController at init_kl_coef."""
    if target is None:
        return FixedKLController(init_kl_coef)
    return AdaptiveKLController(init_kl_coef, target, horizon)


class RunningMoments:
    """Running mean and unbiased std of scalar rewards over every batch seen, to normalise reward-model scores.

    Each batch's mean and variance are merged into the running ones with the parallel algorithm of Chan,
    Golub & LeVeque 1979 ("Updating formulae and a pairwise algorithm for computing sample variances"), which
    avoids the cancellation of a running sum of squares. The statistics are plain Python numbers so they go
    straight into a JSON or .pt checkpoint.
    """

    def __init__(self):
        self.mean = 0.0
        self.var = 0.0  # population variance (divides by count); `std` applies Bessel's correction
        self.count = 0

    @property
    def std(self) -> float:
        if self.count < 2:
            raise ValueError(f"RunningMoments needs at least 2 samples for a std, has {self.count}")
        return math.sqrt(self.var * self.count / (self.count - 1))

    @torch.no_grad()
    def update(self, x: torch.Tensor) -> None:
        """Fold a batch of scores (any shape, usually [B]) into the running statistics."""
        if x.numel() == 0:
            raise ValueError("RunningMoments.update got an empty tensor")
        batch_var, batch_mean = torch.var_mean(x.double(), unbiased=False)
        n, total = x.numel(), self.count + x.numel()
        delta = batch_mean.item() - self.mean
        # sums of squared deviations, the old one shifted to the combined mean
        m2 = self.var * self.count + batch_var.item() * n + delta**2 * self.count * n / total
        self.mean += delta * n / total
        self.var = m2 / total
        self.count = total

    def normalize(self, x: torch.Tensor) -> torch.Tensor:
        """(x - mean) / (std + 1e-8), in x's dtype."""
        return (x - self.mean) / (self.std + 1e-8)

    def state_dict(self) -> dict[str, float]:
        return {"mean": self.mean, "var": self.var, "count": self.count}

    def load_state_dict(self, d: dict[str, float]) -> None:
        self.mean, self.var, self.count = float(d["mean"]), float(d["var"]), int(d["count"])
