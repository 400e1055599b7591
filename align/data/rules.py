"""Rules that check a response to a verifiable task (`TaskExample.rule`), and the answer each expects.

Kinds:
- `exact`: the response equals `answer` after stripping surrounding whitespace and one trailing
  period, with runs of spaces collapsed. Case matters (capital letters are part of some tasks).
- `one_of`: the same comparison against any of `answers`.
- `json`: the response parses as JSON equal to `answer`.
- `math`: the response's final answer is mathematically equal to `answer` (math-verify: `0.5` equals `\\frac{1}{2}`,
  `1,000` equals `1000`). The final answer is what follows GSM8K's `####`, else the last `\\boxed{...}`, else the
  last number in the response.

They sit with the data because data, rewards and evaluation all read them: converters check a task
row's rule, rule rewards and task accuracy check responses against it.
"""

from __future__ import annotations

import json
import re

RULE_KINDS = ("exact", "one_of", "json", "math")
RULE_FIELDS = {"exact": "answer", "one_of": "answers", "json": "answer", "math": "answer"}  # what each compares against
_NUMBER = r"-?\d[\d,]*(?:\.\d+)?|-?\.\d+"


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
    if kind == "math":
        return _math_equal(final_answer(response), str(rule["answer"]))
    raise _unknown(kind)


def final_answer(response: str) -> str | None:
    """The answer a worked solution ends on: after GSM8K's `####`, else the last `\\boxed{...}`, else the last
    number; None when there is none."""
    marked = re.search(r"####\s*(.+)", response)
    if marked:
        return marked.group(1).strip()
    boxed = response.rfind("\\boxed{")
    if boxed >= 0:
        depth, start = 0, boxed + len("\\boxed{")
        for i in range(start, len(response)):
            depth += {"{": 1, "}": -1}.get(response[i], 0)
            if depth < 0:
                return response[start:i]
        return None  # an unclosed box is no answer
    numbers = re.findall(_NUMBER, response)
    return numbers[-1] if numbers else None


def _math_equal(answer: str | None, gold: str) -> bool:
    if answer is None:
        return False
    from math_verify import parse, verify  # sympy: imported only where a math rule is checked

    def parsed(text: str):
        text = text.replace(",", "") if re.fullmatch(r"-?[\d,]+(?:\.\d+)?", text.strip()) else text
        return parse(f"${text}$") or parse(text)

    return bool(verify(parsed(gold), parsed(answer)))


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
    if kind == "math":
        return f"#### {rule['answer']}"
    raise _unknown(kind)
