"""How far annotators agree on pair verdicts: chance-corrected agreement for nominal labels.

Every statistic here treats labels as nominal (any two different labels disagree equally), which fits the
verdict choices "a", "b", "tie" and "both_bad". Counts are kept as integers (or fractions) until the last
step, so that the degenerate cases, where a denominator is exactly zero, are found exactly rather than
through rounding.

- `cohen_kappa`: two raters on the same items (Cohen 1960).
- `fleiss_kappa`: any fixed number of raters per item (Fleiss 1971).
- `krippendorff_alpha`: any number of raters per item, missing values allowed (Krippendorff 2011).
- `percent_agreement`: the observed agreement that alpha corrects for chance.
- `summarize`: all of these over a collection's verdicts (`Collection.verdicts()`).

References:
    J. Cohen (1960). A coefficient of agreement for nominal scales. Educational and Psychological
    Measurement 20(1), 37-46.
    J. L. Fleiss (1971). Measuring nominal scale agreement among many raters. Psychological Bulletin
    76(5), 378-382.
    K. Krippendorff (2011). Computing Krippendorff's Alpha-Reliability. Annenberg School for
    Communication, University of Pennsylvania.
"""

from __future__ import annotations

from collections import Counter
from fractions import Fraction
from itertools import combinations


def cohen_kappa(x: list[str], y: list[str]) -> float | None:
    """Cohen's kappa (Cohen 1960) between two raters who labelled the same items, `x[i]` and `y[i]` being
    their labels for item i:

        kappa = (p_o - p_e) / (1 - p_e),

    where p_o is the share of items on which they agree and p_e = sum over labels c of p_x(c) * p_y(c) the
    agreement expected by chance, p_x(c) being the share of items x labels c (likewise y).

    Degenerate cases:
    - fewer than 2 items: None. On one item p_e is 1 when they agree and 0 when they don't, so kappa
      could only repeat p_o.
    - p_e = 1: happens only when both raters give every item one and the same label, and then they agree
      on every item; kappa is 0/0 there, and is reported as 1.0 (perfect agreement).
    - one rater constant, the other not: p_o = p_e, so kappa is 0 however often they agree.

    Raises ValueError when the lists differ in length (a caller bug).
    """
    if len(x) != len(y):
        raise ValueError(f"cohen_kappa needs two labels per item, got {len(x)} and {len(y)} labels")
    n = len(x)
    if n < 2:
        return None
    agree = sum(a == b for a, b in zip(x, y))
    x_counts, y_counts = Counter(x), Counter(y)
    chance = sum(count * y_counts[label] for label, count in x_counts.items())  # n^2 * p_e
    if chance == n * n:
        return 1.0
    # Multiplying numerator and denominator by n^2 keeps them integers.
    return (n * agree - chance) / (n * n - chance)


def fleiss_kappa(items: list[list[str]]) -> float | None:
    """Fleiss' kappa (Fleiss 1971): `items[i]` holds the n labels that n raters gave item i, the same n
    for every item (not necessarily the same raters):

        kappa = (P - P_e) / (1 - P_e),

    where P is the mean over items of P_i = (sum over labels c of n_ic * (n_ic - 1)) / (n * (n - 1)),
    the share of agreeing ordered pairs of raters on item i (n_ic raters gave it label c), and
    P_e = sum over c of p_c^2, p_c being the share of all ratings that are c. With two raters this is
    Scott's pi.

    None when there are no items, or when every rating is the same label (P_e = 1, kappa is 0/0).
    Raises ValueError when the items have different numbers of ratings, or fewer than 2 (a caller bug).
    """
    if not items:
        return None
    sizes = {len(item) for item in items}
    if len(sizes) > 1 or min(sizes) < 2:
        raise ValueError(f"fleiss_kappa needs the same number (at least 2) of ratings per item, "
                         f"got {sorted(sizes)}")
    n = sizes.pop()
    total = len(items) * n
    pairs_agreeing = sum(c * (c - 1) for item in items for c in Counter(item).values())
    chance = sum(c * c for c in Counter(label for item in items for label in item).values())  # total^2 * P_e
    if chance == total * total:
        return None
    observed = Fraction(pairs_agreeing, len(items) * n * (n - 1))
    expected = Fraction(chance, total * total)
    return float((observed - expected) / (1 - expected))


def _pairable(units: list[list[str]]) -> list[list[str]]:
    # A value with no other value in its unit cannot be compared with anything (Krippendorff 2011).
    return [unit for unit in units if len(unit) >= 2]


def percent_agreement(units: list[list[str]]) -> float | None:
    """Observed agreement over all pairable values (Krippendorff 2011's A_o = 1 - D_o, nominal):

        A_o = (1 / n) * sum over units u of (number of agreeing ordered pairs of values in u) / (m_u - 1),

    where m_u is the number of values in unit u and n the number of pairable values (those in units with
    m_u >= 2; the others are left out). Equivalently: the mean over pairable values of the share of the
    other values in its unit that agree with it. When every unit has the same m_u this is the share of
    agreeing ordered pairs of values within units (Fleiss' P); otherwise each unit's pairs are weighted by
    1 / (m_u - 1) so that every value counts once, as in alpha, and alpha = (A_o - A_e) / (1 - A_e).

    None when there are no pairable values.
    """
    units = _pairable(units)
    n = sum(len(unit) for unit in units)
    if n == 0:
        return None
    agreeing = sum(Fraction(sum(c * (c - 1) for c in Counter(unit).values()), len(unit) - 1) for unit in units)
    return float(agreeing / n)


