"""The embedded default task: short instructions whose good answers a rule can check.

Seven families (addition, capital letters, repetition, first item of a list, the larger number, a JSON
object, sorting). Each instance has one good answer and several plausible bad ones: a near miss in the
content (off by one, the wrong item, one repetition too many) or the right content in the wrong form
(a chatty sentence instead of the bare answer). That gives, without any download:

- `sft`: good answers as SFT completions;
- `preference`: good against a plausible bad answer, for DPO;
- `preference_all`: the same prompts with every bad answer, one pair each: all the comparisons a prompt
  offers, as InstructGPT trains its reward model (more near misses for a reward model to tell apart);
- `prompts`: training prompts with their checking rule, for PPO to sample responses for;
- `heldout`: prompts with their checking rule (`align.eval.rules`), for task accuracy;
- `preference_heldout`: pairs on held-out prompts, for reward accuracy and margin.

Every split also loads as the `prompt` kind: its prompts, each with its rule.

Held-out prompts never occur in a training split: every prompt is assigned to one side by a hash of
its text, so the split is the same on every machine and every run.
"""

from __future__ import annotations

import hashlib
import json
import random
from typing import Callable

from align.data.schemas import PreferenceExample, SFTExample, TaskExample

WORDS = (
    "apple river stone cloud garden window silver forest candle rabbit orange pencil rocket castle "
    "guitar lemon island summer winter planet marble tiger violet bridge copper meadow anchor falcon "
    "harbor jacket kettle ladder mirror needle ocean pepper quartz saddle tunnel valley wagon yellow "
    "zebra basket cactus dragon engine feather hammer igloo jungle kitten lantern mango"
).split()
JSON_KEYS = "id count age score level total year size".split()

Instance = tuple[str, str, list[str], dict]  # prompt, good answer, bad answers, rule


def _add(rng: random.Random) -> Instance:
    a, b = rng.randint(2, 49), rng.randint(2, 49)
    s = a + b
    return (
        f"What is {a} + {b}? Reply with the number only.",
        str(s),
        [str(s + 1), str(s - 1), f"{a} + {b} = {s}", f"The answer is {s}."],
        {"kind": "exact", "answer": str(s)},
    )


def _capitals(rng: random.Random) -> Instance:
    w = " ".join(rng.sample(WORDS, rng.randint(1, 2)))
    return (
        f"Write '{w}' in capital letters. Reply with the capitalized text only.",
        w.upper(),
        [w, w.title(), f"In capital letters: {w.upper()}."],
        {"kind": "exact", "answer": w.upper()},
    )


def _repeat(rng: random.Random) -> Instance:
    w, n = rng.choice(WORDS), rng.randint(2, 5)
    good = " ".join([w] * n)
    return (
        f"Repeat the word '{w}' {n} times, separated by spaces.",
        good,
        [" ".join([w] * (n + 1)), " ".join([w] * (n - 1)), f"Sure! {good}"],
        {"kind": "exact", "answer": good},
    )


def _first_item(rng: random.Random) -> Instance:
    items = rng.sample(WORDS, rng.randint(3, 4))
    listed = ", ".join(items)
    return (
        f"What is the first item in this list: {listed}? Reply with the item only.",
        items[0],
        [items[1], items[-1], f"The first item is {items[0]}."],
        {"kind": "exact", "answer": items[0]},
    )


def _larger(rng: random.Random) -> Instance:
    a, b = rng.sample(range(1, 100), 2)
    hi, lo = max(a, b), min(a, b)
    return (
        f"Which number is larger, {a} or {b}? Reply with the number only.",
        str(hi),
        [str(lo), f"{hi} is larger than {lo}."],
        {"kind": "exact", "answer": str(hi)},
    )


def _json_object(rng: random.Random) -> Instance:
    k, v = rng.choice(JSON_KEYS), rng.randint(1, 99)
    return (
        f'Return a JSON object with the key "{k}" set to {v}. Reply with the JSON only.',
        json.dumps({k: v}),
        [f"{{{k}: {v}}}", json.dumps({k: v + 1}), f"Here is the JSON: {json.dumps({k: v})}"],
        {"kind": "json", "answer": {k: v}},
    )


