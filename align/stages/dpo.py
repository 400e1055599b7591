"""The `dpo` stage: pairwise preference optimisation, the K = 2 case of the `rank` stage.

Pairs are groups of two (chosen scored 1, rejected 0) in `align.stages.rank`'s group batch, so DPO shares
its encoding, reference cache and trainer: the `policy` adapter starts as a copy of `init` (the SFT
adapter) and the frozen reference is `reference` (default: `init`), whose log-probs are computed once
and cached. Ranked data (K > 2) trains on each group's best against its worst response (the data loader
binarizes it); held-out data may keep whole rankings, and the loss then takes each group's best and
worst while the ranking metrics (Kendall τ, ...) use every response.

Loss types (`align.losses.dpo`): sigmoid (DPO), ipo, hinge, which need the reference, and the
reference-free simpo (length-normalised, with a target margin) and orpo (odds ratio plus the NLL of the
chosen answer).
"""

from __future__ import annotations

import torch

from align.losses import dpo as dpo_losses
from align.losses.rank import ranking_metrics
from align.losses.sft import sft_loss
from align.stages.rank import Objective, best_and_worst, encode_groups, run_groups
from align.stages.engine import StageContext, StageOutput

REFERENCE_FREE = {"simpo", "orpo"}


def _pick(values: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    return values.gather(1, index[:, None]).squeeze(1)  # [B, K] -> [B]


def dpo_objective(loss_cfg) -> Objective:
    def objective(logps, ref_logps, lengths, scores, mask):
        best, worst = best_and_worst(scores, mask)
        mean_logps = logps / lengths.clamp(min=1)  # [B, K]
        if loss_cfg.type == "simpo":
            out = dpo_losses.simpo_loss(_pick(mean_logps, best), _pick(mean_logps, worst), beta=loss_cfg.beta,
                                        gamma_beta_ratio=loss_cfg.gamma_beta_ratio, label_smoothing=loss_cfg.label_smoothing)
            rewards = loss_cfg.beta * mean_logps
        elif loss_cfg.type == "orpo":
            out = dpo_losses.orpo_loss(_pick(mean_logps, best), _pick(mean_logps, worst), beta=loss_cfg.beta)
            rewards = loss_cfg.beta * mean_logps
        else:
            mean = dpo_losses.uses_mean_logps(loss_cfg.type)
            policy, ref = (mean_logps, ref_logps / lengths.clamp(min=1)) if mean else (logps, ref_logps)
            out = dpo_losses.dpo_loss(_pick(policy, best), _pick(policy, worst), _pick(ref, best), _pick(ref, worst),
                                      beta=loss_cfg.beta, loss_type=loss_cfg.type, label_smoothing=loss_cfg.label_smoothing)
            rewards = loss_cfg.beta * (policy - ref)
        metrics = dpo_losses.dpo_metrics(out, _pick(logps, best).detach(), _pick(logps, worst).detach())
        metrics.update(ranking_metrics(rewards.detach(), scores, mask))
        loss = out.losses.mean()
        nll_weight = 1.0 if loss_cfg.type == "orpo" else loss_cfg.rpo_alpha  # ORPO is SFT + odds ratio by definition
        if nll_weight:
            chosen_nll = sft_loss(_pick(logps, best), _pick(lengths, best))
            loss = loss + nll_weight * chosen_nll
            metrics["nll_loss"] = float(chosen_nll.detach())
        return loss, metrics

    return objective


def run(stage, ctx: StageContext, data) -> StageOutput:
    train = [ex.as_ranked() for ex in data["train"].examples]  # pairs
    train_rows = encode_groups(train, ctx.tokenizer, stage.train)
    eval_rows = encode_groups(data["eval"].examples, ctx.tokenizer, stage.train) if data.get("eval") else None
    return run_groups(stage, ctx, train_rows, eval_rows, dpo_objective(stage.loss),
                      needs_ref=stage.loss.type not in REFERENCE_FREE)
