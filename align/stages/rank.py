"""The `rank` stage: listwise preference optimisation over K ranked (or scored, with ties) responses
per prompt, and the group batch that every preference stage shares.

A group is one prompt with K responses and a score for each (higher is better). A preference pair is a
group of two, so `dpo` (and `kto`) use this file's encoding, reference cache and trainer: a batch packs
each group into one row, its prompt encoded once for all K responses (`align.data.collate.pack_groups`),
and one forward gives every response's summed log-prob, laid out as [B, K] with a mask for groups smaller
than K.

As in `dpo`, the trainable `policy` starts from `init` (the SFT adapter) and the frozen reference is
`reference` (default: `init`), whose log-probs are computed once before training and cached in the stage
folder. The losses (`align.losses.rank`): Plackett–Luce listwise DPO, LiPO-λ, PRO and RRHF; the last two
are reference-free, so no reference is loaded for them.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from align import distributed
from align.data.collate import encode, pack_groups
from align.losses import rank as rank_losses
from align.losses.sft import sft_loss
from align.models import adapters
from align.models.logprobs import packed_logprobs
from align.stages.engine import AlignTrainer, StageContext, StageOutput, device_batch_size, fit
from align.ui import work_progress

REFERENCE_FREE = {"pro", "rrhf"}

# (policy_logps [B, K], ref_logps [B, K] | None, lengths [B, K], scores [B, K], mask [B, K]) -> (loss, metrics)
Objective = Callable[..., tuple[torch.Tensor, dict[str, float]]]


def encode_groups(examples, tokenizer, train_cfg) -> list[dict]:
    """RankedExamples as rows {prompt_ids, responses: [ids per response], scores}."""
    rows = []
    for ex in examples:
        encoded = [encode(tokenizer, ex.prompt, r, train_cfg.max_length, train_cfg.max_prompt_length) for r in ex.responses]
        rows.append({"prompt_ids": encoded[0].prompt_ids, "responses": [e.completion_ids for e in encoded],
                     "scores": [float(s) for s in ex.scores]})
    return rows


def _padded(values: list[list[float]], width: int) -> torch.Tensor:
    return torch.tensor([v + [0.0] * (width - len(v)) for v in values])


def collate_groups(pad_id: int):
    """Each group packed into one row, its prompt encoded once for all its responses (`pack_groups`);
    `scores`, `group_mask` (and cached `ref_logps`) are [B, K], with K the largest group of the batch."""

    def fn(rows: list[dict]) -> dict:
        batch = pack_groups([(r["prompt_ids"], r["responses"]) for r in rows], pad_id)
        width = max(len(r["responses"]) for r in rows)
        batch["group_mask"] = torch.tensor([[k < len(r["responses"]) for k in range(width)] for r in rows])
        batch["scores"] = _padded([r["scores"] for r in rows], width)
        if "ref_logps" in rows[0]:
            batch["ref_logps"] = _padded([r["ref_logps"] for r in rows], width)
        return batch

    return fn


def group_logps(model, batch) -> tuple[torch.Tensor, torch.Tensor]:
    """[B, K] summed log-probs and token counts of every response; 0 where the group is padded."""
    return packed_logprobs(model, batch, batch["group_mask"].shape[1])


@torch.no_grad()
def reference_logps(model, rows: list[dict], ref: str | None, pad_id: int, batch_size: int,
                    on_batch: Callable[[int], None] = lambda n: None) -> list[list[float]]:
    """Each row's response log-probs under adapter `ref` (None: adapters disabled); `on_batch(rows)` after each
    batch."""
    was_training = model.training
    model.eval()
    out = []
    with adapters.using(model, ref):
        for i in range(0, len(rows), batch_size):
            batch = collate_groups(pad_id)(rows[i : i + batch_size])
            logps, _ = group_logps(model, batch)
            out += [row[mask].tolist() for row, mask in zip(logps, batch["group_mask"])]
            on_batch(len(batch["group_mask"]))
    model.train(was_training)
    return out


def attach_reference_logps(model, rows, ref, ctx: StageContext, batch_size: int, name: str) -> None:
    cache = ctx.stage_dir / f"ref_logps_{name}.pt"
    if cache.is_file():
        logps = torch.load(cache)
    else:
        quiet = ctx.quiet or not distributed.is_main()  # one process shows the progress for all
        with work_progress(f"{ctx.stage_dir.name} reference log-probs ({name})", len(rows), quiet) as advance:
            logps = reference_logps(model, rows, ref, ctx.tokenizer.pad_token_id, batch_size, advance)
        torch.save(logps, cache.with_suffix(".tmp"))
        cache.with_suffix(".tmp").replace(cache)  # a kill mid-write must not leave a cache that looks valid
    for row, values in zip(rows, logps):
        row["ref_logps"] = values


def best_and_worst(scores: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """[B] index of each group's first best and last worst response (scores, mask: [B, K])."""
    big = torch.finfo(scores.dtype).max
    best = scores.masked_fill(~mask, -big).argmax(1)  # argmax gives the first of equal maxima
    worst = scores.shape[1] - 1 - scores.masked_fill(~mask, big).flip(1).argmin(1)
    return best, worst