def _sort(rng: random.Random) -> Instance:
    nums = rng.sample(range(1, 60), 3)
    ordered = sorted(nums)
    return (
        f"Sort these numbers from smallest to largest: {nums[0]}, {nums[1]}, {nums[2]}. "
        "Reply with the numbers separated by commas.",
        ", ".join(map(str, ordered)),
        [", ".join(map(str, reversed(ordered))), ", ".join(map(str, [ordered[1], ordered[0], ordered[2]]))],
        {"kind": "exact", "answer": ", ".join(map(str, ordered))},
    )


FAMILIES: dict[str, Callable[[random.Random], Instance]] = {
    "add": _add,
    "capitals": _capitals,
    "repeat": _repeat,
    "first_item": _first_item,
    "larger": _larger,
    "json": _json_object,
    "sort": _sort,
}
SPLIT_SIZES = {"sft": 448, "preference": 448, "preference_all": 448, "prompts": 448, "heldout": 70,
               "preference_heldout": 70}  # in prompts
SPLIT_KINDS = {"sft": "sft", "preference": "preference", "preference_all": "preference", "prompts": "task",
               "heldout": "task", "preference_heldout": "preference"}


def _is_heldout(prompt: str) -> bool:
    return hashlib.sha256(prompt.encode()).digest()[0] < 52  # about one prompt in five


def instances(split: str, n: int | None = None, seed: int = 0) -> list[tuple[str, Instance]]:
    """`n` distinct (family, instance) on the split's side of the held-out line, families in turn."""
    n = SPLIT_SIZES[split] if n is None else n
    heldout = split in ("heldout", "preference_heldout")
    # Each split draws from its own stream, so SFT, DPO and PPO see different prompts.
    rng = random.Random(f"{'preference' if split == 'preference_all' else split}:{seed}")
    names = list(FAMILIES)
    seen: set[str] = set()
    out: list[tuple[str, Instance]] = []
    while len(out) < n:
        family = names[len(out) % len(names)]
        for _ in range(1000):
            inst = FAMILIES[family](rng)
            if inst[0] not in seen and _is_heldout(inst[0]) == heldout:
                break
        else:
            raise ValueError(f"synthetic split {split}: family {family} has too few distinct prompts for n={n}")
        seen.add(inst[0])
        out.append((family, inst))
    return out


def _user(text: str) -> list[dict]:
    return [{"role": "user", "content": text}]


def _assistant(text: str) -> list[dict]:
    return [{"role": "assistant", "content": text}]


def load(split: str, kind: str, n: int | None = None, seed: int = 0) -> list:
    """Examples of one split as schema objects (`kind` must be the split's kind, or "prompt")."""
    if split not in SPLIT_KINDS:
        raise ValueError(f"unknown synthetic split '{split}'; known: {', '.join(SPLIT_KINDS)}")
    if kind not in (SPLIT_KINDS[split], "prompt"):
        raise ValueError(f"synthetic:{split} holds {SPLIT_KINDS[split]} examples (or prompts), not {kind}")
    rng = random.Random(f"bad:{split}:{seed}")
    examples: list = []
    if split == "preference_all" and kind == "preference":  # `n` counts pairs here, not prompts
        for _, (prompt, good, bads, _) in instances(split, seed=seed):
            examples.extend(PreferenceExample(_user(prompt), _assistant(good), _assistant(bad)) for bad in bads)
        return examples[:n]
    for family, (prompt, good, bads, rule) in instances(split, n, seed):
        if kind == "sft":
            examples.append(SFTExample(_user(prompt), _assistant(good)))
        elif kind == "preference":
            examples.append(PreferenceExample(_user(prompt), _assistant(good), _assistant(rng.choice(bads))))
        else:  # task or prompt: every instance has its rule
            examples.append(TaskExample(_user(prompt), {**rule, "family": family}))
    return examples


def corpus() -> list[str]:
    """Every text the task can show a model: the tiny tokenizer is trained on it."""
    texts = []
    for split in ("sft", "heldout"):
        for _, (prompt, good, bads, _) in instances(split):
            texts.extend([prompt, good, *bads])
    return texts + ["system", "user", "assistant", "You are a helpful assistant."]
