"""`align data inspect`: the pre-flight check before training on a file.

Shows the kind the file is meant for (and the other kinds that could read it), its format, rows, length
statistics in tokens, and one row rendered through the model's chat template with its token ids and the
prompt/completion mask, then warns about what silently spoils training: two BOS tokens, a completion
without EOS, rows that will be truncated.
"""

from __future__ import annotations

import statistics

from rich.markup import escape
from rich.table import Table
from rich.text import Text

from align.data.collate import encode
from align.data.formats import PAIR_FORMATS, describe_formats, detect_format, formats_for, load_examples
from align.data.sources import read_records
from align.errors import AlignError, DataError
from align.models.tokens import encode_prompt
from align.ui import console

# Auto names the first of these kinds that reads the file's first row, bare prompts last. Ranked and
# unpaired come before the kinds that also read their files (preference reads ranked files, sft reads
# {prompt, completion, label}), so their files show as what they are; the pair files that they too read
# are left to the preference kind.
KINDS = ("ranked", "preference", "unpaired", "sft", "task", "prompt")
READ_FROM_PAIRS = ("ranked", "unpaired")


def _load_any_kind(path, kind, format, skip_bad_rows):
    """The kind to read the file as, its examples, and the other kinds that could read it (auto only)."""
    if kind != "auto":
        return kind, load_examples(path, kind, format, skip_bad_rows), []
    (kind, _), *others = _readers(path, format)
    # The file's bad rows are errors of the kind it is meant for, not a reason to pick a laxer kind.
    return kind, load_examples(path, kind, format, skip_bad_rows), [other for other, _ in others]


def _readers(path, format) -> list[tuple[str, str]]:
    """(kind, format) for every kind that reads the file's first row, the kind it is meant for first."""
    if path.startswith("synthetic:"):  # the embedded task: no rows to look at, its split says what it holds
        from align.data import synthetic

        try:
            return [(kind, "synthetic") for kind in synthetic.kinds(path.removeprefix("synthetic:"))]
        except ValueError as err:
            raise DataError(str(err), file=path) from err
    number, row = _first_row(path)
    found = [(kind, name) for kind in KINDS if (name := _format_for(row, kind, format))]
    if not found:
        listing = "\n".join(f"{k}:\n{describe_formats(k)}" for k in KINDS)
        raise DataError(f"no known format has the keys {sorted(row)}; set --kind and --format. Known formats:\n"
                        f"{listing}", file=path, row=number)
    return sorted(found, key=lambda read: read[0] in READ_FROM_PAIRS and read[1] in PAIR_FORMATS)


def _first_row(path) -> tuple[int, dict]:
    """The first row that reads; where none does, the first row's error is the file's problem."""
    first_error = None
    for number, row in read_records(path):
        if not isinstance(row, DataError):
            return number, row
        first_error = first_error or row
    raise first_error


def _format_for(row, kind, format) -> str | None:
    if format == "auto":
        return detect_format(row, kind)
    return format if format in formats_for(kind) else None


def _tokenizer_for(model: str):
    from align.models.load import load_tokenizer, resolve_base

    resolved = resolve_base(model)
    if resolved.tiny:
        from align.models.tiny import tiny_tokenizer

        return tiny_tokenizer(), resolved.description
    return load_tokenizer(resolved.path), resolved.description


def _completions(example, kind):
    if kind == "sft":
        return [("completion", example.completion)]
    if kind == "preference":
        return [("chosen", example.chosen), ("rejected", example.rejected)]
    if kind == "ranked":
        scores = example.scores  # ranks are stored as -rank, so show the place in the ranking as well
        return [(f"response {i} (rank {1 + sum(s > score for s in scores)} of {len(scores)}, score {score:g})",
                 response)
                for i, (response, score) in enumerate(zip(example.responses, scores), start=1)]
    if kind == "unpaired":
        return [(f"completion ({'desirable' if example.desirable else 'undesirable'})", example.completion)]
    return []


def _stats(values: list[int]) -> str:
    return f"{min(values)} / {statistics.mean(values):.0f} / {max(values)}" if values else "-"


