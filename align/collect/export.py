"""A collection's verdicts as training data that a `dpo` or `rank` stage (or `align eval --verdicts`) reads
as it is: JSONL, or a `datasets` folder saved with `save_to_disk`.

The rules, in full:
- **Whose verdicts**: `humans` (default), `ai`, `all`, or annotators by name.
- **Which pairs**: every pair with verdicts, or with `complete_only` only those that reached their overlap
  (that many people judged them), so that no pair is decided by fewer people than planned.
- **Preference pairs**, `aggregate="majority"` (default): a pair gives one row when one of the four
  choices (A, B, tie, both bad) has more of its verdicts than any other and that choice is A or B. A pair
  whose plurality is tie or both bad, or whose top count is shared, gives none.
- **Preference pairs**, `aggregate="all"`: every verdict for A or B is a row of its own (a pair three
  people judged A, A, B gives two rows A > B and one B > A); ties and both-bad verdicts give none.
- **Ranked lists** (`kind="ranked"`, for prompts with more than two responses): the decisive outcomes
  above (per pair under `majority`, per verdict under `all`) score each response of a prompt by its net
  win rate, (wins - losses) / comparisons. A prompt gives a list of its compared responses when at least
  two of them were compared and their scores differ; equal scores are ties, which ranking losses accept.
"""

from __future__ import annotations

import json
from collections import Counter, defaultdict
from pathlib import Path

from align.annotation.store import CHOICES, Collection
from align.errors import AlignError

WHO = ("humans", "ai", "all")


def pick_verdicts(collection: Collection, who: str = "humans") -> list[dict]:
    """The current verdicts of `who`: humans, ai, all, or comma-separated annotator names."""
    verdicts = collection.verdicts()
    if who == "all":
        return verdicts
    if who in ("humans", "ai"):
        kind = "human" if who == "humans" else "ai"
        return [v for v in verdicts if v["kind"] == kind]
    names = {name.strip() for name in who.split(",") if name.strip()}
    known = {a.name for a in collection.annotators()}
    if unknown := names - known:
        raise AlignError(f"{collection.path}: no annotator {', '.join(sorted(unknown))}; annotators: "
                         f"{', '.join(sorted(known)) or 'none yet'} (or use {', '.join(WHO)})")
    return [v for v in verdicts if v["annotator"] in names]


def outcomes(pairs: dict[int, dict], verdicts: list[dict], aggregate: str) -> tuple[list[dict], Counter]:
    """Decisive outcomes `{pair, winner, loser, annotators}` under the rules above, and counts of what was
    left out and why."""
    if aggregate not in ("majority", "all"):
        raise AlignError(f"aggregate must be 'majority' or 'all', got {aggregate!r}")
    left_out: Counter = Counter()
    decided = []
    if aggregate == "all":
        for v in verdicts:
            if v["choice"] in ("a", "b"):
                decided.append(_outcome(pairs[v["pair_id"]], v["choice"], [v["annotator"]]))
            else:
                left_out[v["choice"]] += 1
        return decided, left_out
    by_pair: dict[int, list[dict]] = defaultdict(list)
    for v in verdicts:
        by_pair[v["pair_id"]].append(v)
    for pair_id, given in by_pair.items():
        votes = Counter(v["choice"] for v in given)
        (top, count), *rest = votes.most_common()
        if rest and rest[0][1] == count:
            left_out["no_majority"] += 1
        elif top in ("tie", "both_bad"):
            left_out[top] += 1
        else:
            decided.append(_outcome(pairs[pair_id], top, [v["annotator"] for v in given if v["choice"] == top],
                                    {c: votes.get(c, 0) for c in CHOICES}))
    return decided, left_out


def _outcome(pair: dict, choice: str, annotators: list[str], votes: dict | None = None) -> dict:
    winner, loser = (pair["a"], pair["b"]) if choice == "a" else (pair["b"], pair["a"])
    return {"pair": pair, "winner": winner, "loser": loser, "annotators": annotators, "votes": votes}


