"""Detect a data file's format and convert its rows into the schema objects stages accept.

Each format is one `Format` entry in `FORMATS`, keyed by (kind, name): the kind is what a stage asks
for ("sft", "preference", "task", "prompt", "ranked", "unpaired"), the name is what a user writes in
`data.format`. New formats are new entries; detection tries a kind's entries in order, so more specific
formats come first. The converters themselves, one per format, are in `align.data.converters`;
`load_examples` adds the file and row number to their errors.

Kinds also read each other's formats, under the same names:
- ranked (`RankedExample`): OASST trees, ranked lists, UltraFeedback, scored responses; and every pair
  format, as a ranking of two;
- preference (`PreferenceExample`): the pair formats; and every ranked format, as its best response
  against its worst (an OASST tree gives one pair per ranked group);
- unpaired (`UnpairedExample`, KTO's data): TRL's unpaired rows; and every preference format, each pair
  as two rows (chosen desirable, rejected undesirable);
- prompt (`TaskExample`): task rows with their rule; bare prompts, and the prompt of every preference
  (ranked formats included: one per group) and SFT row, without one.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from dataclasses import asdict, dataclass

from align.data import converters, sources
from align.data.schemas import PreferenceExample, RankedExample, TaskExample
from align.errors import DataError

KINDS = ("sft", "preference", "task", "prompt", "ranked", "unpaired")


@dataclass(frozen=True)
class Format:
    expects: str  # the keys a row needs, for error messages and --help
    detect: Callable[[dict], bool]  # does this (first) row look like this format?
    convert: Callable[[dict], object]  # row -> schema object or list of them, or DataError naming the field


# Detectors. HH and implicit-prompt rows share keys with TRL's rows, so those look at the values too.
def _has(*keys: str) -> Callable[[dict], bool]:
    return lambda row: all(k in row for k in keys)


def _is_hh(*keys: str) -> Callable[[dict], bool]:
    return lambda row: all(isinstance(row.get(k), str) and "Assistant:" in row[k] for k in keys)


def _lists(*keys: str) -> Callable[[dict], bool]:
    return lambda row: all(isinstance(row.get(k), list) for k in keys)


def _is_bare_prompt(row: dict) -> bool:
    # Tried before the preference and SFT formats: a row with their keys besides `prompt` is theirs, and an
    # object as `prompt` is an OASST tree's first message.
    return ("prompt" in row and not row.keys() & {"rule", "chosen", "rejected", "completion"}
            and not isinstance(row["prompt"], dict))


def _is_oasst_tree(row: dict) -> bool:
    return isinstance(row.get("prompt"), dict) or _has("role", "text", "replies")(row)


# Detection order within a kind matters: the first match wins, so more specific formats come first.
HH = "'\\n\\nHuman: ...\\n\\nAssistant: ...'"
FORMATS: dict[tuple[str, str], Format] = {
    ("sft", "messages"): Format("messages: [{role, content}, ...] ending with an assistant message",
                                _has("messages"), converters.messages_sft),
    ("sft", "prompt_completion"): Format("prompt, completion (strings or message lists)",
                                         _has("prompt", "completion"), converters.prompt_completion),
    ("sft", "alpaca"): Format("instruction, optional input, output", _has("instruction", "output"), converters.alpaca),
    ("sft", "sharegpt"): Format("conversations: [{from: human|gpt|system, value}, ...]",
                                _has("conversations"), converters.sharegpt),
    ("sft", "hh_rlhf"): Format(f"chosen: a {HH} transcript", _is_hh("chosen"), converters.hh_sft),
    ("preference", "preference"): Format("prompt, chosen, rejected (strings or message lists), optional margin",
                                         _has("prompt", "chosen", "rejected"), converters.preference),
    ("preference", "implicit_prompt"): Format("chosen, rejected: message lists that share their first (prompt) turns, "
                                              "optional margin", _lists("chosen", "rejected"),
                                              converters.implicit_prompt),
    ("preference", "hh_rlhf"): Format(f"chosen, rejected: {HH} transcripts",
                                      _is_hh("chosen", "rejected"), converters.hh_preference),
    ("task", "task"): Format("prompt (string or message list), rule: {kind, ...}", _has("prompt", "rule"),
                             converters.task),
    ("task", "gsm8k"): Format("question, answer: a worked solution ending '#### <final answer>' (GSM8K)",
                              _has("question", "answer"), converters.gsm8k),
    ("ranked", "oasst_tree"): Format("an OpenAssistant message tree {message_tree_id, prompt: {text, role: prompter|"
                                     "assistant, replies: [...]}} or its root message alone; the replies to a "
                                     "prompter message that have a rank (0 = best) form a group",
                                     _is_oasst_tree, converters.oasst_tree),
    ("ranked", "ranked"): Format("prompt, responses (strings or message lists), and either ranks (0 = best, ties "
                                 "allowed) or scores (higher is better), one per response",
                                 _has("prompt", "responses"), converters.ranked),
    ("ranked", "ultrafeedback"): Format("instruction, completions: [{response, overall_score or fine-grained_score}, "
                                        "...]", _has("instruction", "completions"), converters.ultrafeedback),
    ("ranked", "scored_responses"): Format("prompt, all_generated_responses, all_rm_scores (as SimPO's on-policy "
                                           "UltraFeedback)", _has("prompt", "all_generated_responses", "all_rm_scores"),
                                           converters.scored_responses),
    ("unpaired", "unpaired"): Format("prompt, completion (strings or message lists), label: true (desirable) or false",
                                     _has("prompt", "completion", "label"), converters.unpaired),
}


def formats_for(kind: str) -> dict[str, Format]:
    if kind not in KINDS:
        raise ValueError(f"unknown data kind {kind!r}; expected one of {KINDS}")  # a bug in a stage, not user input
    return {name: fmt for (k, name), fmt in FORMATS.items() if k == kind}


def describe_formats(kind: str) -> str:
    """One line per format a kind accepts, with the keys it expects (for errors and --help)."""
    return "\n".join(f"  {name}: {fmt.expects}" for name, fmt in formats_for(kind).items())


# Kinds that read other kinds' formats (see the module docstring). Each derived format keeps its name
# and detector and converts the source format's objects; derived entries come after a kind's own.
def _as_list(converted: object) -> list:
    return converted if isinstance(converted, list) else [converted]


def _derived(fmt: Format, convert: Callable[[object], object]) -> Format:
    """`fmt` read as another kind: `convert` maps each object `fmt` gives to one or a list of that kind's."""
    return Format(fmt.expects, fmt.detect,
                  lambda row: [out for example in _as_list(fmt.convert(row)) for out in _as_list(convert(example))])


