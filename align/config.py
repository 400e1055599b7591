"""Recipes: the typed dataclasses a recipe YAML file becomes, and the references between its stages.
Each method's own settings (losses, PPO, rewards, replay) live in `align.method_configs`.

`align.yaml_binding` turns the YAML, with any `dotted.key=value` overrides, into these dataclasses and
names the file, line and key of every mistake. Checks of values live in each dataclass's `__post_init__`,
which raises `ConfigError(key=<field>)`; the binder points it at the field's line. Built by hand in
Python, the dataclasses validate the same way.
"""

from __future__ import annotations

import dataclasses
import re
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from yaml.nodes import MappingNode

from align import yaml_binding
from align.errors import ConfigError
from align.errors import require as _require
from align.method_configs import (DPOLossConfig, KTOLossConfig, PPOConfig, RankLossConfig, ReplayConfig, ReplayOutConfig,
                                  RewardLossConfig, RewardSource)
from align.refs import parse_refs

# what `${stage.output}` may name: runs/<recipe>/<stage>/{adapter/, , replay/buffer.jsonl}
STAGE_OUTPUTS = {"adapter", "dir", "replay"}
_IDENTIFIER = yaml_binding.IDENTIFIER  # so that `stages.<name>.key` and `${<name>.output}` can name a stage
_RECIPE_NAME = re.compile(r"[A-Za-z0-9_.-]+")


@dataclass(kw_only=True)
class LoraConfig:
    """The LoRA adapter every stage trains (PEFT's LoraConfig)."""

    r: int = 16  # rank
    alpha: int = 32  # scaling is alpha / r
    dropout: float = 0.05
    target_modules: str | list[str] = "all-linear"  # "all-linear" or module names such as [q_proj, v_proj]

    def __post_init__(self):
        _require(self.r >= 1, "r", f"must be >= 1, got {self.r}")
        _require(0 <= self.dropout < 1, "dropout", f"must be in [0, 1), got {self.dropout}")


@dataclass(kw_only=True)
class ModelConfig:
    """The frozen base model that all stages' adapters share."""

    base: str  # required: hub id, local folder, .gguf file or builtin:<name>
    quantization: Literal["nf4", "none"] = "nf4"  # nf4 = QLoRA; none = plain LoRA
    precision: Literal["auto", "fp32", "bf16"] = "auto"  # auto = bf16 where the device has it
    chat_template: str | None = None  # a .jinja path or an inline template; None = the tokenizer's
    lora: LoraConfig = field(default_factory=LoraConfig)


@dataclass(kw_only=True)
class DataConfig:
    """A dataset: a file, folder, hub id or `synthetic:<name>`."""

    path: str  # required
    format: str = "auto"  # auto-detected unless named (see align.data.formats)
    skip_bad_rows: bool = False  # False: the first bad row is an error naming file, row and field
    max_rows: int | None = None  # None = all rows

    def __post_init__(self):
        _require(self.max_rows is None or self.max_rows >= 1, "max_rows", f"must be >= 1, got {self.max_rows}")


@dataclass(kw_only=True)
class TrainConfig:
    """Optimisation settings of one stage (they map onto transformers' TrainingArguments)."""

    epochs: float = 1.0
    max_steps: int = -1  # > 0 overrides epochs
    lr: float = 2.0e-4
    batch_size: int = 8  # global: a launch's processes take equal shares of it (align.stages.engine)
    grad_accum: int = 1
    warmup_ratio: float = 0.0
    weight_decay: float = 0.0
    lr_scheduler: Literal["linear", "cosine", "constant"] = "linear"
    max_length: int = 512  # tokens, prompt + completion
    max_prompt_length: int = 256
    save_steps: int = 50  # checkpoint every N optimizer steps
    logging_steps: int = 1
    eval_steps: int | None = None  # None = no periodic eval
    seed: int | None = None  # None = the recipe's seed (filled in by Recipe)
    gradient_checkpointing: bool = False
    group_by_length: bool = False  # batches of similar lengths (shuffled in groups of 50 batches) pad less

    def __post_init__(self):
        _require(self.lr > 0, "lr", f"must be > 0, got {self.lr}")
        _require(self.batch_size >= 1, "batch_size", f"must be >= 1, got {self.batch_size}")
        _require(self.grad_accum >= 1, "grad_accum", f"must be >= 1, got {self.grad_accum}")
        _require(self.max_prompt_length >= 1, "max_prompt_length", f"must be >= 1, got {self.max_prompt_length}")
        _require(self.max_length > self.max_prompt_length, "max_length",
                 f"must be greater than max_prompt_length ({self.max_prompt_length}), got {self.max_length}")


