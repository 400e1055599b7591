"""Rule rewards: checks defined in a YAML file (a reward card, or any file), for verifiable tasks.

A `task` check uses the prompt's own rule (`align.data.rules`); `regex` and `max_chars` check any
response. Each check adds `reward` when it passes and `penalty` when it fails.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import torch

from align import yaml_binding
from align.data.rules import check
from align.errors import AlignError, ConfigError
from align.rewards.base import Reward


@dataclass(kw_only=True)
class RuleCheck:
    kind: Literal["task", "regex", "max_chars"]
    pattern: str | None = None  # regex: passes when re.search finds it in the response
    limit: int | None = None  # max_chars: passes when the stripped response is at most this long
    reward: float = 1.0  # added when the check passes
    penalty: float = 0.0  # added when it fails

    def __post_init__(self):
        if self.kind == "regex":
            if self.pattern is None:
                raise ConfigError("a regex check needs a 'pattern'", key="pattern")
            try:
                re.compile(self.pattern)
            except re.error as err:
                raise ConfigError(f"not a regular expression: {err}", key="pattern") from None
        if self.kind == "max_chars" and (self.limit is None or self.limit < 1):
            raise ConfigError("a max_chars check needs a 'limit' >= 1", key="limit")

    def passes(self, response: str, rule: dict) -> bool:
        if self.kind == "task":
            return check(rule, response)
        if self.kind == "regex":
            return re.search(self.pattern, response) is not None
        return len(response.strip()) <= self.limit


@dataclass(kw_only=True)
class RuleRewardFile:
    name: str
    description: str = ""
    checks: list[RuleCheck] = field(default_factory=list)

    def __post_init__(self):
        if not self.checks:
            raise ConfigError("a rule reward needs at least one check", key="checks")


class RuleReward(Reward):
    kind = "rule"

    def __init__(self, spec: RuleRewardFile, path: str):
        self.spec, self.path, self.name = spec, path, spec.name
        self.needs_rules = any(c.kind == "task" for c in spec.checks)

    @classmethod
    def from_file(cls, path: Path) -> RuleReward:
        """The rule reward in `path`, a file or a packaged card (anything with `read_text`)."""
        root = yaml_binding.compose(path.read_text(encoding="utf-8"), str(path))
        if root is None:
            raise ConfigError("the rule reward file is empty", file=str(path))
        return cls(yaml_binding.build(RuleRewardFile, root, {}), str(path))

    def score(self, prompts, responses: list[str], rules: list[dict] | None = None) -> torch.Tensor:
        rules = rules or [{}] * len(responses)
        if self.needs_rules and not all(rules):
            raise AlignError(f"{self.path}: its 'task' check needs prompts that carry a rule")
        return torch.tensor(
            [sum(c.reward if c.passes(r, rule) else c.penalty for c in self.spec.checks)
             for r, rule in zip(responses, rules)]
        )
