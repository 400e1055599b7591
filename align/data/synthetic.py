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
- `heldout`: prompts with their checking rule (`align.data.rules`), for task accuracy;
- `preference_heldout`: pairs on held-out prompts, for reward accuracy and margin;
- `validation`, `preference_validation`: the same 84 prompts (12 per family) as tasks and as pairs, for choosing
  settings (`align sweep`) without looking at the reported held-out prompts: they occur in no other split, neither
  in the first `HELDOUT_RESERVED` prompts of `heldout` nor in any training split;
- `ranked`, `ranked_heldout`: each prompt with four answers in shuffled order, scored 3 (the good answer),
  2 (the right content in the wrong form: a chatty sentence around the good answer), 1 (a near miss in
  the content) and 0 (the good answer to another prompt of the family), for listwise preference training.
- `chatty_preference`, `chatty_heldout`: preferences of raters who like friendly full sentences, the
  chatty answer chosen over the bare one that the prompt asks for, and held-out prompts whose rule
  wants the chatty answer: preference data that pulls a model away from what SFT taught, to show
  forgetting and what replay does against it.

`<split>?families=a,b` keeps the named families only (`synthetic:sft?families=json,repeat`), drawn from
a stream of their own.

Every split also loads as the `prompt` kind: its prompts, each with its rule. The ranked splits also load
as `preference` (each group's best against its worst answer), the preference splits as `ranked` (rankings
of two), and both as `unpaired` (each pair as a desirable and an undesirable completion, for KTO).