@dataclass(kw_only=True)
class StageConfig:
    """Fields every stage has; each kind subclasses it and is registered in STAGE_KINDS."""

    name: str  # required; unique, identifier-like, not "base" (eval's name for the untrained model)
    kind: str  # required; a key of STAGE_KINDS
    data: DataConfig  # required
    eval_data: DataConfig | None = None
    init: str | None = None  # adapter to start from, e.g. ${sft.adapter}; None = a fresh adapter
    train: TrainConfig = field(default_factory=TrainConfig)
    replay_out: ReplayOutConfig | None = field(default_factory=ReplayOutConfig)  # None = keep no sample

    def __post_init__(self):
        _require(_IDENTIFIER.fullmatch(self.name) is not None, "name",
                 f"stage names must look like identifiers ([A-Za-z_][A-Za-z0-9_]*), got '{self.name}'")
        _require(self.name != "base", "name", "'base' is reserved for the untrained model in eval")


@dataclass(kw_only=True)
class SFTStageConfig(StageConfig):
    """Supervised fine-tuning on conversations; the loss is on completions only."""

    kind: str = "sft"


@dataclass(kw_only=True)
class PreferenceStageConfig(StageConfig):
    """What the stages that train against a frozen reference (dpo, rank, kto) share."""

    reference: str | None = None  # frozen reference adapter; None = `init` (the SFT adapter), else the bare base
    precompute_ref: bool = True  # reference log-probs once before training, not every step
    replay: ReplayConfig | None = None  # earlier data mixed in against forgetting; None = none


@dataclass(kw_only=True)
class DPOStageConfig(PreferenceStageConfig):
    """Direct preference optimisation on (prompt, chosen, rejected) pairs; ranked data trains on each
    group's best against its worst response."""

    kind: str = "dpo"
    loss: DPOLossConfig = field(default_factory=DPOLossConfig)


@dataclass(kw_only=True)
class RankStageConfig(PreferenceStageConfig):
    """Listwise preference optimisation on K ranked (or scored, with ties) responses per prompt."""

    kind: str = "rank"
    loss: RankLossConfig = field(default_factory=RankLossConfig)


@dataclass(kw_only=True)
class KTOStageConfig(PreferenceStageConfig):
    """KTO on unpaired answers labelled desirable or undesirable (pairs count as one of each)."""

    kind: str = "kto"
    loss: KTOLossConfig = field(default_factory=KTOLossConfig)


@dataclass(kw_only=True)
class RMStageConfig(StageConfig):
    """A reward model: a LoRA adapter plus a scalar score head, trained on preference pairs."""

    kind: str = "rm"
    loss: RewardLossConfig = field(default_factory=RewardLossConfig)


@dataclass(kw_only=True)
class PPOStageConfig(StageConfig):
    """PPO against learned and/or rule-based rewards; policy, value, reward and reference are adapters
    on the one base. `data` holds prompts (any format with a prompt; a `rule` feeds rule rewards)."""

    kind: str = "ppo"
    reference: str | None = None  # frozen KL reference, e.g. ${sft.adapter}; None = `init`
    value_init: str | None = None  # the value adapter's start; None = the first reward model's, else `init`
    rewards: list[RewardSource]  # required, summed with their weights
    ppo: PPOConfig = field(default_factory=PPOConfig)
    replay: ReplayConfig | None = None  # SFT data mixed into the policy loss, InstructGPT's "ptx" term
    replay_out: ReplayOutConfig | None = None  # PPO trains on prompts: it has no answers to keep

    def __post_init__(self):
        super().__post_init__()
        _require(bool(self.rewards), "rewards", "PPO needs at least one reward (model: or rule:)")
        _require(self.replay_out is None, "replay_out", "a ppo stage trains on prompts: it has no answers to keep")


STAGE_KINDS: dict[str, type[StageConfig]] = {
    "sft": SFTStageConfig,
    "rm": RMStageConfig,
    "dpo": DPOStageConfig,
    "rank": RankStageConfig,
    "kto": KTOStageConfig,
    "ppo": PPOStageConfig,
}
# A stage's `kind` picks its dataclass: `kind: dpo` builds a DPOStageConfig.
_VARIANTS = {StageConfig: yaml_binding.Variants("kind", STAGE_KINDS, label="stage kind")}


