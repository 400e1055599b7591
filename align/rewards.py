"""Rewards that PPO (and evaluation) can use: `score(prompts, responses, rules) -> Tensor[B]`.

- `LearnedReward`: an `rm` stage's adapter and score head on the shared base. PPO scores token ids
  directly (`score_ids`), so a response is scored exactly as it was sampled.
- `RuleReward`: checks defined in a YAML file under `reward_models/` (or anywhere), for verifiable
  tasks. A `task` check uses the prompt's own rule (`align.eval.rules`); `regex` and `max_chars` check
  any response. Each check adds `reward` when it passes and `penalty` when it fails.

`load_reward(spec, model, tokenizer)` takes a folder an `rm` stage wrote, a rule file's path, or the
name of a file in `reward_models/` (`synthetic_tasks` is `reward_models/synthetic_tasks.yaml`).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import torch

from align import yaml_binding
from align.data.collate import encode, pad_sequences
from align.errors import AlignError, ConfigError
from align.eval.rules import check
from align.models import adapters, heads

REWARD_MODELS_DIR = Path(__file__).resolve().parents[1] / "reward_models"


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


class RuleReward:
    def __init__(self, spec: RuleRewardFile, path: str):
        self.spec, self.path = spec, path
        self.needs_rules = any(c.kind == "task" for c in spec.checks)

    @classmethod
    def from_file(cls, path: str | Path) -> RuleReward:
        text = Path(path).read_text(encoding="utf-8")
        root = yaml_binding.compose(text, str(path))
        if root is None:
            raise ConfigError("the rule reward file is empty", file=str(path))
        return cls(yaml_binding.build(RuleRewardFile, root, {}), str(path))

    def score(self, prompts, responses: list[str], rules: list[dict] | None = None) -> torch.Tensor:
        rules = rules or [{}] * len(responses)
        if self.needs_rules and not all(rules):
            raise AlignError(f"{self.path}: its 'task' check needs prompts that carry a rule")
        return torch.tensor(
            [sum(c.reward if c.passes(r, rule) else c.penalty for c in self.spec.checks) for r, rule in zip(responses, rules)]
        )


class LearnedReward:
    """A frozen reward adapter `name` with its score head on `model`, a PeftModel over the shared base."""

    def __init__(self, model, tokenizer, folder: str | Path, name: str, max_length: int = 512,
                 max_prompt_length: int = 256):
        self.model, self.tokenizer, self.name = model, tokenizer, name
        self.max_length, self.max_prompt_length = max_length, max_prompt_length  # score texts as the rm stage trained
        if name not in model.peft_config:  # a caller that loads all its adapters at once may have loaded it
            adapters.add_frozen(model, str(folder), name)
        self.head = heads.load_head(folder).to(model.device).requires_grad_(False)
        self.needs_rules = False

    @torch.no_grad()
    def score_ids(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """[B] scores of token sequences (prompt + response, padded on either side)."""
        with adapters.using(self.model, self.name):
            return heads.sequence_scores(self.model, self.head, input_ids, attention_mask).float()

    def score(self, prompts, responses: list[str], rules: list[dict] | None = None, batch_size: int = 16) -> torch.Tensor:
        out = []
        for i in range(0, len(responses), batch_size):
            pairs = []
            for prompt, response in zip(prompts[i : i + batch_size], responses[i : i + batch_size]):
                enc = encode(self.tokenizer, prompt, [{"role": "assistant", "content": response}],
                             self.max_length, self.max_prompt_length)
                pairs.append((enc.prompt_ids, enc.completion_ids))
            batch = pad_sequences(pairs, self.tokenizer.pad_token_id)
            out.append(self.score_ids(batch["input_ids"].to(self.model.device), batch["attention_mask"].to(self.model.device)))
        return torch.cat(out).cpu()


def find_rule_file(spec: str) -> Path | None:
    """A rule reward given by path, or by name in `reward_models/`."""
    for candidate in (Path(spec), REWARD_MODELS_DIR / spec, REWARD_MODELS_DIR / f"{spec}.yaml"):
        if candidate.is_file():
            return candidate
    return None


def load_reward(spec: str, model=None, tokenizer=None, name: str = "reward", lengths: tuple[int, int] = (512, 256)):
    """A rule reward (file or name), or a learned one (folder) loaded as adapter `name` onto `model`, scoring
    texts truncated to `lengths` (max_length, max_prompt_length) tokens."""
    rule_file = find_rule_file(spec)
    if rule_file:
        return RuleReward.from_file(rule_file)
    if (Path(spec) / heads.HEAD_FILE).is_file():
        if model is None:
            raise AlignError(f"{spec}: a learned reward needs the base model it was trained on")
        return LearnedReward(model, tokenizer, spec, name, *lengths)
    names = ", ".join(sorted(p.stem for p in REWARD_MODELS_DIR.glob("*.yaml")))
    raise AlignError(f"reward '{spec}': not a rule file, a name in reward_models/ ({names}), "
                     "or a folder written by an rm stage")
