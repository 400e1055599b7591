"""The few example types that stages accept. Converters in `converters.py` map public formats onto them.

Messages are chat messages, `{"role": "system"|"user"|"assistant", "content": str}`; a prompt is the
conversation up to (not including) the turn being trained or judged.
"""

from __future__ import annotations

from dataclasses import dataclass, field

Message = dict  # {"role": str, "content": str}


@dataclass
class SFTExample:
    """A conversation whose final assistant turn is the completion; the loss is on the completion only."""

    prompt: list[Message]
    completion: list[Message]


@dataclass
class PreferenceExample:
    """One prompt with a preferred (`chosen`) and a dispreferred (`rejected`) completion.

    `margin`, where the data gives one, says how much better `chosen` is; a reward model's loss then asks
    for at least that gap between the two rewards (TRL's RewardTrainer `margin`, Llama 2's margin loss).
    """

    prompt: list[Message]
    chosen: list[Message]
    rejected: list[Message]
    margin: float | None = None

    def as_ranked(self) -> RankedExample:
        """The pair as a ranking of two (the margin, a gap between rewards, has no place in one)."""
        return RankedExample(self.prompt, [self.chosen, self.rejected], [1.0, 0.0])

    def as_unpaired(self) -> list[UnpairedExample]:
        """The pair as two unpaired examples, KTO's way: `chosen` desirable, `rejected` not."""
        return [UnpairedExample(self.prompt, self.chosen, True), UnpairedExample(self.prompt, self.rejected, False)]


@dataclass
class RankedExample:
    """One prompt with K >= 2 responses, each with a score (higher is better, equal = tie).

    Compare scores only within one example: each format keeps its own scale (OASST's rank r becomes -r,
    UltraFeedback's ratings stay as given).
    """

    prompt: list[Message]
    responses: list[list[Message]]
    scores: list[float]

    def best_vs_worst(self) -> PreferenceExample:
        """The pair with the widest gap: the first highest-scored against the last lowest-scored response."""
        best = self.scores.index(max(self.scores))
        worst = len(self.scores) - 1 - self.scores[::-1].index(min(self.scores))
        return PreferenceExample(self.prompt, self.responses[best], self.responses[worst])


@dataclass
class UnpairedExample:
    """One prompt and one completion labelled desirable or not (KTO's data)."""

    prompt: list[Message]
    completion: list[Message]
    desirable: bool


@dataclass
class TaskExample:
    """A prompt, with a rule that checks its answer (see `align.data.rules`) or `{}` for none.

    The `task` kind (held-out task accuracy) always has a rule; the `prompt` kind (the prompts PPO samples
    responses for) has one where rule-based rewards can use it.
    """

    prompt: list[Message]
    rule: dict = field(default_factory=dict)  # e.g. {"kind": "exact", "answer": "12"}; {} = no rule