def inspect_file(path, model, kind="auto", format="auto", skip_bad_rows=False, row=1, max_length=512):
    kind, loaded, other_kinds = _load_any_kind(path, kind, format, skip_bad_rows)
    inspect_loaded(path, kind, loaded, model, other_kinds, row, max_length)


def inspect_loaded(path, kind, loaded, model, other_kinds=(), row=1, max_length=512):
    """The pre-flight report of data already loaded as `kind`: a file, or a recipe stage's mixture of sources."""
    if not 1 <= row <= len(loaded.examples):
        raise AlignError(f"--row {row}: {path} has {len(loaded.examples)} usable rows")
    tokenizer, model_desc = _tokenizer_for(model)

    prompt_lens, completion_lens, truncated = [], [], 0
    for ex in loaded.examples[:1000]:
        for _, completion in _completions(ex, kind) or [("prompt", [])]:
            if not completion:
                prompt_lens.append(len(encode_prompt(tokenizer, ex.prompt)))
                continue
            enc = encode(tokenizer, ex.prompt, completion, 10**9, 10**9)
            prompt_lens.append(len(enc.prompt_ids))
            completion_lens.append(len(enc.completion_ids))
            truncated += len(enc.prompt_ids) + len(enc.completion_ids) > max_length

    summary = Table(title=f"{path}", show_header=False)
    summary.add_row("kind / format", f"{kind} / {loaded.format}")
    if other_kinds:
        summary.add_row("other kinds (--kind)", ", ".join(other_kinds))
    rows = f"{len(loaded.examples)} usable, {len(loaded.skipped)} skipped"
    if len(loaded.examples) != loaded.rows_read - len(loaded.skipped):  # a row may give several (OASST trees)
        rows += f", from {loaded.rows_read} rows read"
    summary.add_row("rows", rows)
    summary.add_row("tokenizer", model_desc)
    summary.add_row("prompt tokens min/mean/max", _stats(prompt_lens))
    summary.add_row("completion tokens min/mean/max", _stats(completion_lens))
    summary.add_row(f"longer than {max_length} tokens", str(truncated))
    console.print(summary)
    if loaded.composition:
        console.print(mixture_table(loaded.composition))
    for err in loaded.skipped:
        console.print(f"[yellow]skipped[/] {escape(str(err))}", highlight=False, soft_wrap=True)

    example = loaded.examples[row - 1]
    for name, completion in _completions(example, kind) or [("prompt", [])]:
        _show_row(tokenizer, example.prompt, completion, name, row)


def _show_row(tokenizer, prompt, completion, name, row):
    if completion:
        enc = encode(tokenizer, prompt, completion, 10**9, 10**9)
        ids, mask = enc.prompt_ids + enc.completion_ids, [0] * len(enc.prompt_ids) + [1] * len(enc.completion_ids)
    else:
        ids = encode_prompt(tokenizer, prompt)
        mask = [0] * len(ids)
    console.rule(f"row {row}, {name}: [dim]prompt (no loss)[/] [bold green]completion (loss)[/]")
    text = Text()
    for tok_id, m in zip(ids, mask):
        text.append(tokenizer.decode([tok_id]), style="bold green" if m else "dim")
    console.print(text)
    tokens = Text()
    for tok_id, m in zip(ids, mask):
        tokens.append(f"{tok_id}{'*' if m else ''} ", style="green" if m else "dim")
    console.print("token ids (* = in the loss):", tokens)
    bos = tokenizer.bos_token_id
    if bos is not None and ids[:2] == [bos, bos]:
        console.print("[bold red]warning:[/] the sequence starts with two BOS tokens")
    if completion and enc.eos_appended:
        console.print("[yellow]note:[/] the chat template does not end the answer with EOS; align appends it")


def mixture_table(composition: list[dict]) -> Table:
    table = Table(title="mixture", title_justify="left")
    for column in ("source", "format", "weight", "rows available", "rows in the mixture", "share"):
        table.add_column(column, justify="left" if column in ("source", "format") else "right",
                         overflow="fold")  # a path folds onto more lines rather than losing its end
    total = sum(c["rows"] for c in composition)
    for c in composition:
        table.add_row(escape(c["source"]), c["format"], "-" if c["weight"] is None else f"{c['weight']:g}",
                      str(c["available"]), str(c["rows"]), f"{c['rows'] / total:.1%}")
    return table
