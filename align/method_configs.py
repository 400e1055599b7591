"""Each training method's own settings, one dataclass per method as TRL has them: the preference and
reward-model losses, PPO and replay (PPO's reward sources are `align.rewards`' own). `align.config` puts
them into stages; their `__post_init__` checks raise `ConfigError(key=<field>)`, which the YAML binder
points at the field's line.
"""

from __future__ import annotations

from dataclasses import dataclass

from align.errors import require as _require
from align.losses import grpo, preference
from align.losses.dpo import KTOLoss


def _require_registered(name: str, listwise: bool) -> None:
    names = preference.names(listwise)
    _require(name in names, "type", f"'{name}' is not a registered {'listwise' if listwise else 'pairwise'} "
                                    f"preference loss; choose from: {', '.join(names)}")


@dataclass(kw_only=True)
class DPOLossConfig:
    """The pairwise DPO-family loss (TRL's names: sigmoid is the DPO paper's loss), one of the registered pairwise
    losses (align.losses.preference). simpo and orpo need no reference; they want a larger beta than DPO (SimPO:
    about 2; ORPO's lambda: 0.1)."""

    type: str = "sigmoid"  # a registered pairwise loss: sigmoid, ipo, hinge, simpo, orpo, and any registered since
    beta: float = 0.1  # strength of the pull towards the reference; simpo: reward scale; orpo: odds-ratio weight
    label_smoothing: float = 0.0  # assumed fraction of flipped preference labels (cDPO; sigmoid and simpo)
    # label_smoothing = the flip rate that the agreement of the label stages' annotators implies (align.stages.label),
    # for a stage whose data are their labels
    smooth_by_agreement: bool = False
    # Weight of an NLL term on the chosen answer (RPO, Pang et al. 2024, arXiv 2404.19733; TRL's
    # rpo_alpha). It keeps DPO from lowering the chosen answer's likelihood along with the rejected one.
    rpo_alpha: float = 0.0
    # simpo: the target reward margin gamma as a fraction of beta (the SimPO repo's gamma_beta_ratio; TRL's
    # simpo_gamma is gamma itself, i.e. gamma_beta_ratio * beta)
    gamma_beta_ratio: float = 0.5

    def __post_init__(self):
        _require_registered(self.type, listwise=False)
        _require(self.beta > 0, "beta", f"must be > 0, got {self.beta}")
        _require(self.rpo_alpha >= 0, "rpo_alpha", f"must be >= 0, got {self.rpo_alpha}")
        _require(0 <= self.label_smoothing < 0.5, "label_smoothing", f"must be in [0, 0.5), got {self.label_smoothing}")
        _require(not self.label_smoothing or self.type in ("sigmoid", "simpo"), "label_smoothing",
                 f"applies to types sigmoid and simpo only, not {self.type}")
        _require(not self.smooth_by_agreement or (self.type in ("sigmoid", "simpo") and not self.label_smoothing),
                 "smooth_by_agreement", "sets label_smoothing (types sigmoid and simpo) from measured agreement: "
                 "give one or the other")
        _require(self.gamma_beta_ratio >= 0, "gamma_beta_ratio", f"must be >= 0, got {self.gamma_beta_ratio}")

    def build(self) -> preference.PreferenceLoss:
        return preference.build(self.type, beta=self.beta, label_smoothing=self.label_smoothing,
                                gamma_beta_ratio=self.gamma_beta_ratio, nll_weight=self.rpo_alpha)


@dataclass(kw_only=True)
class RankLossConfig:
    """The listwise ranking loss over K responses per prompt (align.losses.rank)."""

    # plackett_luce: listwise DPO (DPO itself at K = 2); lipo: LiPO-lambda; pro and rrhf: reference-free,
    # on length-normalised log-probs, with an NLL term on the best response
    type: str = "plackett_luce"  # a registered listwise loss (align.losses.preference)
    beta: float = 0.1  # plackett_luce and lipo: scale of the implicit reward beta*(log pi - log ref)
    # Weight of the NLL of each group's best response. None = the method's own: 1 for pro and rrhf, whose
    # losses include it; 0 for plackett_luce and lipo (> 0 adds it, as DPO's rpo_alpha does).
    sft_weight: float | None = None

    def __post_init__(self):
        _require_registered(self.type, listwise=True)
        _require(self.beta > 0, "beta", f"must be > 0, got {self.beta}")
        _require(self.sft_weight is None or self.sft_weight >= 0, "sft_weight", f"must be >= 0, got {self.sft_weight}")

    def build(self) -> preference.PreferenceLoss:
        return preference.build(self.type, beta=self.beta, nll_weight=self.sft_weight)


