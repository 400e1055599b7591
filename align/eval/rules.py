"""Rules that check a response to a verifiable task (`TaskExample.rule`).

Kinds:
- `exact`: the response equals `answer` after stripping surrounding whitespace and one trailing
  period, with runs of spaces collapsed. Case matters (capital letters are part of some tasks).
- `one_of`: the same comparison against any of `answers`.
- `json`: the response parses as JSON equal to `answer`.
"""

from __future__ import annotations

import json
import re


def _normalize(text: str) -> str:
    text = re.sub(r"\s+", " ", text.strip())
    return text[:-1].rstrip() if text.endswith(".") else text


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
    raise ValueError(f"unknown rule kind {kind!r}; known: exact, one_of, json")


RULE_KINDS = ("exact", "one_of", "json")
RULE_FIELDS = {"exact": "answer", "one_of": "answers", "json": "answer"}  # what each kind compares against
