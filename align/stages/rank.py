"""The `rank` stage: listwise preference optimisation over K ranked (or scored, with ties) responses per prompt.

It trains one of the registered listwise losses (`align.losses.preference`; built in: Plackett–Luce listwise DPO,
LiPO-λ, PRO and RRHF) on the group batch of `align.stages.groups`, which `dpo` and `kto` share.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from align.method_configs import RankLossConfig
from align.stages.engine import StageContext, StageOutput
from align.stages.groups import PreferenceStageConfig, encode_groups, loss_reward, ranking_summary, run_groups
from align.stages.kind import StageKind, register


@dataclass(kw_only=True)
class RankStageConfig(PreferenceStageConfig):
    """Listwise preference optimisation on K ranked (or scored, with ties) responses per prompt."""

    kind: str = "rank"
    loss: RankLossConfig = field(default_factory=RankLossConfig)


def run(stage, ctx: StageContext, data) -> StageOutput:
    train_rows = encode_groups(data["train"].examples, ctx.tokenizer, stage.train)
    eval_rows = encode_groups(data["eval"].examples, ctx.tokenizer, stage.train) if data.get("eval") else None
    return run_groups(stage, ctx, train_rows, eval_rows, stage.loss.build())


register(StageKind("rank", RankStageConfig, run, data="ranked", implicit_reward=loss_reward, summary=ranking_summary,
                   curves=("loss", "rank/kendall_tau", "replay/nll", "eval_loss", "eval_rank/kendall_tau")))
