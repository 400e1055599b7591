"""Where a reward comes from: the reward cards align ships, the sources a recipe names, and the one
factory that turns either into a `Reward`.

A recipe gives each source as a mapping whose key says what it is: `{model: ${rm.adapter}, weight: 1}`
or `{rule: synthetic_tasks, weight: 0.5}`. Each key is a `RewardSource` subclass registered under it
(`@register_source("model")`); the YAML binder builds the one whose key the mapping has. A new kind of
source is one such dataclass with its `load`, registered.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING, ClassVar

from align.errors import AlignError
from align.errors import require as _require

if TYPE_CHECKING:
    from importlib.resources.abc import Traversable

    from align.rewards.base import Reward

DEFAULT_LENGTHS = (512, 256)  # (max_length, max_prompt_length) a learned reward truncates texts to, unless told


def cards() -> dict[str, Traversable]:
    """The reward cards align ships (`align/rewards/cards/NAME.yaml`, package data), by name."""
    files = (resources.files("align.rewards") / "cards").iterdir()
    return {f.name.removesuffix(".yaml"): f for f in sorted(files, key=lambda f: f.name) if f.name.endswith(".yaml")}


def rule_file(spec: str) -> Path | Traversable | None:
    """The rule file `spec` names: a path, or a reward card's name (with or without `.yaml`)."""
    if Path(spec).is_file():
        return Path(spec)
    return cards().get(spec.removesuffix(".yaml"))


def _is_rm_folder(spec: str) -> bool:
    from align.models.heads import HEAD_FILE  # torch: only where a spec names no card

    return (Path(spec) / HEAD_FILE).is_file()


def _card_names() -> str:
    return ", ".join(cards())


REWARD_SOURCES: dict[str, type[RewardSource]] = {}  # the key that names a source in a recipe -> its class


def register_source(key: str):
    """Register a `RewardSource` subclass: a recipe's mapping with `key` builds it."""

    def register(cls: type[RewardSource]) -> type[RewardSource]:
        cls.key = key
        REWARD_SOURCES[key] = cls
        return cls

    return register


@dataclass(kw_only=True)
class RewardSource(ABC):
    """One weighted term of a reward; each subclass is one kind of source."""

    key: ClassVar[str]  # set by `register_source`
    weight: float = 1.0  # PPO sums its rewards with these weights; a judge has one reward and ignores it

    @property
    def adapter_folder(self) -> str | None:
        """The adapter the reward brings onto the base, which callers may load with their own; None if none."""
        return None

    @abstractmethod
    def load(self, model=None, tokenizer=None, adapter: str = "reward",
             lengths: tuple[int, int] = DEFAULT_LENGTHS) -> Reward:
        """The reward; see `load_reward`."""


@register_source("model")
@dataclass(kw_only=True)
class ModelSource(RewardSource):
    """A learned reward: the folder an rm stage wrote, its adapter and score head (`${rm.adapter}`)."""

    model: str

    @property
    def adapter_folder(self) -> str:
        return self.model

    def load(self, model=None, tokenizer=None, adapter: str = "reward",
             lengths: tuple[int, int] = DEFAULT_LENGTHS) -> Reward:
        from align.rewards.learned import LearnedReward

        if model is None:
            raise AlignError(f"{self.model}: a learned reward needs the base model it was trained on")
        return LearnedReward(model, tokenizer, self.model, adapter, *lengths)


@register_source("rule")
@dataclass(kw_only=True)
class RuleSource(RewardSource):
    """A rule reward: a reward card's name or a rule file's path."""

    rule: str

    def __post_init__(self):
        _require(rule_file(self.rule) is not None, "rule",
                 f"no rule-reward file '{self.rule}': give a path, or the name of a reward card ({_card_names()})")

    def load(self, model=None, tokenizer=None, adapter: str = "reward",
             lengths: tuple[int, int] = DEFAULT_LENGTHS) -> Reward:
        from align.rewards.rule import RuleReward

        return RuleReward.from_file(rule_file(self.rule))


def reward_source(spec: str, others: str = "") -> RewardSource:
    """The source a string names: a reward card, a rule file, or a folder an rm stage wrote. `others` names
    what else the caller would have taken (ending in ", "), for the error."""
    if rule_file(spec):
        return RuleSource(rule=spec)
    if _is_rm_folder(spec):
        return ModelSource(model=spec)
    raise AlignError(f"'{spec}' is neither {others}a reward card ({_card_names()}), a rule file, "
                     "nor a folder written by an rm stage")


def load_reward(source: RewardSource | str, model=None, tokenizer=None, adapter: str = "reward",
                lengths: tuple[int, int] = DEFAULT_LENGTHS) -> Reward:
    """The reward `source` gives (a string is read by `reward_source`). A learned one becomes the frozen
    adapter `adapter` of `model` (a PeftModel over the base it was trained on), scoring texts truncated to
    `lengths` (max_length, max_prompt_length) tokens; a rule reward needs no model."""
    return (reward_source(source) if isinstance(source, str) else source).load(model, tokenizer, adapter, lengths)
