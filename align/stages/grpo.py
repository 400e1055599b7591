"""The `grpo` stage: critic-free online RL (GRPO, Dr. GRPO, RLOO; align.losses.grpo) with G samples per prompt.

The policy is a LoRA adapter on the one frozen base, as in every stage; with `kl_coef > 0` the reference
(`reference`, default `init`) is a frozen adapter beside it, and with `kl_coef: 0` none is loaded. There is no
value model. Each step (align.stages.online) samples G completions for each of `prompts_per_step` prompts, scores
them with the stage's rewards (rule cards, learned reward models, weighted), turns each prompt's G rewards into
advantages, and runs `num_iterations` passes of clipped updates over shuffled minibatches of the completions.
Dropout is off while sampling and updating, so the first pass's ratios are exactly 1. Metrics carry TRL's names.

Under a launcher (`accelerate launch`, align.distributed) `prompts_per_step` and `minibatch_size` are global, as
`train.batch_size` is for the other stages, and a run trains on the same minibatches whatever the number of processes
W: each process samples and scores the groups of its contiguous share of the step's prompts (dynamic sampling fills
each share on its own), then all gather all the groups and compute every advantage and metric as one process would;
each process takes its share of every minibatch (the main process draws their order) and the gradients are averaged.
The processes sample with streams of their own (seed + rank), as TRL's GRPOTrainer does, not to repeat each other.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field
from functools import partial

import torch
from accelerate.utils import gather
from peft import get_peft_model_state_dict, set_peft_model_state_dict
from transformers import get_scheduler

from align import distributed
from align.errors import AlignError, DataError
from align.losses.grpo import group_advantages
from align.method_configs import GRPOConfig
from align.models import adapters
from align.models.tokens import encode_prompt
from align.rewards.weighted import WeightedRewards, load_weighted, require_rules
from align.stages.engine import StageContext, StageOutput
from align.stages.grpo_rollout import Groups, dynamic_groups, gathered, grouped_logprobs, sample_groups
from align.stages.kind import StageKind, register
from align.stages.online import OnlineStageConfig, heldout_rewards, init_and_final, train_online


@dataclass(kw_only=True)
class GRPOStageConfig(OnlineStageConfig):
    """Online RL with G sampled completions per prompt and group-relative advantages; no value model."""

    kind: str = "grpo"
    grpo: GRPOConfig = field(default_factory=GRPOConfig)  # its reference is loaded only with kl_coef > 0


@dataclass
class Rollout:
    groups: Groups  # N = prompts * G completions of all processes, a prompt's G adjacent
    old_logps: torch.Tensor | None  # [N, R] under the policy that sampled; None: the update's own, detached
    ref_logps: torch.Tensor | None  # [N, R] under the reference, where there is one
    advantages: torch.Tensor  # [N]


class GRPO:
    """GRPO as an online algorithm (align.stages.online)."""

    def __init__(self, model, rewards: WeightedRewards, tokenizer, examples, prompts: list[list[int]],
                 stage: GRPOStageConfig, steps: int, seed: int, ref: str | None, replay=None):
        cfg, train = stage.grpo, stage.train
        self.model, self.rewards, self.tokenizer, self.cfg, self.ref, self.replay = (model, rewards, tokenizer, cfg,
                                                                                     ref, replay)
        self.examples, self.prompts, self.batch_size, self.seed = examples, prompts, cfg.prompts_per_step, seed
        self.loss = cfg.loss()
        self.params = [p for n, p in model.named_parameters() if f".{adapters.POLICY}." in n and "lora_" in n]
        self.optimizer = torch.optim.AdamW(self.params, lr=train.lr, eps=1e-5, weight_decay=train.weight_decay)
        completions = cfg.prompts_per_step * cfg.num_generations
        updates = steps * cfg.num_iterations * (completions // cfg.minibatch_size)
        self.scheduler = get_scheduler(train.lr_scheduler, self.optimizer, round(train.warmup_ratio * updates),
                                       updates)

    @torch.no_grad()
    def experience(self, batch: list[int], step: int):
        cfg, G = self.cfg, self.cfg.num_generations
        self.model.eval()

        def sample_prompts(prompts: list[int]) -> Groups:
            return sample_groups(self.model, self.tokenizer, self.rewards, self.examples, self.prompts, prompts, cfg)

        share, metrics = distributed.share(batch), {}
        if cfg.dynamic_sampling:
            # The extra prompts depend only on the seed and the step, as the batch does: each round every process
            # draws what one process would and samples its share of it.
            draws = torch.Generator().manual_seed(self.seed + 1_000_003 * (step + 1))
            groups, metrics = dynamic_groups(
                sample_prompts, share, lambda _: distributed.share(
                    torch.randperm(len(self.prompts), generator=draws)[: len(batch)].tolist()),
                len(share), cfg.max_resample_rounds, self.tokenizer.pad_token_id)
            metrics = distributed.mean(metrics)
        else:
            groups = sample_prompts(share)
        groups = gathered(groups, self.tokenizer.pad_token_id)
        qr, mask, width = groups.query_response, groups.mask, groups.prompt_width

        def logprobs() -> torch.Tensor:  # [N, R] each process scores the rows of its own share
            return gather(self.logprobs(groups, distributed.share(torch.arange(qr.shape[0]))))

        # With one update per rollout the policy that sampled is the one updated: its log-probs come from the update's
        # own forward (ratio exactly 1), as TRL does, and a forward over the whole batch is saved. RLOO's KL term needs
        # them before the update.
        one_update = cfg.num_iterations == 1 and cfg.minibatch_size >= qr.shape[0]
        old_logps = None if one_update and not (cfg.advantage == "rloo" and cfg.kl_coef > 0) else logprobs()
        ref_logps = None
        if cfg.kl_coef > 0:  # the reference adapter, or the bare base when the stage starts from it
            with adapters.using(self.model, self.ref):
                ref_logps = logprobs()
        for label, scores in groups.rewards.items():
            metrics[f"rewards/{label}/mean"] = float(scores.mean())
            metrics[f"rewards/{label}/std"] = float(scores.std())
        kl = ((old_logps - ref_logps) * mask).sum(1).cpu() if ref_logps is not None and old_logps is not None else None
        advantages = group_advantages(groups.total, G, cfg.advantage, kl, cfg.kl_coef)
        group_std = groups.group_std()
        ended = ((qr[:, width:] == self.tokenizer.eos_token_id) & (mask > 0)).any(1)
        metrics.update({
            "reward": float(groups.total.mean()),
            "reward_std": float(group_std.mean()),
            "frac_reward_zero_std": float(torch.isclose(group_std, torch.zeros_like(group_std)).float().mean()),
            "completions/mean_length": float(mask.sum(1).mean()),
            "completions/clipped_ratio": float((~ended).float().mean()),
        })
        return Rollout(groups, old_logps, ref_logps, advantages.to(qr.device)), metrics

    def logprobs(self, groups: Groups, rows: torch.Tensor) -> torch.Tensor:
        """[len(rows), R] under the active adapter, each prompt's completions packed behind one copy of it."""
        return grouped_logprobs(self.model, groups, rows, self.tokenizer.pad_token_id, self.cfg.temperature)

    def update(self, rollout: Rollout, step: int) -> dict[str, float]:
        """`num_iterations` passes of clipped updates over shuffled minibatches; metrics averaged over them (and over
        the processes, each of which holds its share of every minibatch)."""
        cfg, stats = self.cfg, defaultdict(list)
        self.model.eval()  # dropout off, as while sampling: the ratios compare the same function
        groups = rollout.groups
        size = groups.query_response.shape[0]
        minibatches = size // cfg.minibatch_size
        for iteration in range(cfg.num_iterations):
            order = distributed.broadcast(torch.randperm(size))  # the main process's: the same minibatches in all
            for i, minibatch in enumerate(order.split(cfg.minibatch_size)):
                idx = distributed.share(minibatch)
                logps = self.logprobs(groups, idx)
                ref = rollout.ref_logps[idx] if rollout.ref_logps is not None else None
                tokens = groups.mask[minibatch].sum() / distributed.world_size()
                old = rollout.old_logps[idx] if rollout.old_logps is not None else logps.detach()
                loss, metrics = self.loss(logps, old, rollout.advantages[idx], groups.mask[idx], ref, tokens)
                if self.replay is not None:
                    # Every process adds the buffer sequences that one process adds to the whole minibatch: averaged
                    # over the processes, the replay term is one process's, at the price of W forwards.
                    ptx, ptx_stats = self.replay.loss(self.model, (step * cfg.num_iterations + iteration) * minibatches
                                                      + i, len(minibatch))
                    loss = loss + ptx
                    metrics.update(ptx_stats)
                loss.backward()
                distributed.average_gradients(self.params)  # the log-probs bypass a DDP wrapper's forward
                torch.nn.utils.clip_grad_norm_(self.params, cfg.max_grad_norm)
                self.optimizer.step()
                self.scheduler.step()
                self.optimizer.zero_grad(set_to_none=True)
                stats["loss"].append(float(loss.detach()))
                for key, value in metrics.items():
                    stats[key].append(value)
        out = distributed.mean({key: sum(values) / len(values) for key, values in stats.items()})
        out["lr"] = self.scheduler.get_last_lr()[0]
        return out

    def state_dict(self) -> dict:
        return {"policy": get_peft_model_state_dict(self.model, adapter_name=adapters.POLICY),
                "optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        set_peft_model_state_dict(self.model, state["policy"], adapter_name=adapters.POLICY)
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])