@dataclass(kw_only=True)
class EvalConfig:
    """What `align eval` (and the end of `align run`) measures: each chosen stage's replies to a prompt set,
    judged against a reference stage's (align.eval.evaluate). Give `tasks`, `prompts` or both."""

    tasks: DataConfig | None = None  # prompts with rules: task accuracy (and the prompt set when `prompts` is not given)
    prompts: DataConfig | None = None  # prompts for win rate, KL and length: .txt lines, JSONL prompts, MT-/Vicuna-Bench questions, any preference data's prompts
    preferences: DataConfig | None = None  # held-out pairs: judge and implicit-reward accuracy; None = the first rm or dpo stage's eval_data
    verdicts: DataConfig | None = None  # human verdicts: preference rows over this eval's own replies (its pairs.jsonl, rated)
    stages: list[str] | None = None  # "base" and/or stage names; None = base and every stage
    reference: str | None = None  # "base" or a stage; None = the last sft stage, else base
    judge: str | None = None  # an rm stage, a reward card (reward_models/ name or path) or an rm stage folder; None = the last rm stage, else none
    max_new_tokens: int = 32
    batch_size: int = 16
    do_sample: bool = False  # False: greedy replies
    temperature: float = 0.7
    top_p: float = 1.0
    seed: int = 0
    samples: int = 12  # prompts shown side by side in the report
    bootstrap: int = 2000  # paired-bootstrap resamples for each stage's task-accuracy change against the reference

    def __post_init__(self):
        _require(self.tasks is not None or self.prompts is not None, "tasks", "give tasks, prompts or both")
        for name in ("max_new_tokens", "batch_size", "bootstrap"):
            _require(getattr(self, name) >= 1, name, f"must be >= 1, got {getattr(self, name)}")
        _require(self.temperature > 0, "temperature", f"must be > 0, got {self.temperature}")
        _require(0 < self.top_p <= 1, "top_p", f"must be in (0, 1], got {self.top_p}")

    def check_stages(self, stages: list, within: str = "") -> None:
        """Evaluated stages are policies; the reference is `base` or a stage; a judge that names a stage
        names an rm stage."""
        kinds = {s.name: s.kind for s in stages}
        for i, name in enumerate(self.stages or []):
            _require(kinds.get(name) != "rm", f"{within}stages[{i}]",
                     f"'{name}' is a reward model, not a policy to evaluate; name it as the judge instead")
        _require(self.reference in (None, "base", *kinds), f"{within}reference",
                 f"unknown stage '{self.reference}'; choose from: base, {', '.join(kinds)}")
        _require(kinds.get(self.reference) != "rm", f"{within}reference", f"'{self.reference}' is a reward model, not a policy")
        _require(self.judge not in kinds or kinds[self.judge] == "rm", f"{within}judge",
                 f"stage '{self.judge}' is a {kinds.get(self.judge)} stage; a judge is an rm stage or a reward card")
        if self.judge and self.judge not in kinds:
            from align.rewards import REWARD_MODELS_DIR, find_rule_file

            cards = ", ".join(sorted(p.stem for p in REWARD_MODELS_DIR.glob("*.yaml")))
            _require(find_rule_file(self.judge) is not None or Path(self.judge).is_dir(), f"{within}judge",
                     f"'{self.judge}' is neither an rm stage of this recipe, a reward card in reward_models/ "
                     f"({cards}) or a rule file, nor a folder written by an rm stage")


@dataclass(kw_only=True)
class ForgettingConfig:
    """What every stage's starting and trained policy are measured on, to show what the stage made the
    model forget (align.eval.forgetting). A set left out falls back as noted; one with no fallback is
    not measured."""

    enabled: bool = True
    retention: DataConfig | None = None  # held-out SFT-format data, for NLL; None = the first sft stage's eval_data
    tasks: DataConfig | None = None  # rule-checked tasks, for accuracy; None = eval.tasks
    prompts: DataConfig | None = None  # general prompts, for KL to the start; None = those of retention, else tasks
    max_rows: int = 64  # of each set
    max_new_tokens: int = 32
    batch_size: int = 64  # prompts per generation batch: larger batches share each step's fixed cost (nf4 dequantisation)

    def __post_init__(self):
        for name in ("max_rows", "max_new_tokens", "batch_size"):
            _require(getattr(self, name) >= 1, name, f"must be >= 1, got {getattr(self, name)}")