def krippendorff_alpha(units: list[list[str]]) -> float | None:
    """Krippendorff's alpha for nominal data (Krippendorff 2011): `units[u]` holds the values the raters
    who rated unit u gave it, any number per unit (a missing rating is simply absent):

        alpha = 1 - D_o / D_e,
        D_o = (1 / n) * sum over units u of (number of disagreeing ordered pairs of values in u) / (m_u - 1),
        D_e = (1 / (n * (n - 1))) * sum over labels c != k of n_c * n_k,

    where m_u is the number of values in unit u, n the number of pairable values (units with m_u < 2 are
    left out) and n_c the number of pairable values that are c. With complete data (every unit rated by
    the same m raters, N units) alpha = kappa_F + (1 - kappa_F) / (N * m), kappa_F being Fleiss' kappa
    (Scott's pi when m = 2), so alpha approaches it as N grows.

    None when there are no pairable values, or when all pairable values are the same label (D_e = 0).
    """
    units = _pairable(units)
    n = sum(len(unit) for unit in units)
    totals = Counter(label for unit in units for label in unit)
    if len(totals) < 2:
        return None
    # m_u^2 - sum_c n_uc^2 counts the disagreeing ordered pairs in unit u; likewise n^2 - sum_c n_c^2 overall.
    disagreeing = sum(Fraction(len(unit) ** 2 - sum(c * c for c in Counter(unit).values()), len(unit) - 1)
                      for unit in units)
    expected = n * n - sum(c * c for c in totals.values())
    return float(1 - (n - 1) * disagreeing / expected)


def summarize(verdicts: list[dict]) -> dict:
    """Agreement among a collection's annotators, from `Collection.verdicts()` rows (at least `pair_id`,
    `annotator`, `kind` ("human" or "ai") and `choice`; where a pair and annotator repeat, the later row
    counts, as in the store):

        {"humans": {"pairs", "agreement", "krippendorff_alpha", "fleiss_kappa", "fleiss_pairs", "pairwise"},
         "ai": [{"judge", "pairs", "agreement", "cohen_kappa"}, ...]}

    humans:
    - `pairs`: pairs with at least 2 human verdicts; `agreement` (`percent_agreement`) and
      `krippendorff_alpha` are computed over them, each pair being one unit.
    - `fleiss_kappa` needs the same number of ratings per pair, so it is computed over the pairs with the
      most common number (at least 2) of human verdicts, the larger number where two are equally common;
      `fleiss_pairs` says how many pairs that is (0, with `fleiss_kappa` None, when there are none).
    - `pairwise`: for every two human annotators who judged at least one pair in common, sorted by name,
      `{"a", "b", "pairs", "agreement", "cohen_kappa"}` over the pairs they share (`agreement`: the share
      on which they chose the same).

    ai: for every AI annotator, sorted by name, their verdicts against the human majority label of each
    pair. A pair's majority label is the label most of its human annotators chose (with one human, theirs);
    pairs without human verdicts, or where two or more labels tie for the most votes, are left out.
    `pairs` counts the pairs compared, `agreement` is the share where the judge chose the majority label
    (None when there are none) and `cohen_kappa` is Cohen's kappa between the judge's labels and the
    majority labels.
    """
    human: dict = {}  # pair_id -> {annotator: choice}
    ai: dict = {}  # annotator -> {pair_id: choice}
    for row in verdicts:
        if row["kind"] == "human":
            human.setdefault(row["pair_id"], {})[row["annotator"]] = row["choice"]
        elif row["kind"] == "ai":
            ai.setdefault(row["annotator"], {})[row["pair_id"]] = row["choice"]
        else:
            raise ValueError(f"a verdict's kind is 'human' or 'ai', got {row['kind']!r}")

    units = [list(by_annotator.values()) for by_annotator in human.values() if len(by_annotator) >= 2]
    sizes = Counter(len(unit) for unit in units)
    fleiss_size = max(sizes, key=lambda size: (sizes[size], size), default=None)
    fleiss_units = [unit for unit in units if len(unit) == fleiss_size]

    judged: dict = {}  # human annotator -> {pair_id: choice}
    for pair_id, by_annotator in human.items():
        for name, choice in by_annotator.items():
            judged.setdefault(name, {})[pair_id] = choice
    pairwise = []
    for a, b in combinations(sorted(judged), 2):
        shared = [pair_id for pair_id in judged[a] if pair_id in judged[b]]
        if shared:
            x, y = [judged[a][p] for p in shared], [judged[b][p] for p in shared]
            pairwise.append({"a": a, "b": b, "pairs": len(shared), "agreement": _share_equal(x, y),
                             "cohen_kappa": cohen_kappa(x, y)})

    majority = {}
    for pair_id, by_annotator in human.items():
        (top, votes), *rest = Counter(by_annotator.values()).most_common()
        if not rest or rest[0][1] < votes:
            majority[pair_id] = top
    judges = []
    for name in sorted(ai):
        compared = [pair_id for pair_id in ai[name] if pair_id in majority]
        x, y = [ai[name][p] for p in compared], [majority[p] for p in compared]
        judges.append({"judge": name, "pairs": len(compared), "agreement": _share_equal(x, y),
                       "cohen_kappa": cohen_kappa(x, y)})

    return {"humans": {"pairs": len(units), "agreement": percent_agreement(units),
                       "krippendorff_alpha": krippendorff_alpha(units), "fleiss_kappa": fleiss_kappa(fleiss_units),
                       "fleiss_pairs": len(fleiss_units), "pairwise": pairwise},
            "ai": judges}


def _share_equal(x: list[str], y: list[str]) -> float | None:
    return sum(a == b for a, b in zip(x, y)) / len(x) if x else None
