"""Held-out task accuracy: answers to verifiable prompts, checked by rule (`align.data.rules`)."""

from __future__ import annotations

from collections import defaultdict

from align.data.rules import check
from align.models.generation import Decoding, generate


def score_answers(examples, responses: list[str]) -> dict:
    """{"accuracy", "per_family", "correct", "samples"} of `responses` to `TaskExample`s (those with a rule count;
    `correct` is their verdicts in order, for paired comparisons)."""
    graded = [(ex, r, check(ex.rule, r)) for ex, r in zip(examples, responses) if ex.rule]
    if not graded:
        return {"accuracy": None, "per_family": {}, "correct": [], "samples": []}
    families: dict[str, list[bool]] = defaultdict(list)
    for ex, _, ok in graded:
        families[ex.rule.get("family", "all")].append(ok)
    return {
        "accuracy": sum(ok for _, _, ok in graded) / len(graded),
        "per_family": {f: sum(v) / len(v) for f, v in sorted(families.items())},
        "correct": [ok for _, _, ok in graded],
        "samples": [{"prompt": ex.prompt[-1]["content"], "response": r, "correct": ok} for ex, r, ok in graded[:8]],
    }


def task_accuracy(model, tokenizer, examples, max_new_tokens: int = 32, batch_size: int = 16) -> dict:
    """`score_answers` of the model's greedy answers."""
    replies = generate(model, tokenizer, [ex.prompt for ex in examples], Decoding(max_new_tokens), batch_size)
    return score_answers(examples, [r.text for r in replies])