@dataclass(kw_only=True)
class KTOLossConfig:
    """KTO's loss (Ethayarajh et al. 2024; TRL's names)."""

    beta: float = 0.1
    desirable_weight: float = 1.0  # lambda_D: raise it when desirable examples are the fewer
    undesirable_weight: float = 1.0  # lambda_U

    def __post_init__(self):
        _require(self.beta > 0, "beta", f"must be > 0, got {self.beta}")
        for name in ("desirable_weight", "undesirable_weight"):
            _require(getattr(self, name) > 0, name, f"must be > 0, got {getattr(self, name)}")

    def build(self) -> KTOLoss:
        return KTOLoss(beta=self.beta, desirable_weight=self.desirable_weight,
                       undesirable_weight=self.undesirable_weight)


@dataclass(kw_only=True)
class ReplayOutConfig:
    """The sample of a stage's training answers it keeps in replay/buffer.jsonl for later stages' replay."""

    size: int = 2000  # examples, reservoir-sampled

    def __post_init__(self):
        _require(self.size >= 1, "size", f"must be >= 1, got {self.size}")


@dataclass(kw_only=True)
class ReplayConfig:
    """Earlier data mixed into a dpo, rank, kto or ppo stage against forgetting (align.replay): each step adds
    the NLL of buffer sequences, `fraction` of all the step's sequences, weighted by `coef`."""

    source: str | None = None  # ${stage.replay}, or an SFT-format corpus; None = the last sft stage's buffer
    format: str = "auto"  # of a corpus
    fraction: float = 0.2  # share of each step's sequences that come from the buffer
    coef: float = 1.0  # weight of their NLL (InstructGPT's ptx coefficient)
    size: int | None = None  # reservoir-sample the source down to this many examples; None = all of it

    def __post_init__(self):
        _require(0 < self.fraction < 1, "fraction", f"must be in (0, 1), got {self.fraction}")
        _require(self.coef > 0, "coef", f"must be > 0, got {self.coef}")
        _require(self.size is None or self.size >= 1, "size", f"must be >= 1, got {self.size}")


@dataclass(kw_only=True)
class RewardLossConfig:
    """The reward model's Bradley–Terry loss; a pair's optional `margin` column is subtracted as in Llama 2."""

    # Weight of mean((r_chosen + r_rejected)^2), which keeps scores centred on 0 (Eisenstein et al. 2023;
    # TRL's center_rewards_coefficient, where 0.01 is the suggested value).
    center_coef: float = 0.0

    def __post_init__(self):
        _require(self.center_coef >= 0, "center_coef", f"must be >= 0, got {self.center_coef}")


@dataclass(kw_only=True)
class PPOConfig:
    """PPO's own settings; the defaults follow Huang et al.'s "N implementation details" where they apply."""

    rollout_batch_size: int = 16  # prompts sampled per PPO step
    minibatch_size: int = 8  # responses per gradient step
    ppo_epochs: int = 4  # passes over each rollout batch
    max_new_tokens: int = 48
    temperature: float = 1.0  # sampling temperature, also applied to the logits of every log-prob
    kl_coef: float = 0.05  # initial weight of the per-token KL penalty against the reference
    kl_target: float | None = None  # summed per-sequence KL to aim for; set = adaptive controller
    kl_horizon: int = 10000  # adaptive controller's horizon, in episodes (Ziegler et al. 2019)
    gamma: float = 1.0
    lam: float = 0.95  # GAE lambda
    clip: float = 0.2  # policy ratio clip
    clip_value: float = 0.2  # value clip
    vf_coef: float = 0.1
    whiten_advantages: bool = True
    normalize_rewards: bool = True  # scores scaled by their running mean and std
    missing_eos_penalty: float = 1.0  # subtracted from the score of a response that never ends
    max_grad_norm: float = 1.0

    def __post_init__(self):
        for name in ("rollout_batch_size", "minibatch_size", "ppo_epochs", "max_new_tokens", "kl_horizon"):
            _require(getattr(self, name) >= 1, name, f"must be >= 1, got {getattr(self, name)}")
        _require(self.rollout_batch_size >= 2, "rollout_batch_size",
                 "must be >= 2: rewards are normalised and advantages whitened over the batch, "
                 f"got {self.rollout_batch_size}")
        _require(self.rollout_batch_size % self.minibatch_size == 0, "minibatch_size",
                 f"must divide rollout_batch_size ({self.rollout_batch_size}), got {self.minibatch_size}")
        _require(self.temperature > 0, "temperature", f"must be > 0, got {self.temperature}")
        _require(self.kl_coef >= 0, "kl_coef", f"must be >= 0, got {self.kl_coef}")
        _require(self.kl_target is None or self.kl_target > 0, "kl_target", f"must be > 0, got {self.kl_target}")
        _require(0 <= self.gamma <= 1, "gamma", f"must be in [0, 1], got {self.gamma}")
        _require(0 <= self.lam <= 1, "lam", f"must be in [0, 1], got {self.lam}")
        _require(self.clip > 0 and self.clip_value > 0, "clip", "clip and clip_value must be > 0")


