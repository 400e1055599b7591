"""How much a label stage's annotators agree (align.stages.label), and the label smoothing that agreement implies
for the stages that train on their labels (cDPO, Mitchell 2023: each label taken as flipped with probability ε).
With each of two annotators flipping independently with probability ε, they agree with probability
p = ε² + (1 − ε)², so ε = (1 − √(2p − 1)) / 2."""

from __future__ import annotations

import math
from pathlib import Path

from align.errors import AlignError
from align.run_folder import STAGE_FILE, read_json


def flip_rate(agreement: float) -> float:
    """The flip rate ε of two independent annotators who agree with probability `agreement` (= ε² + (1 − ε)²)."""
    return (1 - math.sqrt(max(2 * agreement - 1, 0.0))) / 2


def agreement_counts(verdicts: list[dict]) -> tuple[int, int]:
    """(agreeing, all) of every two annotators of one pair, over the pairs judged by two or more, pairs the judge
    scored alike left out."""
    agree = total = 0
    for v in verdicts:
        votes = v["verdicts"]
        if "tie" in votes:
            continue
        for i in range(len(votes)):
            for j in range(i + 1, len(votes)):
                agree, total = agree + (votes[i] == votes[j]), total + 1
    return agree, total


def pairwise_agreement(verdicts: list[dict]) -> float | None:
    """How often two annotators of one pair agree; None where no pair had two annotators."""
    agree, total = agreement_counts(verdicts)
    return agree / total if total else None


def smoothing_from_agreement(sources: list[str]) -> dict:
    """cDPO's label smoothing for a stage that trains on label stages' `labels.jsonl` files: the flip rate of their
    annotators' agreement, pooled over the label stages ({"label_smoothing", "agreement", "comparisons", "from"})."""
    agree = total = 0
    for source in sources:
        state = read_json(Path(source).parent / STAGE_FILE)
        measured = (state.get("agreement") or {}) if state.get("kind") == "label" else {}
        if not measured.get("comparisons"):
            raise AlignError(f"{source}: loss.smooth_by_agreement takes the flip rate from the agreement of a label "
                             "stage's annotators, and these labels come from "
                             + ("one annotator per pair" if state.get("kind") == "label" else "no label stage"))
        agree, total = agree + measured["agreeing"], total + measured["comparisons"]
    return {"label_smoothing": flip_rate(agree / total), "agreement": agree / total, "comparisons": total,
            "from": sources}


