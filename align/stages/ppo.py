"""The `ppo` stage: PPO for RLHF with policy, value, reward and reference as adapters on one base.

Roles (all LoRA adapters on the one frozen, usually 4-bit, base; `align.models.adapters`):
- `policy`: trained, starts as `init` (the SFT adapter);
- `value`: trained, starts as `value_init`, by default the first reward model's adapter as in Huang et
  al. and OpenRLHF (else `init`), with a value head that starts at zero;
- `ref`: frozen KL reference, `reference` (default `init`);
- `reward<i>`: each learned reward's frozen adapter and score head; rule rewards need no weights.

Each step samples one rollout batch (`ppo_rollout.make_experience`), then runs `ppo_epochs` passes of
clipped policy and value updates over shuffled minibatches. Huang et al.'s details followed in the loop:
dropout off during rollouts and updates; Adam with eps 1e-5; the learning rate annealed over all
updates; gradients clipped per role; no entropy bonus; KL coefficient fixed, or adaptive towards
`kl_target` (Ziegler et al.). The policy and value losses are backpropagated one after the other because
switching the active adapter changes which LoRA weights require grad.

The steps run in align.stages.online's loop, whose checkpoints hold, besides every RNG and the step, the two trained
adapters, the value head, the optimizer and scheduler, the KL controller and the reward statistics. This is a
single-process loop.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field
from functools import partial

import torch
from peft import get_peft_model_state_dict, set_peft_model_state_dict
from transformers import get_scheduler

from align.errors import DataError
from align.losses.ppo import RunningMoments, kl_controller, policy_loss, value_loss
from align.method_configs import PPOConfig
from align.models import adapters, heads
from align.models.tokens import encode_prompt
from align.rewards.weighted import WeightedRewards, load_weighted, require_rules
from align.stages.engine import StageContext, StageOutput
from align.stages.kind import StageKind, register
from align.stages.online import OnlineStageConfig, heldout_rewards, init_and_final, train_online
from align.stages.ppo_rollout import make_experience, response_logprobs, response_values


@dataclass(kw_only=True)
class PPOStageConfig(OnlineStageConfig):
    """PPO against learned and/or rule-based rewards; policy, value, reward and reference are adapters
    on the one base. `data` holds prompts (any format with a prompt; a `rule` feeds rule rewards)."""

    kind: str = "ppo"
    value_init: str | None = None  # the value adapter's start; None = the first reward model's, else `init`
    ppo: PPOConfig = field(default_factory=PPOConfig)


@dataclass
class Roles:
    value_head: torch.nn.Linear
    rewards: WeightedRewards
    ref: str | None


def build_roles(model, stage, ctx: StageContext):
    """Every other role's adapter next to the `policy` one on the shared base, and the roles' heads and rewards."""
    reference = stage.reference or stage.init
    if reference:
        adapters.add_frozen(model, reference, adapters.REF)
    lengths = (stage.train.max_length, stage.train.max_prompt_length)  # held-out replies are scored as texts
    rewards = load_weighted(stage.rewards, model, ctx.tokenizer, lengths)
    learned = [source.adapter_folder for source in stage.rewards if source.adapter_folder]
    value_init = stage.value_init or (learned[0] if learned else stage.init)
    if value_init:
        model.load_adapter(value_init, adapter_name=adapters.VALUE, is_trainable=True)
    else:
        model.add_adapter(adapters.VALUE, adapters.lora_config(ctx.host.model_cfg.lora))
    # The head starts at 0 even on the reward adapter: scores are normalised to mean 0 during PPO, so a
    # copy of the reward head would start every value off by the reward model's raw mean.
    value_head = heads.new_head(heads.hidden_size(model))
    torch.nn.init.zeros_(value_head.weight)
    model.set_adapter(adapters.POLICY)
    return model, Roles(value_head.to(model.device), rewards, adapters.REF if reference else None)


def role_parameters(model, name: str) -> list[torch.nn.Parameter]:
    return [p for n, p in model.named_parameters() if f".{name}." in n and "lora_" in n]


def ppo_update(model, roles: Roles, rollout, optimizer, scheduler, cfg, groups, replay=None,
               step: int = 0) -> dict[str, float]:
    """`ppo_epochs` passes of clipped updates over shuffled minibatches; metrics averaged over them.
    With `replay`, each minibatch's policy loss gains the NLL of buffer sequences (InstructGPT's ptx)."""
    stats: dict[str, list[float]] = defaultdict(list)
    model.eval()  # dropout off in updates as in rollouts (Huang et al.): the ratios compare the same function
    size = rollout.query_response.shape[0]
    minibatches = -(-size // cfg.minibatch_size)
    for epoch in range(cfg.ppo_epochs):
        for i, idx in enumerate(torch.randperm(size).split(cfg.minibatch_size)):
            mb = rollout.select(idx)
            model.set_adapter(adapters.POLICY)
            logprobs, _ = response_logprobs(model, mb.query_response, mb.attention_mask, mb.prompt_width,
                                            cfg.temperature)
            pg_loss, pg_stats = policy_loss(logprobs, mb.logprobs, mb.advantages, mb.response_mask, cfg.clip)
            loss = pg_loss
            if replay is not None:
                ptx_loss, ptx_stats = replay.loss(model, (step * cfg.ppo_epochs + epoch) * minibatches + i, len(idx))
                loss = loss + ptx_loss
                for k, v in ptx_stats.items():
                    stats[k].append(v)
            loss.backward()
            model.set_adapter(adapters.VALUE)
            values = response_values(model, roles.value_head, mb.query_response, mb.attention_mask, mb.prompt_width)
            vf_loss, vf_stats = value_loss(values, mb.values, mb.returns, mb.response_mask, cfg.clip_value)
            (cfg.vf_coef * vf_loss).backward()
            for params in groups:
                torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            stats["loss/policy"].append(float(pg_loss.detach()))
            stats["loss/value"].append(float(vf_loss.detach()))
            stats["policy/clipfrac"].append(pg_stats["clipfrac"])
            stats["policy/approxkl"].append(pg_stats["approxkl"])
            stats["val/clipfrac"].append(vf_stats["clipfrac"])
    model.set_adapter(adapters.POLICY)
    return {k: sum(v) / len(v) for k, v in stats.items()}


def run(stage, ctx: StageContext, data) -> StageOutput:
    with ctx.host.policy(init=stage.init) as model:
        return train_ppo(model, stage, ctx, data)


class PPO:
    """PPO as an online algorithm (align.stages.online): a rollout batch with its rewards and GAE advantages, then
    `ppo_epochs` passes of clipped policy and value updates; the KL coefficient follows each rollout's KL."""

    def __init__(self, model, roles: Roles, tokenizer, examples, prompts: list[list[int]], stage, steps: int,
                 replay=None):
        cfg, train = stage.ppo, stage.train
        self.model, self.roles, self.tokenizer, self.cfg, self.replay = model, roles, tokenizer, cfg, replay
        self.examples, self.prompts, self.batch_size = examples, prompts, cfg.rollout_batch_size
        updates = steps * cfg.ppo_epochs * (cfg.rollout_batch_size // cfg.minibatch_size)
        self.groups = [role_parameters(model, adapters.POLICY),
                       role_parameters(model, adapters.VALUE) + list(roles.value_head.parameters())]
        self.optimizer = torch.optim.AdamW([{"params": g} for g in self.groups], lr=train.lr, eps=1e-5,
                                           weight_decay=train.weight_decay)
        self.scheduler = get_scheduler(train.lr_scheduler, self.optimizer, round(train.warmup_ratio * updates),
                                       updates)
        self.kl_ctl = kl_controller(cfg.kl_coef, cfg.kl_target, cfg.kl_horizon)
        self.moments = RunningMoments()

    def experience(self, batch: list[int], step: int):
        rollout, _, metrics = make_experience(
            self.model, self.roles, self.tokenizer, [self.examples[i] for i in batch], [self.prompts[i] for i in batch],
            self.cfg, self.kl_ctl.value, self.moments)
        self.kl_ctl.update(metrics["objective/kl"], self.cfg.rollout_batch_size)  # for the next rollout
        return rollout, metrics

    def update(self, rollout, step: int) -> dict[str, float]:
        metrics = ppo_update(self.model, self.roles, rollout, self.optimizer, self.scheduler, self.cfg, self.groups,
                             self.replay, step)
        metrics["lr"] = self.scheduler.get_last_lr()[0]
        return metrics

    def state_dict(self) -> dict:
        return {
            "policy": get_peft_model_state_dict(self.model, adapter_name=adapters.POLICY),
            "value": get_peft_model_state_dict(self.model, adapter_name=adapters.VALUE),
            "value_head": self.roles.value_head.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "kl": self.kl_ctl.state_dict(),
            "moments": self.moments.state_dict(),
        }

    def load_state_dict(self, state: dict) -> None:
        set_peft_model_state_dict(self.model, state["policy"], adapter_name=adapters.POLICY)
        set_peft_model_state_dict(self.model, state["value"], adapter_name=adapters.VALUE)
        self.roles.value_head.load_state_dict(state["value_head"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.kl_ctl.load_state_dict(state["kl"])
        self.moments.load_state_dict(state["moments"])


def train_ppo(model, stage, ctx: StageContext, data) -> StageOutput:
    cfg, train = stage.ppo, stage.train
    model, roles = build_roles(model, stage, ctx)
    for loaded in (data["train"], data.get("eval")):
        if loaded:
            require_rules(roles.rewards, loaded)
    examples = data["train"].examples
    prompts = [encode_prompt(ctx.tokenizer, ex.prompt)[-train.max_prompt_length :] for ex in examples]
    per_epoch = len(examples) // cfg.rollout_batch_size
    if per_epoch == 0:
        raise DataError(f"{len(examples)} prompts, fewer than ppo.rollout_batch_size ({cfg.rollout_batch_size})",
                        file=data["train"].source)
    steps = train.max_steps if train.max_steps > 0 else max(1, round(train.epochs * per_epoch))
    algorithm = PPO(model, roles, ctx.tokenizer, examples, prompts, stage, steps, ctx.replay)

    evaluate = data.get("eval") and (lambda: heldout_rewards(model, roles.rewards, ctx.tokenizer, data["eval"],
                                                             cfg.max_new_tokens, cfg.rollout_batch_size, ctx.quiet))
    seed = train.seed if train.seed is not None else ctx.seed
    metrics, resumed, stopping, done = train_online(algorithm, stage, ctx, len(examples), steps, seed, evaluate)
    adapter = adapters.save(model, ctx.stage_dir / "adapter", adapters.POLICY)
    value_dir = adapters.save(model, ctx.stage_dir / "value_adapter", adapters.VALUE)
    heads.save_head(roles.value_head, value_dir)
    return StageOutput.stopped(adapter, metrics, str(resumed) if resumed else None, stopping, done)


register(StageKind("ppo", PPOStageConfig, run, data="prompt", summary=partial(init_and_final, "ppo_scores"),
                   multi_process=False,
                   curves=("objective/scores", "objective/kl", "replay/nll")))
