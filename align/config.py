"""Recipes: the typed dataclasses a recipe YAML file becomes, and the references between its stages.
The settings every stage shares live in `align.settings`, each stage kind's own config in its file
(`align/stages/<kind>.py`, registered in `align.stages.kind`), each method's settings (losses, PPO, replay) in
`align.method_configs`, reward sources in `align.rewards`.

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

from yaml.nodes import MappingNode

from align import yaml_binding
from align.errors import AlignError, ConfigError
from align.errors import require as _require
from align.refs import parse_refs
from align.rewards import REWARD_SOURCES, RewardSource, reward_source
from align.settings import DataConfig, ModelConfig, StageConfig
from align.stages.kind import KINDS, kind_of
from align.tracking import TRACKERS, default_trackers

# what `${stage.output}` may name: runs/<recipe>/<stage>/{adapter/, , replay/buffer.jsonl}
STAGE_OUTPUTS = {"adapter", "dir", "replay", "labels"}
_IDENTIFIER = yaml_binding.IDENTIFIER  # so that `${<name>.output}` can name a stage
_RECIPE_NAME = re.compile(r"[A-Za-z0-9_.-]+")


@dataclass(kw_only=True)
class EvalConfig:
    """What `align eval` (and the end of `align run`) measures: each chosen stage's replies to a prompt set,
    judged against a reference stage's (align.eval.evaluate). Give `tasks`, `prompts` or both."""

    # prompts with rules: task accuracy (and the prompt set when `prompts` is not given)
    tasks: DataConfig | None = None
    # prompts for win rate, KL and length: .txt lines, JSONL prompts, MT-/Vicuna-Bench questions, any preference data's
    # prompts
    prompts: DataConfig | None = None
    # held-out pairs: judge and implicit-reward accuracy; None = the first rm or dpo stage's eval_data
    preferences: DataConfig | None = None
    # human verdicts: preference rows over this eval's own replies (its pairs.jsonl, rated)
    verdicts: DataConfig | None = None
    stages: list[str] | None = None  # "base" and/or stage names; None = base and every stage
    reference: str | None = None  # "base" or a stage; None = the last sft stage, else base
    # an rm stage, a reward card (align.rewards.cards()) or rule file, or an rm stage folder; None = the last rm stage,
    # else none
    judge: str | None = None
    max_new_tokens: int = 32
    batch_size: int = 16
    do_sample: bool = False  # False: greedy replies
    temperature: float = 0.7
    top_p: float = 1.0
    seed: int = 0
    samples: int = 12  # prompts shown side by side in the report
    bootstrap: int = 2000  # paired-bootstrap resamples for each stage's task-accuracy change against the reference
    report: bool = True  # report.html beside eval.json (a sweep's trials skip it: their numbers go to its own report)

    def __post_init__(self):
        _require(self.tasks is not None or self.prompts is not None, "tasks", "give tasks, prompts or both")
        for name in ("max_new_tokens", "batch_size", "bootstrap"):
            _require(getattr(self, name) >= 1, name, f"must be >= 1, got {getattr(self, name)}")
        _require(self.temperature > 0, "temperature", f"must be > 0, got {self.temperature}")
        _require(0 < self.top_p <= 1, "top_p", f"must be in (0, 1], got {self.top_p}")

    def check_stages(self, stages: list, within: str = "") -> None:
        """Evaluated stages are policies; the reference is `base` or a stage; a judge that names a stage
        names an rm stage."""
        kinds = {s.name: kind_of(s) for s in stages}
        for i, name in enumerate(self.stages or []):
            _require(name not in kinds or kinds[name].policy, f"{within}stages[{i}]",
                     f"'{name}' is a reward model, not a policy to evaluate; name it as the judge instead")
        _require(self.reference in (None, "base", *kinds), f"{within}reference",
                 f"unknown stage '{self.reference}'; choose from: base, {', '.join(kinds)}")
        _require(self.reference not in kinds or kinds[self.reference].policy, f"{within}reference",
                 f"'{self.reference}' is a reward model, not a policy")
        judge_kind = kinds.get(self.judge)
        _require(judge_kind is None or judge_kind.produces == "reward", f"{within}judge",
                 f"stage '{self.judge}' is a {getattr(judge_kind, 'name', None)} stage; a judge is an rm stage or a "
                 "reward card")
        if self.judge and self.judge not in kinds:
            try:
                reward_source(self.judge, others="an rm stage of this recipe, ")
            except AlignError as e:
                raise ConfigError(str(e), key=f"{within}judge") from None


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
    # prompts per generation batch: larger batches share each step's fixed cost (nf4 dequantisation)
    batch_size: int = 64

    def __post_init__(self):
        for name in ("max_rows", "max_new_tokens", "batch_size"):
            _require(getattr(self, name) >= 1, name, f"must be >= 1, got {getattr(self, name)}")


@dataclass(kw_only=True)
class TrackingConfig:
    """The experiment trackers every stage's metrics go to (align.tracking), beside each stage's metrics.jsonl."""

    # tensorboard | wandb | mlflow | trackio; None = tensorboard where it is installed; [] = none
    report_to: list[str] | None = None
    project: str = "align"  # the tracker's project (W&B) or experiment (MLflow)
    group: str | None = None  # what groups the stages' runs; None = the recipe's name (a sweep: its study's)

    def __post_init__(self):
        for i, name in enumerate(self.report_to or []):
            _require(name in TRACKERS, f"report_to[{i}]",
                     f"unknown tracker '{name}'; choose from: {', '.join(TRACKERS)}")

    def trackers(self) -> list[str]:
        return default_trackers() if self.report_to is None else list(dict.fromkeys(self.report_to))


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
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
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
                self.eval.stages = ["base", *(s.name for s in self.stages if kind_of(s).policy)]
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
            if kind_of(stage).demonstrations and stage.replay_out is not None:
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
                    elif ref.output == "labels" and kind_of(self.stage(ref.stage)).produces != "data":
                        problem = f"stage '{ref.stage}' writes no labels (a label stage does)"
                    elif ref.output != "labels" and kind_of(self.stage(ref.stage)).produces == "data":
                        problem = f"stage '{ref.stage}' labels pairs and trains no adapter: use its labels"
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
    return yaml_binding.build(Recipe, root, _variants())


def _variants() -> dict[type, yaml_binding.Variants]:
    """A stage's `kind` picks its registered config (`kind: dpo` builds the dpo stage's), a reward source's key its
    own (`{rule: concise}` builds a RuleSource); read at each parse, so that kinds registered since count."""
    return {
        StageConfig: yaml_binding.Variants("kind", {name: kind.config for name, kind in KINDS.items()},
                                           label="stage kind"),
        RewardSource: yaml_binding.Variants(None, REWARD_SOURCES, label="reward source"),
    }
