"""`align collect generate` and `align collect import`: the responses people will compare.

Generate samples N responses per prompt from each source: a run's stage (`RUN/STAGE`, `RUN/base` for the
untrained model), or a model of its own (a hub id, a local folder such as `align export --merge` writes, a
.gguf file, `builtin:<name>`). Stages of one run share one loaded base and switch adapters; sources on
different bases are loaded one after another. Import takes pairs that exist already: `align eval`'s
pairs.jsonl (`{prompt, a, b, a_model, b_model}`), or any preference or ranked file (its labels ignored:
people judge the responses afresh); only the pairs in the file (each ranked group's every two) are made.
"""

from __future__ import annotations

import gc
from dataclasses import dataclass
from pathlib import Path

from align.annotation.store import Candidates
from align.data import converters, sources
from align.data.formats import load_examples
from align.errors import AlignError, DataError
from align.run_folder import RECIPE_FILE
from align.runs import BASE, acting_as, open_stage


@dataclass(frozen=True)
class Source:
    label: str  # the model name the collection records with each response
    spec: str  # as given
    run: object | None = None  # align.runs.Run, for a run's stage
    stage: str | None = None


def parse_source(spec: str) -> Source:
    """A run's stage where `spec` is RUN/STAGE, else a model of its own; errors before any model loads."""
    path = Path(spec)
    if (path / RECIPE_FILE).is_file():
        raise AlignError(f"{spec} is a run folder: name one of its stages, e.g. {path / 'dpo'} or {path / BASE}")
    if (path.parent / RECIPE_FILE).is_file():
        run, stage = open_stage(spec)
        return Source(f"{run.name}/{stage}", spec, run, stage)
    return Source(spec, spec)


def sample_responses(specs: list[str], prompts: list, samples: int, decoding, batch_size: int = 8,
                     quiet: bool = False) -> dict[str, list[list[str]]]:
    """{source label: for each prompt, its `samples` responses} for every source in `specs`."""
    from align.models.generation import generate
    from align.models.host import ModelHost
    from align.settings import ModelConfig
    from align.ui import work_progress

    chosen = [parse_source(spec) for spec in specs]
    if len({s.label for s in chosen}) < len(chosen):
        raise AlignError(f"a source is named twice: {', '.join(specs)}")
    groups: dict[str, list[Source]] = {}
    for source in chosen:  # one base per run: its stages are adapters on it
        groups.setdefault(str(source.run.dir) if source.run else source.spec, []).append(source)
    repeated = [ex.prompt for ex in prompts for _ in range(samples)]
    out = {}
    for group in groups.values():
        run = group[0].run
        host = ModelHost(run.recipe.model if run else ModelConfig(base=group[0].spec))
        with host.adapters({s.stage: run.adapter(s.stage) for s in group if run and s.stage != BASE}) as model:
            for source in group:
                with work_progress(f"responses of {source.label}", len(repeated), quiet) as advance, \
                        acting_as(model, source.stage or BASE):
                    replies = generate(model, host.tokenizer, repeated, decoding, batch_size, on_batch=advance)
                out[source.label] = [[r.text for r in replies[i * samples:(i + 1) * samples]]
                                     for i in range(len(prompts))]
        del model, host
        gc.collect()  # the next source may need the memory for a base of its own
    return out


def as_candidates(prompts: list, responses: dict[str, list[list[str]]]) -> list[Candidates]:
    """One Candidates per prompt; empty responses are left out (nothing to judge in them)."""
    return [Candidates(ex.prompt, [(text, label) for label, per_prompt in responses.items()
                                   for text in per_prompt[i] if text.strip()], ex.rule or None)
            for i, ex in enumerate(prompts)]


def read_candidates(path: str, max_rows: int | None = None) -> list[Candidates]:
    """Pairs to import: align eval's pairs.jsonl rows, or the responses of any preference or ranked file."""
    first = next(iter(sources.read_records(path)), (0, None))[1]
    if not (isinstance(first, dict) and {"a", "b"} <= first.keys()):
        loaded = load_examples(path, "ranked", max_rows=max_rows)
        return [Candidates(ex.prompt, [(r[-1]["content"], "imported") for r in ex.responses])
                for ex in loaded.examples]
    out = []
    for number, row in sources.read_records(path):
        if max_rows is not None and number > max_rows:
            break
        out.append(_eval_pair(row, path, number))
    return out


def _eval_pair(row, path: str, number: int) -> Candidates:
    try:
        if isinstance(row, DataError):
            raise row
        prompt = converters.bare_prompt({"prompt": row.get("prompt")}).prompt
        texts = []
        for side in ("a", "b"):
            if not isinstance(row.get(side), str):
                raise DataError("must be a string (a response)", field=side)
            if row[side].strip():  # a blank reply (a model's, in eval's pairs) is nothing to judge
                texts.append((row[side], str(row.get(f"{side}_model") or "imported")))
    except DataError as err:
        raise DataError(err.message, file=path, row=number, field=err.field) from None
    return Candidates(prompt, texts)
