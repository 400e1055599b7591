"""`align collect status`: what a collection holds, who judged how much, and how far they agree."""

from __future__ import annotations

from collections import Counter
from statistics import median

from rich.table import Table

from align.annotation.store import Collection
from align.collect.agreement import summarize


def _share(value: float | None) -> str:
    return "–" if value is None else f"{value:.0%}"


def _number(value: float | None) -> str:
    return "–" if value is None else f"{value:.2f}"


def status_tables(collection: Collection) -> list[Table]:
    counts, verdicts, k = collection.counts(), collection.verdicts(), collection.overlap
    human = [v for v in verdicts if v["kind"] == "human"]
    complete = len(collection.complete_pairs())
    overview = Table(title=str(collection.path), title_justify="left", show_header=False)
    for label, value in (("prompts", counts["prompts"]), ("responses", counts["responses"]),
                         ("pairs", counts["pairs"]), ("overlap (people per pair)", k),
                         ("human verdicts", len(human)), ("AI verdicts", len(verdicts) - len(human)),
                         ("pairs judged by all they need", f"{complete} of {counts['pairs']}")):
        overview.add_row(label, str(value))

    people = Table(title="annotators", title_justify="left")
    for column in ("annotator", "kind", "judged", "A", "B", "tie", "both bad", "median s"):
        people.add_column(column, justify="left" if column in ("annotator", "kind") else "right")
    for who in collection.annotators():
        mine = [v for v in verdicts if v["annotator"] == who.name]
        choices = Counter(v["choice"] for v in mine)
        seconds = [v["seconds"] for v in mine if v["seconds"] is not None]
        people.add_row(who.name, who.kind, str(len(mine)), *(str(choices[c]) for c in ("a", "b", "tie", "both_bad")),
                       f"{median(seconds):.1f}" if seconds else "–")

    stats = summarize(verdicts)
    agreement = Table(title="agreement", title_justify="left")
    for column in ("between", "pairs", "agreement", "κ or α"):
        agreement.add_column(column, justify="left" if column == "between" else "right")
    humans = stats["humans"]
    agreement.add_row("all people", str(humans["pairs"]), _share(humans["agreement"]),
                      f"α {_number(humans['krippendorff_alpha'])}; Fleiss' κ {_number(humans['fleiss_kappa'])} "
                      f"on {humans['fleiss_pairs']}")
    for row in humans["pairwise"]:
        agreement.add_row(f"{row['a']} – {row['b']}", str(row["pairs"]), _share(row["agreement"]),
                          f"κ {_number(row['cohen_kappa'])}")
    for row in stats["ai"]:
        agreement.add_row(f"{row['judge']} – people's majority", str(row["pairs"]), _share(row["agreement"]),
                          f"κ {_number(row['cohen_kappa'])}")
    return [overview, people, agreement]