@dataclass(kw_only=True)
class GRPOConfig:
    """GRPO's and its variants' own settings (align.losses.grpo has each one's paper); TRL 1.16's names in comments."""

    prompts_per_step: int = 8  # prompts sampled per step; each gets `num_generations` completions
    num_generations: int = 8  # G (TRL num_generations)
    max_new_tokens: int = 48  # (TRL max_completion_length)
    temperature: float = 1.0  # sampling temperature, also applied to the logits of every log-prob
    # group_norm: GRPO; group_mean: Dr. GRPO's (no std); rloo: leave-one-out baseline, the KL in the reward
    advantage: str = "group_norm"
    # sequence (TRL grpo) | token (TRL bnpo, DAPO) | constant (TRL dr_grpo)
    aggregation: str = "sequence"
    clip_low: float = 0.2  # (TRL epsilon)
    clip_high: float = 0.2  # DAPO's clip-higher sets it above clip_low, e.g. 0.28 (TRL epsilon_high)
    kl_coef: float = 0.0  # beta; 0 loads no reference adapter (TRL beta, default 0 since 0.19)
    num_iterations: int = 1  # mu: updates per rollout batch (TRL num_iterations)
    minibatch_size: int = 16  # completions per gradient step
    # DAPO: sample more prompts (up to max_resample_rounds batches more) until every group's rewards differ
    dynamic_sampling: bool = False
    max_resample_rounds: int = 3
    # DAPO's soft overlong punishment: 0 = off; else the last this many tokens before max_new_tokens cost up to
    # overlong_penalty, linearly
    overlong_buffer: int = 0
    overlong_penalty: float = 1.0
    max_grad_norm: float = 1.0

    def __post_init__(self):
        for name in ("prompts_per_step", "max_new_tokens", "num_iterations", "minibatch_size"):
            _require(getattr(self, name) >= 1, name, f"must be >= 1, got {getattr(self, name)}")
        _require(self.num_generations >= 2, "num_generations",
                 f"must be >= 2: advantages compare a prompt's completions, got {self.num_generations}")
        _require((self.prompts_per_step * self.num_generations) % self.minibatch_size == 0, "minibatch_size",
                 f"must divide prompts_per_step * num_generations ({self.prompts_per_step * self.num_generations}), "
                 f"got {self.minibatch_size}")
        _require(self.advantage in grpo.ADVANTAGES, "advantage",
                 f"'{self.advantage}' is not one of {', '.join(grpo.ADVANTAGES)}")
        _require(self.aggregation in grpo.AGGREGATIONS, "aggregation",
                 f"'{self.aggregation}' is not one of {', '.join(grpo.AGGREGATIONS)}")
        _require(self.temperature > 0, "temperature", f"must be > 0, got {self.temperature}")
        _require(0 < self.clip_low < 1, "clip_low", f"must be in (0, 1), got {self.clip_low}")
        _require(self.clip_high > 0, "clip_high", f"must be > 0, got {self.clip_high}")
        _require(self.kl_coef >= 0, "kl_coef", f"must be >= 0, got {self.kl_coef}")
        _require(self.max_resample_rounds >= 0, "max_resample_rounds", f"must be >= 0, got {self.max_resample_rounds}")
        _require(0 <= self.overlong_buffer < self.max_new_tokens, "overlong_buffer",
                 f"must be in [0, max_new_tokens), got {self.overlong_buffer}")
        _require(self.overlong_penalty >= 0, "overlong_penalty", f"must be >= 0, got {self.overlong_penalty}")

    def loss(self) -> grpo.ClippedGroupLoss:
        return grpo.ClippedGroupLoss(self.clip_low, self.clip_high, 0.0 if self.advantage == "rloo" else self.kl_coef,
                                     self.aggregation, self.max_new_tokens)
