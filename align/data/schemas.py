"""The few example types that stages accept. Converters in `formats.py` map public formats onto them.

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


@dataclass
class TaskExample:
    """A prompt, with a rule that checks its answer (see `align.eval.rules`) or `{}` for none.

    The `task` kind (held-out task accuracy) always has a rule; the `prompt` kind (the prompts PPO samples
    responses for) has one where rule-based rewards can use it.
    """

    prompt: list[Message]
    rule: dict = field(default_factory=dict)  # e.g. {"kind": "exact", "answer": "12"}; {} = no rule
