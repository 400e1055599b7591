"""Which candidate pairs a round of the closed loop (align.stages.label) puts before annotators, under its label
budget: every strategy scores the round's pairs and the budget takes the best-scored ones.

- `random`: a seeded shuffle; every strategy's round 1, where nothing is labelled yet.
- `diverse`: spread over prompts: every prompt's first pair before any prompt's second (random within a round).
- `margin`: the pairs whose implicit reward margin under the current policy, β·|Δ log π − Δ log π_ref|, is smallest:
  those the policy itself cannot tell apart (the DPO implicit reward, Rafailov et al. 2023, eq. 5).
- `uncertainty`: the pairs an ensemble of preference models disagrees on most. The members are bootstrap heads
  (Efron 1979; as ensembles of reward heads in Gleave & Irving 2022, "Uncertainty Estimation for Language Reward
  Models"): logistic regressions on the difference of the policy's features of the two responses, each fitted on a
  bootstrap resample of the labels so far; the disagreement is the members' standard deviation of P(a ≻ b).
"""

from __future__ import annotations

import random

import torch

STRATEGIES = ("random", "uncertainty", "margin", "diverse")


class BootstrapEnsemble:
    """`members` logistic heads P(a ≻ b) = σ(w · (f_a − f_b)) on standardized features, each fitted on a bootstrap
    resample of the labelled pairs (with both orders of every pair, so that P(b ≻ a) = 1 − P(a ≻ b))."""

    def __init__(self, differences: torch.Tensor, preferred_first: torch.Tensor, members: int = 8, ridge: float = 1.0,
                 seed: int = 0):
        # differences [N, H] = f_a − f_b of labelled pairs; preferred_first [N] = 1.0 where a was preferred
        self.scale = differences.std(dim=0).clamp_min(1e-6)  # [H]
        x = differences / self.scale
        y = preferred_first.float()
        generator = torch.Generator().manual_seed(seed)
        weights = []
        for _ in range(members):
            rows = torch.randint(0, len(x), (len(x),), generator=generator)  # [N], with replacement
            weights.append(_logistic(torch.cat([x[rows], -x[rows]]), torch.cat([y[rows], 1 - y[rows]]), ridge))
        self.weights = torch.stack(weights)  # [M, H]

    def probabilities(self, differences: torch.Tensor) -> torch.Tensor:
        """[M, N] each member's P(a ≻ b) for the pairs whose feature differences are `differences` [N, H]."""
        return torch.sigmoid(self.weights @ (differences / self.scale).T)

    def disagreement(self, differences: torch.Tensor) -> torch.Tensor:
        """[N] the members' standard deviation of P(a ≻ b)."""
        return self.probabilities(differences).std(dim=0)

    def prediction(self, differences: torch.Tensor) -> torch.Tensor:
        """[N] the ensemble's P(a ≻ b): the members' mean."""
        return self.probabilities(differences).mean(dim=0)


def _logistic(x: torch.Tensor, y: torch.Tensor, ridge: float, iterations: int = 100) -> torch.Tensor:
    """[H] the weights (no intercept: the pair's order carries no preference) of an L2-penalised logistic regression."""
    w = torch.zeros(x.shape[1], requires_grad=True)
    optimizer = torch.optim.LBFGS([w], max_iter=iterations, line_search_fn="strong_wolfe")

    def loss():
        optimizer.zero_grad()
        value = torch.nn.functional.binary_cross_entropy_with_logits(x @ w, y) + ridge * (w @ w) / len(x)
        value.backward()
        return value

    optimizer.step(loss)
    return w.detach()


def select(scores: list[float], prompts_of: list[int], budget: int, strategy: str, seed: int) -> list[int]:
    """The indices of the pairs to label, best first. `scores`: higher = more worth a label (the strategy's score:
    disagreement, or minus the margin); ignored by `random` and `diverse`. `prompts_of`: each pair's prompt."""
    order = list(range(len(prompts_of)))
    random.Random(seed).shuffle(order)  # ties, and random / diverse, in a seeded random order
    if strategy == "diverse":
        tier, taken = {}, {}  # tier: how many pairs of its prompt come before the pair
        for i in order:
            tier[i] = taken.get(prompts_of[i], 0)
            taken[prompts_of[i]] = tier[i] + 1
        order.sort(key=tier.__getitem__)  # stable: random within a tier
    elif strategy in ("uncertainty", "margin"):
        order.sort(key=lambda i: -scores[i])
    return order[:budget]
