"""What every format's parts must be, whatever a format calls them: a prompt ends with the user message that the
response answers, a response holds the model's words only, a pair's two responses differ, a task's answer is one
a rule can compare with. The converters (align.data.converters) check every row with these; each names the field.
"""

from __future__ import annotations

import json

from align.data.schemas import Message
from align.errors import DataError


def short(value: object) -> str:
    text = json.dumps(value, ensure_ascii=False, default=str)
    return text if len(text) <= 60 else text[:57] + "..."


def checked_prompt(messages: list[Message], field: str, listed: bool = True) -> list[Message]:
    """A prompt ends with the user message that the response answers, and that message says something.

    `listed`: the prompt is the list at `field` (or its start), so its messages are named `field[i]`.
    """
    if not messages:
        raise DataError("has no prompt: a response needs a user message to answer", field=field)
    last = f"{field}[{len(messages) - 1}]" if listed else field
    if messages[-1]["role"] != "user":
        raise DataError(f"the prompt ends with a message of role '{messages[-1]['role']}'; it must end with the user "
                        "message that the response answers", field=last)
    if not messages[-1]["content"].strip():
        raise DataError("is empty; there is no question for the response to answer", field=last)
    return messages


def checked_response(messages: list[Message], field: str, first: int = 0) -> list[Message]:
    """A response is the model's: assistant messages only (any other would be trained as the model's words),
    not all blank. `first` is the index of `messages[0]` in the list at `field`."""
    for i, message in enumerate(messages, start=first):
        if message["role"] != "assistant":
            raise DataError(f"is '{message['role']}' inside the response; a response holds only assistant messages",
                            field=f"{field}[{i}].role")
    if not any(m["content"].strip() for m in messages):
        raise DataError("is empty; there is nothing to train on", field=field)
    return messages


def said(messages: list[Message]) -> tuple:
    """What a response says, to compare responses: whitespace around a message's text does not count."""
    return tuple((m["role"], m["content"].strip()) for m in messages)


def check_differ(chosen: list[Message], rejected: list[Message]) -> None:
    # A pair with the same answer on both sides carries no preference, only noise.
    if said(chosen) == said(rejected):
        raise DataError("is identical to 'chosen'; a pair needs two different responses", field="rejected")


def check_answer(answer: object, field: str) -> None:
    # The rules compare a response with the answer's text: null would be "None", a list its Python repr.
    if isinstance(answer, bool) or not isinstance(answer, (str, int, float)) or not str(answer).strip():
        raise DataError(f"expected an answer: a non-empty string or a number, got {short(answer)}", field=field)