class GroupTrainer(AlignTrainer):
    """Scores every response of a group batch under the policy (and, unless cached, the reference) and
    hands them to the stage's objective."""

    def __init__(self, *args, objective: Objective, ref: str | None, needs_ref: bool, **kwargs):
        super().__init__(*args, **kwargs)
        self.objective, self.ref, self.needs_ref = objective, ref, needs_ref

    def loss_and_metrics(self, model, batch):
        logps, lengths = group_logps(model, batch)
        ref_logps = batch.get("ref_logps")
        if self.needs_ref and ref_logps is None:
            with torch.no_grad(), adapters.using(model, self.ref):
                ref_logps, _ = group_logps(model, batch)
        return self.objective(logps, ref_logps, lengths, batch["scores"], batch["group_mask"])

    def batch_size_of(self, batch) -> int:
        return len(batch["scores"])

    def sequences_in(self, batch) -> int:
        return int(batch["group_mask"].sum())  # a packed row holds a whole group


def prepare(stage, ctx: StageContext, train_rows, eval_rows, needs_ref: bool):
    """The policy (from `init`) on the base and, where the loss needs one, the frozen reference
    (`reference`, else `init`; the bare base only when neither is given) with its log-probs cached on
    the rows. Returns (model, the reference's adapter name or None, what the reference is)."""
    model = adapters.with_policy(ctx.base, ctx.recipe.model.lora, init=stage.init)
    if not needs_ref:
        return model, None, "none (reference-free loss)"
    reference = stage.reference or stage.init
    ref = None
    if reference:
        adapters.add_frozen(model, reference, adapters.REF)
        ref = adapters.REF
    if stage.precompute_ref:
        for name, rows in (("train", train_rows), ("eval", eval_rows)):
            if rows:
                attach_reference_logps(model, rows, ref, ctx, device_batch_size(stage), name)
        if ref:
            model.delete_adapter(ref)  # every log-prob it can give is cached; free its memory
            ref = None
    return model, ref, reference or "base (adapters disabled)"


def run_groups(stage, ctx: StageContext, train_rows, eval_rows, objective: Objective, needs_ref: bool) -> StageOutput:
    model, ref, reference = prepare(stage, ctx, train_rows, eval_rows, needs_ref)
    out = fit(GroupTrainer, model, stage, ctx, train_rows, eval_rows, collate_groups(ctx.tokenizer.pad_token_id),
              objective=objective, ref=ref, needs_ref=needs_ref)
    out.extra["reference"] = reference
    return out


def rank_objective(loss_cfg) -> Objective:
    own_sft = loss_cfg.type in REFERENCE_FREE  # pro and rrhf: the NLL of the best response is part of the loss
    sft_weight = loss_cfg.sft_weight if loss_cfg.sft_weight is not None else float(own_sft)

    def objective(logps, ref_logps, lengths, scores, mask):
        if loss_cfg.type == "plackett_luce":
            out = rank_losses.plackett_luce_loss(logps, ref_logps, scores, mask, beta=loss_cfg.beta)
        elif loss_cfg.type == "lipo":
            out = rank_losses.lipo_lambda_loss(logps, ref_logps, scores, mask, beta=loss_cfg.beta)
        elif loss_cfg.type == "pro":
            out = rank_losses.pro_loss(logps, lengths, scores, mask, sft_weight=sft_weight)
        else:
            out = rank_losses.rrhf_loss(logps, lengths, scores, mask, sft_weight=sft_weight)
        loss, metrics = out.losses.mean(), rank_losses.ranking_metrics(out.rewards, scores, mask)
        if sft_weight and not own_sft:
            best = best_and_worst(scores, mask)[0][:, None]  # [B, 1]
            nll = sft_loss(logps.gather(1, best), lengths.gather(1, best))
            loss = loss + sft_weight * nll
            metrics["nll_loss"] = float(nll.detach())
        return loss, metrics

    return objective


def run(stage, ctx: StageContext, data) -> StageOutput:
    train_rows = encode_groups(data["train"].examples, ctx.tokenizer, stage.train)
    eval_rows = encode_groups(data["eval"].examples, ctx.tokenizer, stage.train) if data.get("eval") else None
    return run_groups(stage, ctx, train_rows, eval_rows, rank_objective(stage.loss),
                      needs_ref=stage.loss.type not in REFERENCE_FREE)