@dataclass(kw_only=True)
class Recipe:
    """A whole pipeline: one base model and a chain of stages, each writing runs/<name>/<stage>/."""

    name: str  # required; [A-Za-z0-9_.-]+
    output_dir: str = "runs"  # relative to the current directory
    seed: int = 0
    model: ModelConfig  # required
    stages: list[StageConfig]  # required, non-empty
    eval: EvalConfig | None = None
    forgetting: ForgettingConfig = field(default_factory=ForgettingConfig)
    path: str | None = field(default=None, init=False)  # the file it was loaded from

    def __post_init__(self):
        _require(_RECIPE_NAME.fullmatch(self.name) is not None, "name",
                 f"must contain only letters, digits, '_', '.' and '-', got '{self.name}'")
        _require(bool(self.stages), "stages", "a recipe needs at least one stage")
        names = [s.name for s in self.stages]
        for i, name in enumerate(names):
            _require(name not in names[:i], f"stages[{i}].name", f"duplicate stage name '{name}'")
        for stage in self.stages:
            if stage.train.seed is None:
                stage.train.seed = self.seed  # filled so that a stage's config hash covers its seed
        if self.eval is not None:
            if self.eval.stages is None:  # the policies: an rm stage's adapter is a judge, not a model to evaluate
                self.eval.stages = ["base", *(s.name for s in self.stages if s.kind != "rm")]
            for i, name in enumerate(self.eval.stages):
                _require(name == "base" or name in names, f"eval.stages[{i}]",
                         f"unknown stage '{name}'; choose from: base, {', '.join(names)}")
            self.eval.check_stages(self.stages, within="eval.")
        self._default_replay_sources()
        self._check_refs(names)

    def _default_replay_sources(self) -> None:
        """A stage's replay without a source replays the buffer of the last sft stage before it."""
        last_sft = None
        for stage in self.stages:
            replay = getattr(stage, "replay", None)
            if replay is not None and replay.source is None:
                _require(last_sft is not None, f"stages.{stage.name}.replay.source",
                         "no sft stage runs before this one to replay: name a source, "
                         "${<stage>.replay} or an SFT-format file")
                replay.source = f"${{{last_sft}.replay}}"
            if stage.kind == "sft" and stage.replay_out is not None:
                last_sft = stage.name

    def _check_refs(self, names: list[str]) -> None:
        # A stage may use the outputs of the stages before it, eval those of all, the model none.
        scopes = [(f"stages.{s.name}", s, names[:i]) for i, s in enumerate(self.stages)]
        scopes += [("output_dir", self.output_dir, []), ("model", self.model, []), ("eval", self.eval, names)]
        for scope, value, earlier in scopes:
            for key, text in _strings(value, scope):
                try:
                    refs = parse_refs(text)
                except ConfigError as e:
                    raise ConfigError(e.message, key=key) from None
                for ref in refs:
                    if ref.stage not in names:
                        problem = f"there is no stage '{ref.stage}' (stages: {', '.join(names)})"
                    elif ref.stage not in earlier:
                        problem = f"only outputs of stages that run before {scope} can be used"
                    elif ref.output not in STAGE_OUTPUTS:
                        problem = f"unknown output '{ref.output}' (outputs: {', '.join(sorted(STAGE_OUTPUTS))})"
                    elif ref.output == "replay" and self.stage(ref.stage).replay_out is None:
                        problem = f"stage '{ref.stage}' keeps no replay buffer (its replay_out is off)"
                    else:
                        continue
                    raise ConfigError(f"'{ref}': {problem}", key=key)

    def stage(self, name: str) -> StageConfig:
        """The stage called `name`."""
        for s in self.stages:
            if s.name == name:
                return s
        raise ConfigError(f"no stage named '{name}'; stages: {', '.join(s.name for s in self.stages)}",
                          file=self.path, key="stages")


def _strings(value, key: str):
    """(dotted key, text) for every string inside `value`, a dataclass or what `asdict` makes of one."""
    if dataclasses.is_dataclass(value):
        value = dataclasses.asdict(value)
    if isinstance(value, str):
        yield key, value
    elif isinstance(value, dict):
        for k, v in value.items():
            yield from _strings(v, f"{key}.{k}")
    elif isinstance(value, list):
        for i, v in enumerate(value):
            yield from _strings(v, f"{key}[{i}]")


# --- loading --------------------------------------------------------------------------------------


def load_recipe(path: str | Path, overrides: typing.Sequence[str] = ()) -> Recipe:
    """Read and validate the recipe at `path`, with `dotted.key=value` overrides applied."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError("recipe file not found", file=str(path)) from None
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"cannot read the recipe: {e}", file=str(path)) from None
    recipe = parse_recipe(text, source=str(path), overrides=overrides)
    recipe.path = str(path)
    return recipe


def parse_recipe(text: str, source: str = "<string>", overrides: typing.Sequence[str] = ()) -> Recipe:
    """Validate recipe YAML `text`; `source` names it in errors."""
    root = yaml_binding.compose(text, source)
    if root is None:
        raise ConfigError("the recipe is empty", file=source)
    if not isinstance(root, MappingNode):
        raise ConfigError("the recipe must be a mapping of keys (name, model, stages, ...)",
                          file=source, line=root.start_mark.line + 1)
    for override in overrides:
        yaml_binding.apply_override(root, override)
    return yaml_binding.build(Recipe, root, _VARIANTS)
