"""The sweep file of `align sweep`: what to search, what to score, how.

```yaml
space:                                          # any recipe key, as overrides spell it
  stages.dpo.train.lr: {log_uniform: [1.0e-5, 1.0e-3]}
  stages.dpo.loss.beta: [0.05, 0.1, 0.3]         # a list: choices
  stages.dpo.loss.rpo_alpha: {uniform: [0.0, 2.0]}
  stages.sft.train.max_steps: {integer: [20, 60], step: 10}
  stages.sft.data.0.weight: {uniform: [0.2, 0.8]}  # list items by index or by name
objective: {metric: eval.stages.dpo.task_accuracy, direction: maximize}   # a number of summary.json; a list of
                                                                          # them: a multi-objective study
trial:                                          # what a trial changes in the recipe besides the space
  eval.tasks: {path: "synthetic:validation"}     # scored on prompts disjoint from the reported held-out ones
  eval.stages: [dpo]
sampler: {type: tpe, startup_trials: 4}         # tpe (default) | random | grid
pruning: {stage: dpo, metric: eval_rewards/accuracies, warmup_steps: 10}
trials: 12
```

The file is read as a node tree (align.yaml_binding), so a mistake names the file, the line and the key; a space key
that is not a recipe key fails before any trial runs.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import yaml
from yaml.nodes import MappingNode, ScalarNode, SequenceNode

from align import yaml_binding
from align.config import parse_recipe
from align.errors import ConfigError, require


@dataclass(kw_only=True)
class Param:
    """One searched recipe key; exactly one of log_uniform, uniform, integer, choices."""

    key: str
    log_uniform: list[float] | None = None  # [low, high], sampled on a log scale
    uniform: list[float] | None = None  # [low, high]
    integer: list[int] | None = None  # [low, high], both included
    choices: list[str | float | int | bool] | None = None
    step: float | None = None  # uniform and integer: the grid of values between low and high
    log: bool = False  # integer: sampled on a log scale

    def __post_init__(self):
        given = [name for name in ("log_uniform", "uniform", "integer", "choices") if getattr(self, name) is not None]
        require(len(given) == 1, "log_uniform", "give exactly one of log_uniform, uniform, integer, choices"
                + (f", not {' and '.join(given)}" if given else ""))
        self.kind = given[0]
        if self.kind != "choices":
            bounds = getattr(self, self.kind)
            require(len(bounds) == 2 and bounds[0] < bounds[1], self.kind, f"expected [low, high] with low < high, "
                    f"got {bounds}")
            require(self.kind != "log_uniform" or bounds[0] > 0, self.kind, "a log scale needs low > 0")
        else:
            require(len(self.choices) >= 1, "choices", "give at least one choice")
            self.choices = [_scalar(c) for c in self.choices]

    def suggest(self, trial):
        """This key's value for an Optuna trial (a retried trial gets its earlier value back)."""
        if self.kind == "choices":
            return trial.suggest_categorical(self.key, self.choices)
        low, high = getattr(self, self.kind)
        if self.kind == "integer":
            return trial.suggest_int(self.key, low, high, step=int(self.step or 1), log=self.log)
        return trial.suggest_float(self.key, low, high, log=self.kind == "log_uniform", step=self.step)

    def grid(self) -> list:
        """Every value a grid search tries."""
        if self.kind == "choices":
            return list(self.choices)
        require(self.step is not None, self.key, "a grid search needs choices, or a `step` for a range")
        low, high = getattr(self, self.kind)
        count = math.floor((high - low) / self.step + 1e-9) + 1
        return [low + i * self.step if self.kind != "integer" else int(low + i * self.step) for i in range(count)]


@dataclass(kw_only=True)
class Objective:
    metric: str  # a dotted path into the trial run's summary.json, such as eval.stages.dpo.task_accuracy
    direction: Literal["maximize", "minimize"] = "maximize"

    def value(self, summary: dict, where: str) -> float:
        node = summary
        for i, part in enumerate(self.metric.split(".")):
            if not isinstance(node, dict) or part not in node:
                here = ".".join(self.metric.split(".")[:i]) or "the top level"
                keys = ", ".join(node) if isinstance(node, dict) else "no keys (a value)"
                raise ConfigError(f"{where} has no '{part}' under {here}; there: {keys}", key="objective.metric")
            node = node[part]
        if not isinstance(node, (int, float)) or isinstance(node, bool):
            raise ConfigError(f"{where} has {node!r} at {self.metric}, not a number", key="objective.metric")
        return float(node)


@dataclass(kw_only=True)
class Sampler:
    type: Literal["tpe", "random", "grid"] = "tpe"
    # tpe: random trials before the model of good and bad settings takes over; None = a third of the trials (at
    # least 2): Optuna's default of 10 would leave a 12-trial budget almost all random
    startup_trials: int | None = None
    seed: int | None = None  # None = the recipe's seed

    def __post_init__(self):
        require(self.startup_trials is None or self.startup_trials >= 1, "startup_trials", "must be >= 1")


@dataclass(kw_only=True)
class Pruning:
    """Stop a trial whose stage falls behind the median of earlier trials at the same step (Optuna's MedianPruner).
    The metric must mean the same in every trial and rise with the objective: an eval accuracy, not `eval_loss`
    (DPO's includes the NLL term and scales with beta)."""

    stage: str  # the stage whose eval metric is reported
    metric: str  # an eval metric of its metrics.jsonl, such as eval_rewards/accuracies
    warmup_steps: int = 0  # no pruning before this step
    startup_trials: int = 2  # no pruning until this many trials have finished

    def __post_init__(self):
        require(self.metric.startswith("eval_"), "metric", f"'{self.metric}' is not an eval metric (eval_...): only "
                "those are measured alike in every trial")
        require(self.metric != "eval_loss", "metric", "eval_loss is not comparable across trials (DPO's includes the "
                "NLL term and scales with beta); report an accuracy such as eval_rewards/accuracies")


