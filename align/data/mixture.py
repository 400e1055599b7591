"""A stage's data from several sources: `data: [{path: a.jsonl, weight: 0.7}, {path: "synthetic:sft", weight: 0.3}]`.

Without weights the sources are concatenated (each after its own `max_rows`). With weights, the mixture has as many
rows as the sources hold together, and source i gives round(weight_i / sum(weights) x that many) of them, counts
rounded so that they add up: a source with fewer rows than its share repeats its rows (each pass in a new shuffled
order), one with more gives a shuffled subset. Everything is drawn from the seed, so a mixture is the same on every
run with that seed; the trainer then shuffles it as it shuffles any dataset. `composition` says what each source gave.
"""

from __future__ import annotations

import hashlib
import json
import random
from collections.abc import Callable

from align.data.formats import LoadedData, load_examples
from align.settings import DataConfig

Loader = Callable[[DataConfig], LoadedData]  # one source's rows as `kind` (align.data.formats.load_examples)


def shares(sizes: list[int], weights: list[float]) -> list[int]:
    """Rows per source: sum(sizes) split by `weights`, rounded by largest remainder so that the counts add up."""
    total, scale = sum(sizes), sum(weights)
    exact = [total * w / scale for w in weights]
    counts = [int(x) for x in exact]
    for i in sorted(range(len(exact)), key=lambda i: counts[i] - exact[i])[: total - sum(counts)]:
        counts[i] += 1
    return counts


def _draw(examples: list, count: int, rng: random.Random) -> list:
    """`count` rows of `examples`: whole shuffled passes, then a shuffled part of one more."""
    out: list = []
    while len(out) < count:
        order = list(examples)
        rng.shuffle(order)
        out.extend(order[: count - len(out)])
    return out


def load_mixture(sources: list[DataConfig], load: Loader, seed: int) -> LoadedData:
    """The sources' rows as one LoadedData: concatenated, or mixed by weight (module docstring)."""
    weighted = sources[0].weight is not None  # all or none: the recipe's check (align.settings.StageConfig)
    loaded = [load(s) for s in sources]
    if weighted:
        rng = random.Random(f"mixture:{seed}")
        counts = shares([len(d.examples) for d in loaded], [s.weight for s in sources])
        parts = [_draw(d.examples, n, rng) for d, n in zip(loaded, counts)]
    else:
        counts = [len(d.examples) for d in loaded]
        parts = [d.examples for d in loaded]
    examples = [ex for part in parts for ex in part]
    if weighted:  # interleaved, so that a run cut short (max_steps) still sees the mixture
        random.Random(f"mixture-order:{seed}").shuffle(examples)
    composition = [{"source": d.source, "format": d.format, "weight": s.weight, "available": len(d.examples),
                    "rows": n, "fingerprint": d.fingerprint} for s, d, n in zip(sources, loaded, counts)]
    fingerprint = hashlib.sha256(json.dumps({"seed": seed, "sources": composition}, sort_keys=True).encode())
    return LoadedData(examples, "mixture", " + ".join(d.source for d in loaded), sum(d.rows_read for d in loaded),
                      [e for d in loaded for e in d.skipped], fingerprint.hexdigest(), composition)


def load_section(section: DataConfig | list[DataConfig], kind: str, seed: int,
                 resolve: Callable[[str], str] = lambda path: path) -> LoadedData:
    """A stage's `data` (one source, or a list of them) as `kind`; `resolve` turns a path's ${stage.output} references
    into the folders a run made."""
    if isinstance(section, list):
        return load_mixture(section, lambda source: load_section(source, kind, seed, resolve), seed)
    return load_examples(resolve(section.path), kind, section.format, section.skip_bad_rows, section.max_rows)
