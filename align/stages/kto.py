"""The `kto` stage: Kahneman–Tversky optimisation on unpaired examples, each a prompt and one answer
labelled desirable or undesirable (pairs split into one of each also work).

Each example is a group of two answers to its prompt, as in `align.stages.groups`: its own answer (scored
1 if desirable, 0 if not) and the answer of another example, which only serves KTO's reference point z0,
an estimate of KL(policy || reference) from mismatched pairs (as TRL builds it). Unlike the other
preference stages, the two are batched as separate sequences rather than packed on one prompt: the
mismatched ones go through the policy without gradients, which costs less than a backward pass through
them. The reference and its cached log-probs are those of `dpo`.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from align.data.collate import encode
from align.losses.dpo import KTOLoss, kto_kl_estimate
from align.method_configs import KTOLossConfig
from align.models import adapters
from align.models.logprobs import completion_logprobs
from align.models.tokens import pad_sequences
from align.stages.engine import StageContext, StageOutput, fit
from align.stages.groups import GroupTrainer, PreferenceStageConfig, loss_reward, prepare
from align.stages.kind import StageKind, register

SEQUENCE_KEYS = ("input_ids", "attention_mask", "completion_mask")


@dataclass(kw_only=True)
class KTOStageConfig(PreferenceStageConfig):
    """KTO on unpaired answers labelled desirable or undesirable (pairs count as one of each)."""

    kind: str = "kto"
    loss: KTOLossConfig = field(default_factory=KTOLossConfig)


def _mismatched(examples, i: int):
    """The answer of the next example with another prompt (pairs put two answers of one prompt side by side)."""
    for k in range(1, len(examples)):
        other = examples[(i + k) % len(examples)]
        if other.prompt != examples[i].prompt:
            return other.completion
    return examples[i].completion  # a single prompt: no mismatched pair exists


def encode_unpaired(examples, tokenizer, train_cfg) -> list[dict]:
    """Rows {prompt_ids, responses: [own answer, another prompt's answer], scores: [desirable, 0]}."""
    rows = []
    for i, ex in enumerate(examples):
        own = encode(tokenizer, ex.prompt, ex.completion, train_cfg.max_length, train_cfg.max_prompt_length)
        mismatched = encode(tokenizer, ex.prompt, _mismatched(examples, i), train_cfg.max_length,
                            train_cfg.max_prompt_length)
        rows.append({"prompt_ids": own.prompt_ids, "responses": [own.completion_ids, mismatched.completion_ids],
                     "scores": [float(ex.desirable), 0.0]})
    return rows


def collate_unpaired(pad_id: int):
    """Own and mismatched answers as [2B, T] sequences, alternating; `scores` (and cached `ref_logps`) [B, 2]."""

    def fn(rows: list[dict]) -> dict:
        batch = pad_sequences([(r["prompt_ids"], answer) for r in rows for answer in r["responses"]], pad_id)
        batch["scores"] = torch.tensor([r["scores"] for r in rows])
        batch["group_mask"] = torch.ones(batch["scores"].shape, dtype=torch.bool)
        if "ref_logps" in rows[0]:
            batch["ref_logps"] = torch.tensor([r["ref_logps"] for r in rows])
        return batch

    return fn


class KTOTrainer(GroupTrainer):
    def __init__(self, *args, loss: KTOLoss, **kwargs):
        super().__init__(*args, objective=None, needs_ref=True, **kwargs)
        self.loss = loss

    def loss_and_metrics(self, model, batch):
        own = [batch[k][0::2] for k in SEQUENCE_KEYS]  # groups are (own answer, mismatched answer)
        mismatched = [batch[k][1::2] for k in SEQUENCE_KEYS]
        logps, _ = completion_logprobs(model, *own)  # [B]
        with torch.no_grad():
            kl_logps, _ = completion_logprobs(model, *mismatched)  # [B]
            ref_logps = batch.get("ref_logps")  # [B, 2]
            if ref_logps is None:
                with adapters.using(model, self.ref):
                    ref_logps = torch.stack([completion_logprobs(model, *own)[0],
                                             completion_logprobs(model, *mismatched)[0]], dim=1)
        kl = kto_kl_estimate(kl_logps, ref_logps[:, 1])
        desirable = batch["scores"][:, 0] > 0
        out = self.loss.losses(logps, ref_logps[:, 0], desirable, kl)
        metrics = {"kl": float(kl)}
        for name, chosen in (("chosen", desirable), ("rejected", ~desirable)):
            if chosen.any():
                metrics[f"rewards/{name}"] = out.rewards[chosen].mean().item()
                metrics[f"logps/{name}"] = logps[chosen].detach().mean().item()
        return out.losses.mean(), metrics

    def sequences_in(self, batch) -> int:
        return len(batch["scores"])  # the own answers: the mismatched half only feeds z0, without gradient


def run(stage, ctx: StageContext, data) -> StageOutput:
    train_rows = encode_unpaired(data["train"].examples, ctx.tokenizer, stage.train)
    eval_rows = encode_unpaired(data["eval"].examples, ctx.tokenizer, stage.train) if data.get("eval") else None
    with ctx.host.policy(init=stage.init) as model:
        ref, reference = prepare(model, stage, ctx, train_rows, eval_rows, needs_ref=True)
        out = fit(KTOTrainer, model, stage, ctx, train_rows, eval_rows, collate_unpaired(ctx.tokenizer.pad_token_id),
                  ref=ref, loss=stage.loss.build())
    out.extra["reference"] = reference
    return out


register(StageKind("kto", KTOStageConfig, run, data="unpaired", implicit_reward=loss_reward,
                   curves=("loss", "replay/nll", "eval_loss")))
