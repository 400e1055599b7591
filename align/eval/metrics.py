"""Pairwise win rates, with confidence intervals, and the length-controlled win rate.

An outcome is 1 (the stage's response won), 0.5 (tie) or 0 (the reference's won).

Win rate: the mean outcome with a Wilson score interval (Wilson 1927), which stays inside [0, 1] and
keeps its coverage at the small n of human verdicts, where the normal interval does not. It treats every
verdict as a coin flip, so with many ties (whose outcome, ½, varies less) it is wider than it need be:
conservative, never too narrow.

Length-controlled win rate (Dubois et al. 2024, "Length-Controlled AlpacaEval"): judges, human and model
alike, prefer longer answers, so a stage can win by talking more. AlpacaEval 2 fits a logistic model of
the preference

    logit P(stage wins) = θ + φ · tanh(Δlen / σ(Δlen))

where Δlen is the stage's response length minus the reference's and σ their standard deviation, and
reports sigmoid(θ): the win rate the model predicts at zero length difference. We fit the same two
parameters by Newton's method on soft outcomes (a tie counts half a win), with a small ridge on φ so that
preferences that a length threshold separates perfectly still give a finite fit. AlpacaEval's third term,
an instruction-difficulty effect shared by all models compared to one baseline, needs many models'
results on the same prompts, and is left out. The interval is a percentile bootstrap over prompts.
"""

from __future__ import annotations

import math

import numpy as np

Z95 = 1.959963984540054
VERDICT_OUTCOME = {"win": 1.0, "tie": 0.5, "loss": 0.0}


def verdicts(stage_scores, reference_scores, tolerance: float = 1e-6) -> list[str]:
    """"win" / "tie" / "loss" of each stage response against the reference's, by a judge's scores."""
    return ["tie" if abs(s - r) <= tolerance else "win" if s > r else "loss"
            for s, r in zip(stage_scores, reference_scores)]


def win_rate(outcomes: list[str]) -> dict | None:
    """{"value", "low", "high", "n", "wins", "ties", "losses"} of verdicts; None for none."""
    n = len(outcomes)
    if n == 0:
        return None
    wins, ties = outcomes.count("win"), outcomes.count("tie")
    p = (wins + 0.5 * ties) / n
    center = (p + Z95**2 / (2 * n)) / (1 + Z95**2 / n)
    half = Z95 / (1 + Z95**2 / n) * math.sqrt(p * (1 - p) / n + Z95**2 / (4 * n**2))
    return {"value": p, "low": max(0.0, center - half), "high": min(1.0, center + half), "n": n,
            "wins": wins, "ties": ties, "losses": n - wins - ties}


def _fit_intercept(x: np.ndarray, y: np.ndarray, ridge: float, iterations: int = 50) -> float:
    """θ of the logistic regression logit p = θ + φ x on soft targets y, ridge-penalised on φ only."""
    features = np.stack([np.ones_like(x), x], axis=1)  # [N, 2]
    penalty = np.diag([0.0, ridge])
    w = np.zeros(2)
    for _ in range(iterations):
        p = 1.0 / (1.0 + np.exp(-np.clip(features @ w, -30, 30)))  # [N]
        gradient = features.T @ (p - y) + penalty @ w
        hessian = features.T @ (features * (p * (1 - p))[:, None]) + penalty + 1e-9 * np.eye(2)
        step = np.linalg.solve(hessian, gradient)
        w -= step
        if np.abs(step).max() < 1e-10:
            break
    return float(w[0])


def length_controlled_win_rate(outcomes: list[str], stage_lengths, reference_lengths, bootstrap: int = 200,
                               seed: int = 0, ridge: float = 1.0) -> dict | None:
    """{"value", "low", "high"}: the win rate predicted at zero length difference; None for no outcomes."""
    if not outcomes:
        return None
    y = np.array([VERDICT_OUTCOME[o] for o in outcomes], dtype=float)  # [N]
    diff = np.asarray(stage_lengths, dtype=float) - np.asarray(reference_lengths, dtype=float)  # [N]
    scale = diff.std()
    x = np.tanh(diff / scale) if scale > 0 else np.zeros_like(diff)

    def fit(index: np.ndarray) -> float:
        return 1.0 / (1.0 + math.exp(-min(max(_fit_intercept(x[index], y[index], ridge), -30.0), 30.0)))

    value = fit(np.arange(len(y)))
    rng = np.random.default_rng(seed)
    samples = [fit(rng.integers(0, len(y), len(y))) for _ in range(bootstrap)] if len(y) > 1 else [value]
    low, high = np.percentile(samples, [2.5, 97.5])
    return {"value": value, "low": float(low), "high": float(high)}


def paired_bootstrap(stage_values, reference_values, resamples: int = 2000, seed: int = 0) -> dict | None:
    """{"value", "low", "high", "n"}: the mean of stage − reference over paired items (the same prompts) with a
    percentile-bootstrap 95% interval that resamples whole items, so each prompt's pair moves together: a change that
    one stage answers right and the other wrong counts, while the prompts both get right or wrong add no noise
    (Efron & Tibshirani 1993, ch. 13; Koehn 2004 for paired bootstrap on test sets). None for no items."""
    diff = np.asarray(stage_values, dtype=float) - np.asarray(reference_values, dtype=float)  # [N]
    if diff.size == 0:
        return None
    rng = np.random.default_rng(seed)
    means = diff[rng.integers(0, diff.size, (resamples, diff.size))].mean(axis=1) if resamples else diff[None].mean(1)
    low, high = np.percentile(means, [2.5, 97.5])
    return {"value": float(diff.mean()), "low": float(low), "high": float(high), "n": int(diff.size)}