def _prompt_only(example) -> TaskExample:
    return TaskExample(prompt=example.prompt, rule={})


PAIR_FORMATS = tuple(formats_for("preference"))  # the preference kind's own formats, before ranked ones join it


def _derived_kinds() -> dict[tuple[str, str], Format]:
    pairs, rankings = formats_for("preference"), formats_for("ranked")
    binarized = {name: _derived(fmt, RankedExample.best_vs_worst) for name, fmt in rankings.items()}
    derived = {("ranked", name): _derived(fmt, PreferenceExample.as_ranked) for name, fmt in pairs.items()}
    derived.update({("preference", name): fmt for name, fmt in binarized.items()})
    for name, fmt in {**pairs, **binarized}.items():
        derived[("unpaired", name)] = _derived(fmt, PreferenceExample.as_unpaired)
    return derived


FORMATS.update(_derived_kinds())


def _prompt_kind() -> dict[tuple[str, str], Format]:
    """The prompt kind (what PPO samples responses for): task rows keep their rule; bare prompts and the
    prompt of every preference (ranked formats included: one per group) and SFT row get none. Where both
    kinds have a name (hh_rlhf), the preference one wins: a row of two transcripts is a pair, whose
    transcripts must share their prompt."""
    out = {("prompt", "task"): FORMATS[("task", "task")], ("prompt", "gsm8k"): FORMATS[("task", "gsm8k")],
           ("prompt", "prompt"): Format("prompt (string or message list), without rule, chosen, rejected or completion",
                                        _is_bare_prompt, converters.bare_prompt),
           # MT-Bench's second turn asks about the model's own first answer; only the first turn is a prompt
           ("prompt", "fastchat_questions"): Format("question_id, turns: [question, ...] (MT-Bench, Vicuna-Bench: the "
                                                    "first turn)", _has("question_id", "turns"),
                                                    converters.fastchat_question)}
    for source in ("preference", "sft"):
        for name, fmt in formats_for(source).items():
            out.setdefault(("prompt", name), _derived(fmt, _prompt_only))
    return out


