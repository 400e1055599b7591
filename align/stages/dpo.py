"""The `dpo` stage: pairwise preference optimisation, the K = 2 case of the `rank` stage.

Pairs are groups of two (chosen scored 1, rejected 0) in `align.stages.groups`' group batch, so DPO shares
its encoding, reference cache and trainer: the `policy` adapter starts as a copy of `init` (the SFT
adapter) and the frozen reference is `reference` (default: `init`), whose log-probs are computed once
and cached. Ranked data (K > 2) trains on each group's best against its worst response (the data loader
binarizes it); held-out data may keep whole rankings, and the loss then takes each group's best and
worst while the ranking metrics (Kendall τ, ...) use every response.

Loss types are the registered pairwise losses (`align.losses.preference`; built in, in `align.losses.dpo`: sigmoid
(DPO), ipo, hinge, which need the reference, and the reference-free simpo (length-normalised, with a target margin)
and orpo (odds ratio plus the NLL of the chosen answer)).
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

from align.method_configs import DPOLossConfig
from align.stages.agreement import smoothing_from_agreement
from align.stages.engine import StageContext, StageOutput
from align.stages.groups import PreferenceStageConfig, encode_groups, loss_reward, ranking_summary, run_groups
from align.stages.kind import StageKind, register


@dataclass(kw_only=True)
class DPOStageConfig(PreferenceStageConfig):
    """Direct preference optimisation on (prompt, chosen, rejected) pairs; ranked data trains on each
    group's best against its worst response."""

    kind: str = "dpo"
    loss: DPOLossConfig = field(default_factory=DPOLossConfig)


def run(stage, ctx: StageContext, data) -> StageOutput:
    train = [ex.as_ranked() for ex in data["train"].examples]  # pairs
    train_rows = encode_groups(train, ctx.tokenizer, stage.train)
    eval_rows = encode_groups(data["eval"].examples, ctx.tokenizer, stage.train) if data.get("eval") else None
    loss, smoothing = stage.loss, None
    if loss.smooth_by_agreement:
        smoothing = smoothing_from_agreement([source.path for source in stage.sources])
        loss = replace(loss, smooth_by_agreement=False, label_smoothing=smoothing["label_smoothing"])
    out = run_groups(stage, ctx, train_rows, eval_rows, loss.build())
    if smoothing:
        out.extra["smoothing"] = smoothing
    return out


def heldout_summary(metrics: dict) -> dict:
    """The implicit reward's accuracy and margin on held-out pairs, and how it orders whole held-out groups."""
    pairs = {}
    if "eval_rewards/accuracies" in metrics:
        pairs = {"accuracy": metrics["eval_rewards/accuracies"], "margin": metrics["eval_rewards/margins"]}
    ranking = ranking_summary(metrics).get("rewards", {})
    return {"rewards": {**pairs, **ranking}} if pairs or ranking else {}


# held-out rankings as well as pairs: its pairs are groups of two to the ranking metrics
register(StageKind("dpo", DPOStageConfig, run, data="preference", eval_data="ranked", heldout_pairs=True,
                   implicit_reward=loss_reward, summary=heldout_summary,
                   curves=("loss", "rewards/margins", "rewards/accuracies", "rank/kendall_tau", "replay/nll",
                           "eval_loss", "eval_rewards/accuracies", "eval_rank/kendall_tau")))
