"""The `sft` stage: a LoRA `policy` adapter trained on completions only (the prompt is context)."""

from __future__ import annotations

from dataclasses import dataclass

from align.data.collate import encode
from align.losses.sft import sft_loss
from align.models.logprobs import completion_logprobs
from align.models.tokens import pad_sequences
from align.settings import StageConfig
from align.stages.engine import AlignTrainer, StageContext, StageOutput, fit
from align.stages.kind import StageKind, register


@dataclass(kw_only=True)
class SFTStageConfig(StageConfig):
    """Supervised fine-tuning on conversations; the loss is on completions only."""

    kind: str = "sft"


def encode_sft(examples, tokenizer, train_cfg) -> list[dict]:
    rows = []
    for ex in examples:
        enc = encode(tokenizer, ex.prompt, ex.completion, train_cfg.max_length, train_cfg.max_prompt_length)
        rows.append({"prompt_ids": enc.prompt_ids, "completion_ids": enc.completion_ids})
    return rows


class SFTTrainer(AlignTrainer):
    def loss_and_metrics(self, model, batch):
        logps, tokens = completion_logprobs(model, batch["input_ids"], batch["attention_mask"],
                                            batch["completion_mask"])
        loss = sft_loss(logps, tokens)
        return loss, {"num_tokens": float(tokens.sum())}


def collate(pad_id: int):
    return lambda rows: pad_sequences([(r["prompt_ids"], r["completion_ids"]) for r in rows], pad_id)


def run(stage, ctx: StageContext, data) -> StageOutput:
    """`data` is {"train": LoadedData, "eval": LoadedData | None}, loaded (and fingerprinted) by the pipeline."""
    train_rows = encode_sft(data["train"].examples, ctx.tokenizer, stage.train)
    eval_rows = encode_sft(data["eval"].examples, ctx.tokenizer, stage.train) if data.get("eval") else None
    with ctx.host.policy(init=stage.init) as model:
        return fit(SFTTrainer, model, stage, ctx, train_rows, eval_rows, collate(ctx.tokenizer.pad_token_id))


register(StageKind("sft", SFTStageConfig, run, data="sft", demonstrations=True, curves=("loss", "eval_loss")))