FORMATS.update(_prompt_kind())


@dataclass
class LoadedData:
    examples: list  # schema objects (SFTExample, PreferenceExample, TaskExample, RankedExample, UnpairedExample)
    format: str
    source: str  # the path as given
    rows_read: int  # rows seen, good and bad (blank JSONL lines are not rows)
    skipped: list[DataError]  # with skip_bad_rows=True, every skipped row's error, in row order
    fingerprint: str
    composition: list[dict] | None = None  # a mixture's sources and what each gave (align.data.mixture)


def load_examples(
    path: str, kind: str, format: str = "auto", skip_bad_rows: bool = False, max_rows: int | None = None
) -> LoadedData:
    """Read `path` and convert every row into `kind`'s schema object.

    `format="auto"` picks the format from the first readable row. The first bad row raises its
    DataError, unless `skip_bad_rows`, which collects them all in `skipped` and goes on. `max_rows`
    stops after that many rows (good or bad), for quick runs.
    """
    available = formats_for(kind)
    if path.startswith("synthetic:"):  # the embedded default task, e.g. "synthetic:sft"; imported only when asked for
        from align.data import synthetic

        try:
            examples = synthetic.load(path.removeprefix("synthetic:"), kind, n=max_rows)
        except ValueError as err:
            raise DataError(str(err), file=path) from err
        digest = hashlib.sha256(json.dumps([asdict(e) for e in examples], sort_keys=True).encode()).hexdigest()
        return LoadedData(examples, "synthetic", path, len(examples), [], digest)
    if format != "auto" and format not in available:
        raise DataError(f"unknown {kind} data format {format!r}; set data.format to 'auto' or one of:\n"
                        + describe_formats(kind), file=path)
    examples, skipped, rows_read, picked = [], [], 0, None if format == "auto" else format
    for number, row in sources.read_records(path):
        if max_rows is not None and rows_read >= max_rows:
            break
        rows_read += 1
        try:
            if isinstance(row, DataError):
                raise row
            picked = picked or _detect(row, kind, path)
            examples.extend(_as_list(available[picked].convert(row)))
        except DataError as e:
            if e.file is None:  # converters name the field; the file and row are known here
                e = DataError(e.message, file=path, row=number, field=e.field)
            if not skip_bad_rows or e.row is None:  # an undetectable format is not one bad row
                raise e from None
            skipped.append(e)
    if not examples:
        if skipped:
            reason = f"all {rows_read} rows are bad; the first: {skipped[0]}"
        else:  # rows that give none: OASST trees without a ranked group
            reason = f"its {rows_read} rows hold none"
        raise DataError(f"no usable {kind} examples: {reason}", file=path)
    return LoadedData(examples, picked, path, rows_read, skipped, sources.fingerprint(path))


def detect_format(row: dict, kind: str) -> str | None:
    """The first of `kind`'s formats that `row` looks like, or None."""
    return next((name for name, fmt in formats_for(kind).items() if fmt.detect(row)), None)


def _detect(row: dict, kind: str, path: str) -> str:
    if name := detect_format(row, kind):
        return name
    raise DataError(f"cannot tell the {kind} data format from the first row's keys {sorted(row)}. Formats for {kind} "
                    f"data and the keys each expects:\n{describe_formats(kind)}\nRename the fields to match one, or "
                    "set data.format in the recipe to the one your data is in.", file=path)
