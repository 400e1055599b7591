"""The `dpo` stage: the `policy` adapter starts as a copy of the SFT adapter (`init`) and is trained
against a frozen reference on the same 4-bit base.

The reference is the adapter named by `reference` (default: `init`, i.e. the SFT adapter), loaded frozen
as `ref`; only when neither is given (no SFT stage ran) is it the base with adapters disabled. With
`precompute_ref` (default) reference log-probs are computed once before training, cached in the stage
folder (reused on resume), and the `ref` adapter is dropped from memory.
"""

from __future__ import annotations

import torch

from align.data.collate import encode, pad_sequences
from align.losses.dpo import dpo_loss, dpo_metrics, uses_mean_logps
from align.losses.sft import sft_loss
from align.models import adapters
from align.models.logprobs import completion_logprobs
from align.stages.engine import AlignTrainer, StageContext, StageOutput, fit


def encode_pairs(examples, tokenizer, train_cfg) -> list[dict]:
    rows = []
    for ex in examples:
        chosen = encode(tokenizer, ex.prompt, ex.chosen, train_cfg.max_length, train_cfg.max_prompt_length)
        rejected = encode(tokenizer, ex.prompt, ex.rejected, train_cfg.max_length, train_cfg.max_prompt_length)
        rows.append({"prompt_ids": chosen.prompt_ids, "chosen_ids": chosen.completion_ids, "rejected_ids": rejected.completion_ids})
    return rows


def collate(pad_id: int):
    """Chosen then rejected in one batch [2B, T], so the policy runs one forward per step."""

    def fn(rows: list[dict]) -> dict:
        pairs = [(r["prompt_ids"], r["chosen_ids"]) for r in rows] + [(r["prompt_ids"], r["rejected_ids"]) for r in rows]
        batch = pad_sequences(pairs, pad_id)
        if "ref_chosen" in rows[0]:
            batch["ref_chosen"] = torch.tensor([r["ref_chosen"] for r in rows])
            batch["ref_rejected"] = torch.tensor([r["ref_rejected"] for r in rows])
        return batch

    return fn


def pair_logps(model, batch, mean: bool):
    """[B] chosen and [B] rejected sequence log-probs (summed, or averaged per token when `mean`),
    and the chosen NLL per token (a scalar, for the RPO term)."""
    sums, counts = completion_logprobs(model, batch["input_ids"], batch["attention_mask"], batch["completion_mask"])
    logps = sums / counts.clamp(min=1) if mean else sums
    half = logps.shape[0] // 2
    return logps[:half], logps[half:], sft_loss(sums[:half], counts[:half])


@torch.no_grad()
def reference_logps(model, rows: list[dict], ref: str | None, pad_id: int, batch_size: int, mean: bool) -> torch.Tensor:
    """[N, 2] reference (chosen, rejected) log-probs under adapter `ref` (None: adapters disabled)."""
    was_training = model.training
    model.eval()
    out = []
    with adapters.using(model, ref):
        for i in range(0, len(rows), batch_size):
            chosen, rejected, _ = pair_logps(model, collate(pad_id)(rows[i : i + batch_size]), mean)
            out.append(torch.stack([chosen, rejected], dim=1))
    model.train(was_training)
    return torch.cat(out)


class DPOTrainer(AlignTrainer):
    def __init__(self, *args, loss_cfg, ref: str | None, **kwargs):
        super().__init__(*args, **kwargs)
        self.loss_cfg, self.ref = loss_cfg, ref
        self.mean = uses_mean_logps(loss_cfg.type)

    def loss_and_metrics(self, model, batch):
        chosen, rejected, chosen_nll = pair_logps(model, batch, self.mean)
        if "ref_chosen" in batch:
            ref_chosen, ref_rejected = batch["ref_chosen"], batch["ref_rejected"]
        else:
            with torch.no_grad(), adapters.using(model, self.ref):
                ref_chosen, ref_rejected, _ = pair_logps(model, batch, self.mean)
        out = dpo_loss(
            chosen, rejected, ref_chosen, ref_rejected,
            beta=self.loss_cfg.beta, loss_type=self.loss_cfg.type, label_smoothing=self.loss_cfg.label_smoothing,
        )
        metrics = dpo_metrics(out, chosen.detach(), rejected.detach())
        loss = out.losses.mean()
        if self.loss_cfg.rpo_alpha:
            loss = loss + self.loss_cfg.rpo_alpha * chosen_nll
            metrics["nll_loss"] = float(chosen_nll.detach())
        return loss, metrics

    def batch_size_of(self, batch) -> int:
        return len(batch["input_ids"]) // 2


def attach_reference_logps(model, rows, ref, ctx: StageContext, stage, name: str) -> None:
    cache = ctx.stage_dir / f"ref_logps_{name}.pt"
    if cache.is_file():
        logps = torch.load(cache)
    else:
        mean = uses_mean_logps(stage.loss.type)
        logps = reference_logps(model, rows, ref, ctx.tokenizer.pad_token_id, stage.train.batch_size, mean)
        torch.save(logps, cache.with_suffix(".tmp"))
        cache.with_suffix(".tmp").replace(cache)  # a kill mid-write must not leave a cache that looks valid
    for row, (c, r) in zip(rows, logps.tolist()):
        row["ref_chosen"], row["ref_rejected"] = c, r


def run(stage, ctx: StageContext, data) -> StageOutput:
    init = stage.init
    reference = stage.reference or init
    model = adapters.with_policy(ctx.base, ctx.recipe.model.lora, init=init)
    ref = None
    if reference:
        adapters.add_frozen(model, reference, adapters.REF)
        ref = adapters.REF
    train_rows = encode_pairs(data["train"].examples, ctx.tokenizer, stage.train)
    eval_rows = encode_pairs(data["eval"].examples, ctx.tokenizer, stage.train) if data.get("eval") else None
    if stage.precompute_ref:
        attach_reference_logps(model, train_rows, ref, ctx, stage, "train")
        if eval_rows:
            attach_reference_logps(model, eval_rows, ref, ctx, stage, "eval")
        if ref:
            model.delete_adapter(ref)  # every log-prob it can give is cached; free its memory
            ref = None
    out = fit(DPOTrainer, model, stage, ctx, train_rows, eval_rows, collate(ctx.tokenizer.pad_token_id), loss_cfg=stage.loss, ref=ref)
    out.extra["reference"] = reference or "base (adapters disabled)"
    return out
