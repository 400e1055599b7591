"""Rules that check a response to a verifiable task (`TaskExample.rule`), and the answer each expects.

Kinds:
- `exact`: the response equals `answer` after stripping surrounding whitespace and one trailing
  period, with runs of spaces collapsed. Case matters (capital letters are part of some tasks).
- `one_of`: the same comparison against any of `answers`.
- `json`: the response parses as JSON equal to `answer`.

They sit with the data because data, rewards and evaluation all read them: converters check a task
row's rule, rule rewards and task accuracy check responses against it.
"""

from __future__ import annotations

import json
import re

RULE_KINDS = ("exact", "one_of", "json")
RULE_FIELDS = {"exact": "answer", "one_of": "answers", "json": "answer"}  # what each kind compares against


def _normalize(text: str) -> str:
    text = re.sub(r"\s+", " ", text.strip())
    return text[:-1].rstrip() if text.endswith(".") else text


def _unknown(kind) -> ValueError:
    return ValueError(f"unknown rule kind {kind!r}; known: {', '.join(RULE_KINDS)}")


def check(rule: dict, response: str) -> bool:
    kind = rule.get("kind")
    if kind == "exact":
        return _normalize(response) == _normalize(str(rule["answer"]))
    if kind == "one_of":
        return _normalize(response) in {_normalize(str(a)) for a in rule["answers"]}
    if kind == "json":
        try:
            return json.loads(response.strip()) == rule["answer"]
        except json.JSONDecodeError:
            return False
    raise _unknown(kind)


def gold_answer(rule: dict) -> str | None:
    """A response the rule accepts, as text (one_of: its first answer); None for a prompt without a rule."""
    if not rule:
        return None
    kind = rule.get("kind")
    if kind == "exact":
        return str(rule["answer"])
    if kind == "one_of":
        return str(rule["answers"][0])
    if kind == "json":
        return json.dumps(rule["answer"], ensure_ascii=False)
    raise _unknown(kind)