def check_shares(stage: GRPOStageConfig) -> None:
    """The step's prompts and each minibatch divide evenly among the processes (whole groups in each share)."""
    processes = distributed.world_size()
    for key in ("prompts_per_step", "minibatch_size"):
        value = getattr(stage.grpo, key)
        if value % processes:
            raise AlignError(f"stages.{stage.name}.grpo.{key}: {value} is the global count of all {processes} "
                             f"processes and must divide evenly among them; make it a multiple of {processes}")


def run(stage, ctx: StageContext, data) -> StageOutput:
    with ctx.host.policy(init=stage.init) as model:
        return train_grpo(model, stage, ctx, data)


def train_grpo(model, stage: GRPOStageConfig, ctx: StageContext, data) -> StageOutput:
    cfg, train = stage.grpo, stage.train
    check_shares(stage)
    reference = (stage.reference or stage.init) if cfg.kl_coef > 0 else None
    if reference:
        adapters.add_frozen(model, reference, adapters.REF)
    rewards = load_weighted(stage.rewards, model, ctx.tokenizer, (train.max_length, train.max_prompt_length))
    model.set_adapter(adapters.POLICY)
    for loaded in (data["train"], data.get("eval")):
        if loaded:
            require_rules(rewards, loaded)
    examples = data["train"].examples
    if len(examples) < cfg.prompts_per_step:
        raise DataError(f"{len(examples)} prompts, fewer than grpo.prompts_per_step ({cfg.prompts_per_step})",
                        file=data["train"].source)
    prompts = [encode_prompt(ctx.tokenizer, ex.prompt)[-train.max_prompt_length :] for ex in examples]
    per_epoch = len(examples) // cfg.prompts_per_step
    steps = train.max_steps if train.max_steps > 0 else max(1, round(train.epochs * per_epoch))
    seed = train.seed if train.seed is not None else ctx.seed
    if distributed.rank():  # after the adapters, which must start the same in every process
        torch.manual_seed(seed + distributed.rank())
    algorithm = GRPO(model, rewards, ctx.tokenizer, examples, prompts, stage, steps, seed,
                     adapters.REF if reference else None, ctx.replay)
    evaluate = data.get("eval") and (lambda: heldout_rewards(model, rewards, ctx.tokenizer, data["eval"],
                                                             cfg.max_new_tokens, cfg.minibatch_size, ctx.quiet))
    ctx.prepared()
    metrics, resumed, stopping, done = train_online(algorithm, stage, ctx, len(examples), steps, seed, evaluate)
    adapter = ctx.stage_dir / "adapter"
    if distributed.is_main():  # every process holds the same trained adapter
        adapters.save(model, adapter, adapters.POLICY)
    return StageOutput.stopped(adapter, metrics, str(resumed) if resumed else None, stopping, done)


register(StageKind("grpo", GRPOStageConfig, run, data="prompt", summary=partial(init_and_final, "grpo_scores"),
                   check_shares=check_shares,
                   curves=("reward", "kl", "completions/mean_length", "replay/nll")))