def preference_rows(decided: list[dict]) -> list[dict]:
    return [{"prompt": o["pair"]["prompt"], "chosen": o["winner"]["text"], "rejected": o["loser"]["text"],
             "chosen_model": o["winner"]["model"], "rejected_model": o["loser"]["model"],
             "pair_id": o["pair"]["pair_id"], "annotators": o["annotators"],
             **({"votes": o["votes"]} if o["votes"] else {})} for o in decided]


def ranked_rows(decided: list[dict]) -> tuple[list[dict], int]:
    """One ranked list per prompt whose compared responses' net win rates differ, and how many prompts
    gave none (every compared response scored the same)."""
    by_prompt: dict[int, list[dict]] = defaultdict(list)
    for o in decided:
        by_prompt[o["pair"]["prompt_id"]].append(o)
    rows, flat = [], 0
    for given in by_prompt.values():
        net, seen, responses = Counter(), Counter(), {}
        for o in given:
            net[o["winner"]["id"]] += 1
            net[o["loser"]["id"]] -= 1
            for response in (o["winner"], o["loser"]):
                seen[response["id"]] += 1
                responses[response["id"]] = response
        scores = {rid: net[rid] / seen[rid] for rid in seen}
        if len(set(scores.values())) < 2:
            flat += 1
            continue
        order = sorted(scores, key=lambda rid: (-scores[rid], rid))
        rows.append({"prompt": given[0]["pair"]["prompt"], "responses": [responses[r]["text"] for r in order],
                     "scores": [scores[r] for r in order], "models": [responses[r]["model"] for r in order]})
    return rows, flat


def export_collection(collection: Collection, out: str | Path, kind: str = "preference", aggregate: str = "majority",
                      who: str = "humans", fmt: str = "jsonl", complete_only: bool = False) -> dict:
    """Write `kind` rows ("preference" or "ranked") from `who`'s verdicts to `out` as `fmt` ("jsonl" or
    "datasets"), on every pair or only on those that reached their overlap (`complete_only`); returns a
    summary: rows written, verdicts used, and what was left out and why (`incomplete`: pairs)."""
    if kind not in ("preference", "ranked") or fmt not in ("jsonl", "datasets"):
        raise AlignError(f"export kind must be preference or ranked and format jsonl or datasets, got {kind}, {fmt}")
    verdicts = pick_verdicts(collection, who)
    incomplete = 0
    if complete_only:
        complete = collection.complete_pairs()
        incomplete = len({v["pair_id"] for v in verdicts} - complete)
        verdicts = [v for v in verdicts if v["pair_id"] in complete]
    pairs = {p["pair_id"]: p for p in collection.pairs()}
    decided, left_out = outcomes(pairs, verdicts, aggregate)
    left_out["incomplete"] = incomplete
    if kind == "preference":
        rows = preference_rows(decided)
    else:
        rows, left_out["equal_scores"] = ranked_rows(decided)
    summary = {"rows": len(rows), "verdicts": len(verdicts), "pairs": len(pairs),
               "pairs_judged": len({v["pair_id"] for v in verdicts}),
               "left_out": {reason: n for reason, n in left_out.items() if n}, "out": str(out)}
    if not rows:
        raise AlignError(f"{collection.path}: nothing to export: {len(verdicts)} verdicts by {who} give no {kind} "
                         f"rows (left out: {summary['left_out'] or 'none'}). Judge more pairs first "
                         "(`align collect serve`, `align collect judge`).")
    _write(rows, Path(out), fmt)
    return summary


def _write(rows: list[dict], out: Path, fmt: str) -> None:
    if fmt == "jsonl":
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = out.with_name(out.name + ".tmp")  # a reader never sees half a file
        tmp.write_text("".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows), encoding="utf-8")
        tmp.replace(out)
        return
    import datasets  # slow to import; only folders need it

    datasets.disable_progress_bars()  # a bar for a write of a second says nothing
    datasets.Dataset.from_list(rows).save_to_disk(str(out))
