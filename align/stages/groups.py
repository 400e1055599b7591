"""The group batch that every preference stage (dpo, rank, kto) shares: encoding, the reference's cached log-probs,
the trainer and the objective around a registered preference loss.

A group is one prompt with K responses and a score for each (higher is better). A preference pair is a
group of two, so `dpo` (and `kto`) use the same encoding, reference cache and trainer as `rank`: a batch packs
each group into one row, its prompt encoded once for all K responses (`align.data.collate.pack_groups`),
and one forward gives every response's summed log-prob, laid out as [B, K] with a mask for groups smaller
than K.

The trainable `policy` starts from `init` (the SFT adapter) and the frozen reference is `reference` (default:
`init`), whose log-probs are computed once before training and cached in the stage folder and in the run's shared
cache (a sweep's trials score the same rows under the same SFT adapter once); no reference is loaded for a loss that
needs none (align.losses.preference: `needs_reference`).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from align import distributed
from align.data.collate import encode, pack_groups
from align.losses.preference import PreferenceLoss, best_and_worst, pick
from align.losses.rank import ranking_metrics
from align.losses.sft import sft_loss
from align.method_configs import ReplayConfig
from align.models import adapters
from align.models.logprobs import packed_logprobs
from align.settings import StageConfig
from align.stages.engine import AlignTrainer, StageContext, StageOutput, device_batch_size, fit
from align.ui import work_progress

# (policy_logps [B, K], ref_logps [B, K] | None, lengths [B, K], scores [B, K], mask [B, K]) -> (loss, metrics)
Objective = Callable[..., tuple[torch.Tensor, dict[str, float]]]


@dataclass(kw_only=True)
class PreferenceStageConfig(StageConfig):
    """What the stages that train against a frozen reference (dpo, rank, kto) share."""

    reference: str | None = None  # frozen reference adapter; None = `init` (the SFT adapter), else the bare base
    precompute_ref: bool = True  # reference log-probs once before training, not every step
    replay: ReplayConfig | None = None  # earlier data mixed in against forgetting; None = none


def encode_groups(examples, tokenizer, train_cfg) -> list[dict]:
    """RankedExamples as rows {prompt_ids, responses: [ids per response], scores}."""
    rows = []
    for ex in examples:
        encoded = [encode(tokenizer, ex.prompt, r, train_cfg.max_length, train_cfg.max_prompt_length)
                   for r in ex.responses]
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


def attach_reference_logps(model, rows, ref, ctx: StageContext, batch_size: int, name: str,
                           reference: str | None) -> None:
    """The reference's log-probs on every row, from the stage folder's cache (a resumed stage), else the run's shared
    cache (another run, such as a sweep's other trial, scored the same rows under the same reference adapter on
    the same base), else computed and kept in both."""
    cache = ctx.stage_dir / f"ref_logps_{name}.pt"
    shared = ctx.shared_cache / f"ref_logps_{_reference_key(rows, reference, batch_size)}.pt" \
        if ctx.shared_cache and reference else None
    if cache.is_file():
        logps = torch.load(cache)
    elif shared and shared.is_file():
        logps = torch.load(shared)
    else:
        quiet = ctx.quiet or not distributed.is_main()  # one process shows the progress for all
        with work_progress(f"{ctx.stage_dir.name} reference log-probs ({name})", len(rows), quiet) as advance:
            logps = reference_logps(model, rows, ref, ctx.tokenizer.pad_token_id, batch_size, advance)
    for path in (cache, shared):
        if path and not path.is_file():
            path.parent.mkdir(parents=True, exist_ok=True)
            torch.save(logps, path.with_suffix(".tmp"))
            path.with_suffix(".tmp").replace(path)  # a kill mid-write must not leave a cache that looks valid
    for row, values in zip(rows, logps):
        row["ref_logps"] = values


def _reference_key(rows: list[dict], reference: str, batch_size: int) -> str:
    """What reference log-probs depend on besides the base: the reference adapter's weights, the encoded rows, and the
    batch size (padding changes the last bits)."""
    digest = hashlib.sha256()
    for weights in sorted(Path(reference).glob("*.safetensors")):
        digest.update(weights.read_bytes())
    digest.update(json.dumps([[r["prompt_ids"], r["responses"]] for r in rows]).encode())
    digest.update(str(batch_size).encode())
    return digest.hexdigest()[:24]


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


def prepare(model, stage, ctx: StageContext, train_rows, eval_rows, needs_ref: bool):
    """Where the loss needs one, the frozen reference next to the policy (`reference`, else `init`; the bare base
    only when neither is given), with its log-probs cached on the rows. Returns (the reference's adapter name or
    None, what the reference is)."""
    if not needs_ref:
        return None, "none (reference-free loss)"
    reference = stage.reference or stage.init
    ref = None
    if reference:
        adapters.add_frozen(model, reference, adapters.REF)
        ref = adapters.REF
    if stage.precompute_ref:
        for name, rows in (("train", train_rows), ("eval", eval_rows)):
            if rows:
                attach_reference_logps(model, rows, ref, ctx, device_batch_size(stage), name, reference)
        if ref:
            model.delete_adapter(ref)  # every log-prob it can give is cached; free its memory
            ref = None
    return ref, reference or "base (adapters disabled)"


def run_groups(stage, ctx: StageContext, train_rows, eval_rows, loss: PreferenceLoss) -> StageOutput:
    """Train `loss` (align.losses.preference) on group rows, against the reference when the loss needs one."""
    with ctx.host.policy(init=stage.init) as model:
        ref, reference = prepare(model, stage, ctx, train_rows, eval_rows, loss.needs_reference)
        out = fit(GroupTrainer, model, stage, ctx, train_rows, eval_rows, collate_groups(ctx.tokenizer.pad_token_id),
                  objective=preference_objective(loss), ref=ref, needs_ref=loss.needs_reference)
    out.extra["reference"] = reference
    return out


def preference_objective(loss: PreferenceLoss) -> Objective:
    """The stage's loss, plus the NLL of each group's best response where the loss asks for it; logged with the
    ranking metrics of the loss's implicit rewards."""

    def objective(logps, ref_logps, lengths, scores, mask):
        losses, metrics = loss.losses(logps, ref_logps, lengths, scores, mask)
        metrics.update(ranking_metrics(loss.implicit_reward(logps.detach(), ref_logps, lengths), scores, mask))
        total = losses.mean()
        if loss.added_nll_weight:
            best = best_and_worst(scores, mask)[0]  # [B]
            nll = sft_loss(pick(logps, best), pick(lengths, best))
            total = total + loss.added_nll_weight * nll
            metrics["nll_loss"] = float(nll.detach())
        return total, metrics

    return objective


def loss_reward(stage):
    """The implicit reward of a preference stage's loss: what eval scores its held-out pairs with."""
    return stage.loss.build()


def ranking_summary(metrics: dict) -> dict:
    """How well the implicit rewards order whole held-out groups."""
    if "eval_rank/kendall_tau" not in metrics:
        return {}
    return {"rewards": {"rank_accuracy": metrics["eval_rank/accuracy"],
                        "kendall_tau": metrics["eval_rank/kendall_tau"]}}