@dataclass(kw_only=True)
class Heartbeat:
    """A trial whose process died (killed, out of memory) stops beating; after `grace` seconds it is failed and
    retried with the same parameters, resuming from its checkpoint."""

    interval: int = 10  # seconds
    grace: int = 30  # seconds

    def __post_init__(self):
        require(1 <= self.interval < self.grace, "grace", "need 1 <= interval < grace")


@dataclass(kw_only=True)
class SweepFile:
    space: list[Param]
    objective: list[Objective]
    trial: list[str] = field(default_factory=list)  # key=value overrides every trial applies to the recipe
    sampler: Sampler = field(default_factory=Sampler)
    pruning: Pruning | None = None
    trials: int = 12
    heartbeat: Heartbeat = field(default_factory=Heartbeat)
    recipe: str | None = None  # the recipe it was written for, relative to this file (the command line's comes first)
    path: str = field(default="", init=False)

    def __post_init__(self):
        require(len(self.space) >= 1, "space", "give at least one key to search")
        require(self.trials >= 1, "trials", "must be >= 1")
        require(self.pruning is None or len(self.objective) == 1, "pruning", "pruning needs a single objective: a "
                "multi-objective study has no one order to prune by")

    @property
    def directions(self) -> list[str]:
        return [o.direction for o in self.objective]

    def overrides(self, params: dict) -> list[str]:
        """The recipe overrides of one trial: the trial section, then its parameters."""
        return [*self.trial, *self.param_overrides(params)]

    @staticmethod
    def param_overrides(params: dict) -> list[str]:
        return [f"{key}={_yaml_value(value)}" for key, value in params.items()]

    def check(self, recipe_text: str, recipe_source: str, base_overrides: list[str]) -> None:
        """Every space key at its low and its high value, and the trial section, applied to the recipe: a key that is
        not a recipe key, or a value it does not take, fails here, before any trial."""
        for pick in (0, -1):
            params = {p.key: (p.choices if p.kind == "choices" else getattr(p, p.kind))[pick] for p in self.space}
            parse_recipe(recipe_text, recipe_source, [*base_overrides, *self.overrides(params)])
        if self.pruning and self.pruning.stage not in {s.name for s in parse_recipe(recipe_text, recipe_source).stages}:
            raise ConfigError(f"the recipe has no stage '{self.pruning.stage}'", file=self.path, key="pruning.stage")


def _scalar(text: str):
    """A choice as YAML reads it (0.3 a number, true a bool), numbers such as 1e-4 included."""
    value = yaml.safe_load(text)
    return float(value) if isinstance(value, str) and yaml_binding.NUMBER.fullmatch(value) else value


def _yaml_value(value) -> str:
    # PyYAML writes 1e-05 as 1.0e-05, which it reads back as a number
    return yaml.safe_dump(value, default_flow_style=True).removesuffix("\n...\n").strip()


def load_sweep(path: str | Path) -> SweepFile:
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"cannot read the sweep file: {e}", file=str(path)) from None
    root = yaml_binding.compose(text, str(path))
    if not isinstance(root, MappingNode):
        raise ConfigError("the sweep file must be a mapping of keys (space, objective, ...)", file=str(path))
    for i, (key, value) in enumerate(root.value):
        if key.value == "space" and isinstance(value, MappingNode):
            root.value[i] = (key, SequenceNode("tag:yaml.org,2002:seq", [_param_node(k, v) for k, v in value.value],
                                               value.start_mark, value.end_mark))
        elif key.value == "objective" and isinstance(value, MappingNode):
            root.value[i] = (key, SequenceNode("tag:yaml.org,2002:seq", [value], value.start_mark, value.end_mark))
        elif key.value == "trial" and isinstance(value, MappingNode):
            items = [ScalarNode("tag:yaml.org,2002:str", f"{k.value}={yaml.serialize(v).strip()}", k.start_mark,
                                k.end_mark) for k, v in value.value]
            root.value[i] = (key, SequenceNode("tag:yaml.org,2002:seq", items, value.start_mark, value.end_mark))
    sweep = yaml_binding.build(SweepFile, root, {})
    sweep.path = str(path)
    return sweep


def _param_node(key: ScalarNode, spec) -> MappingNode:
    """`key: spec` of the space as the mapping a Param is built from: a list is its choices."""
    tag = "tag:yaml.org,2002:str"
    if isinstance(spec, SequenceNode):
        choices = ScalarNode(tag, "choices", spec.start_mark, spec.end_mark)
        spec = MappingNode("tag:yaml.org,2002:map", [(choices, spec)], spec.start_mark, spec.end_mark)
    if not isinstance(spec, MappingNode):
        raise ConfigError("expected a list of choices or a mapping such as {log_uniform: [low, high]}",
                          file=key.start_mark.name, line=key.start_mark.line + 1, key=f"space.{key.value}")
    pairs = [(ScalarNode(tag, "key", key.start_mark, key.end_mark), ScalarNode(tag, key.value, key.start_mark,
                                                                               key.end_mark)), *spec.value]
    return MappingNode("tag:yaml.org,2002:map", pairs, spec.start_mark, spec.end_mark)
