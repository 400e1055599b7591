"""The `rm` stage: a reward model as a LoRA adapter plus a scalar score head on the shared base.

The adapter starts from `init` (usually the SFT adapter, as in Ouyang et al. 2022) or fresh; the head
is new. Chosen and rejected replies are scored in one forward at their last real token, and the
Bradley–Terry loss (`align.losses.reward`) pushes the chosen score above the rejected one. The head
is saved inside `adapter/` and in every checkpoint, so resume and later stages get it back.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from align import distributed
from align.data.collate import encode
from align.losses.reward import reward_loss, reward_metrics
from align.method_configs import RewardLossConfig
from align.models import heads
from align.models.tokens import pad_sequences
from align.settings import StageConfig
from align.stages.engine import AlignTrainer, StageContext, StageOutput, fit
from align.stages.kind import StageKind, register


@dataclass(kw_only=True)
class RMStageConfig(StageConfig):
    """A reward model: a LoRA adapter plus a scalar score head, trained on preference pairs."""

    kind: str = "rm"
    loss: RewardLossConfig = field(default_factory=RewardLossConfig)


def collate(pad_id: int):
    """Chosen then rejected in one batch [2B, T]; `margin` [B] when the data has one."""

    def fn(rows: list[dict]) -> dict:
        pairs = ([(r["prompt_ids"], r["chosen_ids"]) for r in rows]
                 + [(r["prompt_ids"], r["rejected_ids"]) for r in rows])
        batch = pad_sequences(pairs, pad_id)
        del batch["completion_mask"]
        if any(r["margin"] is not None for r in rows):
            batch["margin"] = torch.tensor([r["margin"] or 0.0 for r in rows])
        return batch

    return fn


def encode_scored_pairs(examples, tokenizer, train_cfg) -> list[dict]:
    rows = []
    for ex in examples:
        chosen = encode(tokenizer, ex.prompt, ex.chosen, train_cfg.max_length, train_cfg.max_prompt_length)
        rejected = encode(tokenizer, ex.prompt, ex.rejected, train_cfg.max_length, train_cfg.max_prompt_length)
        rows.append({"prompt_ids": chosen.prompt_ids, "chosen_ids": chosen.completion_ids,
                     "rejected_ids": rejected.completion_ids, "margin": ex.margin})
    return rows


class RewardTrainer(AlignTrainer):
    """The score head is a submodule of the model (`model.score_head`), so the optimizer trains it with
    the adapter; `_save` and `_load_from_checkpoint` carry it through checkpoints."""

    def __init__(self, *args, center_coef: float, **kwargs):
        super().__init__(*args, **kwargs)
        self.center_coef = center_coef

    def loss_and_metrics(self, model, batch):
        scores = heads.sequence_scores(model, model.score_head, batch["input_ids"], batch["attention_mask"])  # [2B]
        chosen, rejected = scores.chunk(2)
        loss = reward_loss(chosen, rejected, batch.get("margin"), self.center_coef)
        return loss, reward_metrics(chosen.detach(), rejected.detach())

    def batch_size_of(self, batch) -> int:
        return len(batch["input_ids"]) // 2

    def _save(self, output_dir=None, state_dict=None):
        super()._save(output_dir, state_dict)
        heads.save_head(self.model.score_head, output_dir or self.args.output_dir)

    def _load_from_checkpoint(self, resume_from_checkpoint, model=None):
        super()._load_from_checkpoint(resume_from_checkpoint, model)
        self.model.score_head.load_state_dict(heads.load_head(resume_from_checkpoint).state_dict())


def run(stage, ctx: StageContext, data) -> StageOutput:
    train_rows = encode_scored_pairs(data["train"].examples, ctx.tokenizer, stage.train)
    eval_rows = encode_scored_pairs(data["eval"].examples, ctx.tokenizer, stage.train) if data.get("eval") else None
    with ctx.host.policy(init=stage.init) as model:
        head = model.score_head = heads.new_head(heads.hidden_size(model)).to(model.device)
        out = fit(RewardTrainer, model, stage, ctx, train_rows, eval_rows, collate(ctx.tokenizer.pad_token_id),
                  center_coef=stage.loss.center_coef)
    if distributed.is_main():  # the adapter folder is the main process's (engine.fit)
        heads.save_head(head, out.adapter)
    return out


def heldout_summary(metrics: dict) -> dict:
    if "eval_accuracy" not in metrics:
        return {}
    return {"rewards": {"accuracy": metrics["eval_accuracy"], "margin": metrics["eval_margin"]}}


register(StageKind("rm", RMStageConfig, run, data="preference", produces="reward", heldout_pairs=True,
                   summary=heldout_summary, curves=("loss", "accuracy", "margin", "eval_loss", "eval_accuracy")))