Held-out prompts never occur in a training split: every prompt is assigned to one side by a hash of
its text, so the split is the same on every machine and every run.
"""

from __future__ import annotations

import functools
import hashlib
import json
import random
from collections.abc import Callable
from typing import NamedTuple

from align.data.schemas import PreferenceExample, RankedExample, SFTExample, TaskExample

WORDS = (
    "apple river stone cloud garden window silver forest candle rabbit orange pencil rocket castle "
    "guitar lemon island summer winter planet marble tiger violet bridge copper meadow anchor falcon "
    "harbor jacket kettle ladder mirror needle ocean pepper quartz saddle tunnel valley wagon yellow "
    "zebra basket cactus dragon engine feather hammer igloo jungle kitten lantern mango"
).split()
JSON_KEYS = "id count age score level total year size".split()

class Instance(NamedTuple):
    prompt: str
    good: str
    bads: list[str]  # plausible bad answers, for the preference splits
    rule: dict
    chatty: str  # the right content in the wrong form: the good answer inside a sentence
    near_misses: list[str]  # bad answers that are wrong in their content: off by one, the wrong item


def _add(rng: random.Random) -> Instance:
    a, b = rng.randint(2, 49), rng.randint(2, 49)
    s = a + b
    near_misses, chatty = [str(s + 1), str(s - 1)], f"The answer is {s}."
    return Instance(
        f"What is {a} + {b}? Reply with the number only.",
        str(s),
        [*near_misses, f"{a} + {b} = {s}", chatty],
        {"kind": "exact", "answer": str(s)},
        chatty, near_misses,
    )


def _capitals(rng: random.Random) -> Instance:
    w = " ".join(rng.sample(WORDS, rng.randint(1, 2)))
    near_misses, chatty = [w, w.title()], f"In capital letters: {w.upper()}."
    return Instance(
        f"Write '{w}' in capital letters. Reply with the capitalized text only.",
        w.upper(),
        [*near_misses, chatty],
        {"kind": "exact", "answer": w.upper()},
        chatty, near_misses,
    )


def _repeat(rng: random.Random) -> Instance:
    w, n = rng.choice(WORDS), rng.randint(2, 5)
    good = " ".join([w] * n)
    near_misses, chatty = [" ".join([w] * (n + 1)), " ".join([w] * (n - 1))], f"Sure! {good}"
    return Instance(
        f"Repeat the word '{w}' {n} times, separated by spaces.",
        good,
        [*near_misses, chatty],
        {"kind": "exact", "answer": good},
        chatty, near_misses,
    )


def _first_item(rng: random.Random) -> Instance:
    items = rng.sample(WORDS, rng.randint(3, 4))
    listed = ", ".join(items)
    near_misses, chatty = [items[1], items[-1]], f"The first item is {items[0]}."
    return Instance(
        f"What is the first item in this list: {listed}? Reply with the item only.",
        items[0],
        [*near_misses, chatty],
        {"kind": "exact", "answer": items[0]},
        chatty, near_misses,
    )


def _larger(rng: random.Random) -> Instance:
    a, b = rng.sample(range(1, 100), 2)
    hi, lo = max(a, b), min(a, b)
    near_misses, chatty = [str(lo)], f"{hi} is larger than {lo}."
    return Instance(
        f"Which number is larger, {a} or {b}? Reply with the number only.",
        str(hi),
        [*near_misses, chatty],
        {"kind": "exact", "answer": str(hi)},
        chatty, near_misses,
    )


def _json_object(rng: random.Random) -> Instance:
    k, v = rng.choice(JSON_KEYS), rng.randint(1, 99)
    near_misses, chatty = [json.dumps({k: v + 1})], f"Here is the JSON: {json.dumps({k: v})}"
    return Instance(
        f'Return a JSON object with the key "{k}" set to {v}. Reply with the JSON only.',
        json.dumps({k: v}),
        [f"{{{k}: {v}}}", *near_misses, chatty],  # the first: JSON without quotes, neither content nor chat
        {"kind": "json", "answer": {k: v}},
        chatty, near_misses,
    )


def _sort(rng: random.Random) -> Instance:
    nums = rng.sample(range(1, 60), 3)
    ordered = sorted(nums)
    good = ", ".join(map(str, ordered))
    near_misses = [", ".join(map(str, reversed(ordered))), ", ".join(map(str, [ordered[1], ordered[0], ordered[2]]))]
    return Instance(
        f"Sort these numbers from smallest to largest: {nums[0]}, {nums[1]}, {nums[2]}. "
        "Reply with the numbers separated by commas.",
        good,
        near_misses,  # without the chatty answer, which came later: the preference splits' data stays as it was
        {"kind": "exact", "answer": good},
        f"Sorted: {good}.", near_misses,
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
               "preference_heldout": 70, "ranked": 448, "ranked_heldout": 70,
               "chatty_preference": 448, "chatty_heldout": 70, "validation": 84,
               "preference_validation": 84}  # in prompts
SPLIT_KINDS = {"sft": "sft", "preference": "preference", "preference_all": "preference", "prompts": "task",
               "heldout": "task", "preference_heldout": "preference", "ranked": "ranked", "ranked_heldout": "ranked",
               "chatty_preference": "preference", "chatty_heldout": "task", "validation": "task",
               "preference_validation": "preference"}
HELDOUT_SPLITS = ("heldout", "preference_heldout", "ranked_heldout", "chatty_heldout")
TRAINING_SPLITS = ("sft", "preference", "prompts", "ranked", "chatty_preference")
VALIDATION_SPLITS = ("validation", "preference_validation")
# The held-out prompts the README reports accuracy on are `heldout`'s first 336; reserved: all that it can hold
# (the repeat family has 49 prompts on the held-out side)
HELDOUT_RESERVED = 343
STREAMS = {"preference_all": "preference", "preference_validation": "validation"}  # splits that share prompts
# The kinds a split's examples also load as, besides "prompt"; task splits load as SFT with their right answer
ALSO_LOADS_AS = {"preference": ("ranked", "unpaired"), "ranked": ("preference", "unpaired"), "task": ("sft",)}


def _is_heldout(prompt: str) -> bool:
    return hashlib.sha256(prompt.encode()).digest()[0] < 52  # about one prompt in five


@functools.cache
def _reserved(seed: int) -> frozenset[str]:
    """Every prompt a training split or the reported held-out prompts may hold: the validation splits avoid them."""
    prompts = {inst.prompt for split in TRAINING_SPLITS for _, inst in instances(split, seed=seed)}
    return frozenset(prompts | {inst.prompt for _, inst in instances("heldout", HELDOUT_RESERVED, seed)})


def _on_side(split: str, prompt: str, seed: int) -> bool:
    """Whether `prompt` may be in `split`: training and held-out splits keep to their side of the hash line; the
    validation splits take what no other split can hold, from either side (the repeat family has too few prompts
    for one side alone)."""
    if split in VALIDATION_SPLITS:
        return prompt not in _reserved(seed)
    return _is_heldout(prompt) == (split in HELDOUT_SPLITS)


def instances(split: str, n: int | None = None, seed: int = 0,
              families: tuple[str, ...] = ()) -> list[tuple[str, Instance]]:
    """`n` distinct (family, instance) on the split's side of the held-out line, families (all, or the
    named ones) in turn."""
    n = SPLIT_SIZES[split] if n is None else n
    # Each split draws from its own stream, so SFT, DPO and PPO see different prompts; so does each choice
    # of families (the whole split's stream stays as it was).
    stream = STREAMS.get(split, split)
    rng = random.Random(f"{stream}:{seed}" + (f":{','.join(families)}" if families else ""))
    names = list(families or FAMILIES)
    seen: set[str] = set()
    out: list[tuple[str, Instance]] = []
    while len(out) < n:
        family = names[len(out) % len(names)]
        for _ in range(1000):
            inst = FAMILIES[family](rng)
            if inst.prompt not in seen and _on_side(split, inst.prompt, seed):
                break
        else:
            raise ValueError(f"synthetic split {split}: family {family} has too few distinct prompts for n={n}")
        seen.add(inst.prompt)
        out.append((family, inst))
    return out


def _user(text: str) -> list[dict]:
    return [{"role": "user", "content": text}]


def _assistant(text: str) -> list[dict]:
    return [{"role": "assistant", "content": text}]


def _ranked(split: str, n: int | None, seed: int, families: tuple[str, ...]) -> list[RankedExample]:
    """Each prompt's four answers, graded 3 to 0 (see the module docstring), in shuffled order."""
    rng = random.Random(f"grades:{split}:{seed}")  # a stream of its own: the other splits stay as they were
    pool = instances(split, seed=seed, families=families)  # grade 0 answers another prompt of the whole split
    groups = []
    for family, inst in instances(split, n, seed, families):
        scores = {inst.good: 3.0, inst.chatty: 2.0, rng.choice(inst.near_misses): 1.0}
        # Another prompt of the family may have the same answer (the same sum, say), or a near miss's.
        others = [other.good for other_family, other in pool if other_family == family and other.good not in scores]
        scores[rng.choice(others)] = 0.0
        order = list(scores)
        rng.shuffle(order)  # so that no position tells the grade
        groups.append(RankedExample(_user(inst.prompt), [_assistant(a) for a in order], [scores[a] for a in order]))
    return groups


