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
    """One prompt with a preferred (`chosen`) and a dispreferred (`rejected`) completion."""

    prompt: list[Message]
    chosen: list[Message]
    rejected: list[Message]


@dataclass
class TaskExample:
    """A prompt whose answer a rule can check (see `align.eval.rules`): held-out task accuracy."""

    prompt: list[Message]
    rule: dict = field(default_factory=dict)  # e.g. {"kind": "exact", "answer": "12"}
