"""Held-out task accuracy: greedy answers to verifiable prompts, checked by rule."""

from __future__ import annotations

from collections import defaultdict

import torch

from align.data.collate import encode_prompt, left_pad
from align.eval.rules import check


@torch.no_grad()
def generate(model, tokenizer, prompts: list[list[dict]], max_new_tokens: int, batch_size: int) -> list[str]:
    """Greedy completions of chat prompts, in order, batched with left padding."""
    was_training = model.training
    model.eval()
    encoded = [encode_prompt(tokenizer, p) for p in prompts]
    order = sorted(range(len(encoded)), key=lambda i: len(encoded[i]))  # similar lengths pad less
    texts: dict[int, str] = {}
    for start in range(0, len(order), batch_size):
        idx = order[start : start + batch_size]
        batch = left_pad([encoded[i] for i in idx], tokenizer.pad_token_id)
        batch = {k: v.to(model.device) for k, v in batch.items()}
        out = model.generate(
            **batch,
            max_new_tokens=max_new_tokens,
            do_sample=False,
            pad_token_id=tokenizer.pad_token_id,
            eos_token_id=tokenizer.eos_token_id,
        )
        for i, seq in zip(idx, out[:, batch["input_ids"].shape[1] :]):
            texts[i] = tokenizer.decode(seq, skip_special_tokens=True)
    model.train(was_training)
    return [texts[i] for i in range(len(prompts))]


def task_accuracy(model, tokenizer, examples, max_new_tokens: int = 32, batch_size: int = 16) -> dict:
    """{"accuracy", "per_family", "samples"} over `TaskExample`s."""
    responses = generate(model, tokenizer, [ex.prompt for ex in examples], max_new_tokens, batch_size)
    correct = [check(ex.rule, r) for ex, r in zip(examples, responses)]
    families: dict[str, list[bool]] = defaultdict(list)
    for ex, ok in zip(examples, correct):
        families[ex.rule.get("family", "all")].append(ok)
    return {
        "accuracy": sum(correct) / len(correct),
        "per_family": {f: sum(v) / len(v) for f, v in sorted(families.items())},
        "samples": [
            {"prompt": ex.prompt[-1]["content"], "response": r, "correct": ok}
            for ex, r, ok in list(zip(examples, responses, correct))[:8]
        ],
    }