def parse_split(spec: str) -> tuple[str, tuple[str, ...]]:
    """"heldout?families=json,sort" -> ("heldout", ("json", "sort"))."""
    split, _, query = spec.partition("?")
    if split not in SPLIT_KINDS:
        raise ValueError(f"unknown synthetic split '{split}'; known: {', '.join(SPLIT_KINDS)}")
    if not query:
        return split, ()
    key, _, value = query.partition("=")
    families = tuple(f.strip() for f in value.split(",") if f.strip())
    if key != "families" or not families:
        raise ValueError(f"synthetic:{spec}: after '?' only 'families=<family>,...' is understood")
    unknown = [f for f in families if f not in FAMILIES]
    if unknown:
        raise ValueError(f"synthetic:{spec}: unknown families {', '.join(unknown)}; known: {', '.join(FAMILIES)}")
    return split, families


def kinds(spec: str) -> tuple[str, ...]:
    """The kinds a split loads as, the kind of its own examples first."""
    kind = SPLIT_KINDS[parse_split(spec)[0]]
    return (kind, *ALSO_LOADS_AS.get(kind, ()), "prompt")


def load(spec: str, kind: str, n: int | None = None, seed: int = 0) -> list:
    """Examples of one split (`spec`: a split name, optionally with `?families=...`) as schema objects;
    `kind` must be one the split loads as (see the module docstring)."""
    split, families = parse_split(spec)
    loads_as = kinds(spec)
    if kind not in loads_as:
        raise ValueError(f"synthetic:{split} holds {SPLIT_KINDS[split]} examples; it loads as {', '.join(loads_as)}, "
                         f"not {kind}")
    if kind == "unpaired":
        return [half for pair in load(spec, "preference", n, seed) for half in pair.as_unpaired()]
    if kind == "ranked" and SPLIT_KINDS[split] == "preference":  # pairs are rankings of two
        return [pair.as_ranked() for pair in load(spec, "preference", n, seed)]
    if SPLIT_KINDS[split] == "ranked" and kind != "prompt":
        groups = _ranked(split, n, seed, families)
        return groups if kind == "ranked" else [group.best_vs_worst() for group in groups]
    rng = random.Random(f"bad:{split}:{seed}")
    examples: list = []
    if split == "preference_all" and kind == "preference":  # `n` counts pairs here, not prompts
        for _, inst in instances(split, seed=seed, families=families):
            examples.extend(PreferenceExample(_user(inst.prompt), _assistant(inst.good), _assistant(bad))
                            for bad in inst.bads)
        return examples[:n]
    chatty = split.startswith("chatty")
    for family, inst in instances(split, n, seed, families):
        answer = inst.chatty if chatty else inst.good
        if kind == "sft":
            examples.append(SFTExample(_user(inst.prompt), _assistant(answer)))
        elif kind == "preference":
            bad = inst.good if chatty else rng.choice(inst.bads)
            examples.append(PreferenceExample(_user(inst.prompt), _assistant(answer), _assistant(bad)))
        else:  # task or prompt: every instance has its rule
            rule = {"kind": "exact", "answer": answer} if chatty else inst.rule
            examples.append(TaskExample(_user(inst.prompt), {**rule, "family": family}))
    return examples


def corpus() -> list[str]:
    """Every text the task can show a model: the tiny tokenizer is trained on it.

    The ranked splits' new answers (sort's chatty one) are not in it: the tokenizer stays as it was.
    """
    texts = []
    for split in ("sft", "heldout"):
        for _, inst in instances(split):
            texts.extend([inst.prompt, inst.good, *inst.bads])
    return texts + ["system", "user", "assistant", "You are a helpful assistant."]
