"""Agreement statistics: hand-worked and published examples, fixed numbers from reference implementations,
the relations between the statistics, and their degenerate cases."""

from fractions import Fraction

import pytest

from align.collect.agreement import cohen_kappa, fleiss_kappa, krippendorff_alpha, percent_agreement, summarize

# Random reliability data (4 raters x 40 items; a, b, t = tie, x = both_bad), drawn once with a fixed seed, each
# rater agreeing with a hidden true label with probability 0.8, 0.7, 0.6, 0.5 and otherwise choosing at random.
RANDOM = ["aababaaxaaaabxaabxtaxataaaatabbabatabbab",
          "bxbabaababtabtaabxbaxataaaxtabbaxaaabbab",
          "axbabaaxabatbaatbxbaattttbxbabaxbtattbab",
          "aaaaaabbataxbababbxtxatababtatbabtxbabbb"]
# The same with about a quarter of the ratings dropped at random ("." = missing).
RANDOM_MISSING = ["aababaa.a.aabxaabxtaxataaaatabba..t...ab",
                  "b.ba.aa.abtab.aab.ba.at.aax.abb.x.aa.bab",
                  "a.bab..xa.atb.a.bxbaat.t.....baxbt.t.b.b",
                  "a.aa.abbataxbababbx...ta..btat.ab.xbabb."]


def _units(rows: list[str]) -> list[list[str]]:
    """Rater-by-item rows of one-character labels as one list of labels per item, missing ones left out."""
    return [[label for label in column if label != "."] for column in zip(*rows)]


def test_cohen_kappa_hand_example():
    # item:  1  2  3  4  5    6
    # x:     a  a  b  b  tie  a     x's marginals a 3, b 2, tie 1
    # y:     a  b  b  b  tie  tie   y's marginals a 1, b 3, tie 2
    # p_o = 4/6 (items 1, 3, 4, 5); p_e = (3*1 + 2*3 + 1*2) / 36 = 11/36;
    # kappa = (24/36 - 11/36) / (1 - 11/36) = 13/25.
    x = ["a", "a", "b", "b", "tie", "a"]
    y = ["a", "b", "b", "b", "tie", "tie"]
    assert cohen_kappa(x, y) == pytest.approx(13 / 25, abs=1e-15)
    assert cohen_kappa(y, x) == cohen_kappa(x, y)
    # Swapping a and b in both keeps kappa: labels are nominal.
    swap = {"a": "b", "b": "a"}
    assert cohen_kappa([swap.get(v, v) for v in x], [swap.get(v, v) for v in y]) == pytest.approx(13 / 25)


def test_cohen_kappa_matches_sklearn():
    # sklearn.metrics.cohen_kappa_score (scikit-learn 1.9.1) on raters 1 and 2 of RANDOM.
    assert cohen_kappa(list(RANDOM[0]), list(RANDOM[1])) == pytest.approx(0.6146435452793835, rel=1e-12)


def test_cohen_kappa_degenerate_cases():
    assert cohen_kappa([], []) is None
    assert cohen_kappa(["a"], ["a"]) is None and cohen_kappa(["a"], ["b"]) is None  # one item says nothing
    # Both constant on one label: p_e = 1 (0/0), reported as perfect agreement.
    assert cohen_kappa(["a"] * 5, ["a"] * 5) == 1.0
    # Both constant on different labels: p_o = p_e = 0.
    assert cohen_kappa(["a"] * 5, ["b"] * 5) == 0.0
    # One constant rater: p_o = p_e however often they agree.
    assert cohen_kappa(["a"] * 5, ["a", "a", "a", "a", "b"]) == 0.0
    # Perfect agreement -> 1, systematic disagreement on two balanced labels -> -1 (p_o = 0, p_e = 1/2).
    assert cohen_kappa(["a", "b", "tie", "a"], ["a", "b", "tie", "a"]) == 1.0
    assert cohen_kappa(["a", "b"], ["b", "a"]) == -1.0
    with pytest.raises(ValueError):
        cohen_kappa(["a", "b"], ["a"])


# Wikipedia, "Fleiss' kappa", worked example: 10 subjects, 14 raters, how many raters put each subject in
# each of 5 categories. P = 0.378, P_e = 0.213, kappa = 0.210.
WIKIPEDIA_FLEISS = [[0, 0, 0, 0, 14], [0, 2, 6, 4, 2], [0, 0, 3, 5, 6], [0, 3, 9, 2, 0], [2, 2, 8, 1, 1],
                    [7, 7, 0, 0, 0], [3, 2, 6, 3, 0], [2, 5, 3, 2, 2], [6, 5, 2, 1, 0], [0, 2, 2, 3, 7]]
WIKIPEDIA_ITEMS = [[str(category) for category, count in enumerate(row) for _ in range(count)]
                   for row in WIKIPEDIA_FLEISS]


def test_fleiss_kappa_wikipedia_example():
    assert fleiss_kappa(WIKIPEDIA_ITEMS) == pytest.approx(0.210, abs=5e-4)
    # statsmodels.stats.inter_rater.fleiss_kappa (statsmodels 0.15.0) on the same table.
    assert fleiss_kappa(WIKIPEDIA_ITEMS) == pytest.approx(0.20993070442195522, rel=1e-12)
    # Order of items and of ratings within items does not matter.
    assert fleiss_kappa([item[::-1] for item in reversed(WIKIPEDIA_ITEMS)]) == pytest.approx(0.20993070442195522)


def test_fleiss_kappa_matches_statsmodels():
    # statsmodels.stats.inter_rater.fleiss_kappa (statsmodels 0.15.0) on the 40 items x 4 raters of RANDOM.
    assert fleiss_kappa(_units(RANDOM)) == pytest.approx(0.30299208987733584, rel=1e-12)


def test_fleiss_kappa_degenerate_cases():
    assert fleiss_kappa([]) is None
    assert fleiss_kappa([["a", "a"], ["a", "a"]]) is None  # every rating the same: P_e = 1
    assert fleiss_kappa([["a", "a"], ["b", "b"]]) == 1.0
    with pytest.raises(ValueError):
        fleiss_kappa([["a", "a"], ["a", "b", "b"]])  # different numbers of raters
    with pytest.raises(ValueError):
        fleiss_kappa([["a"], ["b"]])  # one rater per item


# Krippendorff (2011), "Computing Krippendorff's Alpha-Reliability", section C (nominal data, any number of
# observers, missing data): observers A-D, units 1-12, "." = missing. Published nominal alpha = 0.743.
KRIPPENDORFF_2011 = ["1 2 3 3 2 1 4 1 2 . . .",
                     "1 2 3 3 2 2 4 1 2 5 . 3",
                     ". 3 3 3 2 3 4 2 2 5 1 .",
                     "1 2 3 3 2 4 4 1 2 5 1 ."]
KRIPPENDORFF_2011_UNITS = _units([row.replace(" ", "") for row in KRIPPENDORFF_2011])


def test_krippendorff_alpha_published_nominal_example():
    # Unit 12 has one value and drops out: n = 40 pairable values, n_1..n_5 = 9, 13, 10, 5, 3. The diagonal of
    # the coincidence matrix sums to 32 (o_11 = 7, o_22 = 10, o_33 = 8, o_44 = 4, o_55 = 3), so D_o = 8/40;
    # D_e = (40^2 - (81 + 169 + 100 + 25 + 9)) / (40 * 39) = 1216/1560; alpha = 1 - D_o / D_e = 113/152.
    alpha = krippendorff_alpha(KRIPPENDORFF_2011_UNITS)
    assert alpha == pytest.approx(0.743, abs=5e-4)
    assert alpha == pytest.approx(float(Fraction(113, 152)), abs=1e-15)
    assert percent_agreement(KRIPPENDORFF_2011_UNITS) == pytest.approx(32 / 40, abs=1e-15)


def test_krippendorff_alpha_matches_krippendorff_package():
    # krippendorff.alpha(level_of_measurement="nominal") (krippendorff 0.9.0) with and without missing values.
    assert krippendorff_alpha(_units(RANDOM_MISSING)) == pytest.approx(0.34785808350763026, rel=1e-12)
    assert krippendorff_alpha(_units(RANDOM)) == pytest.approx(0.3073483893156024, rel=1e-12)


def test_krippendorff_alpha_degenerate_cases():
    assert krippendorff_alpha([]) is None
    assert krippendorff_alpha([["a"], ["b"], []]) is None  # no unit has two values to pair
    assert krippendorff_alpha([["a", "a"], ["a", "a", "a"], ["b"]]) is None  # pairable values all "a": D_e = 0
    # Values in units of one count for nothing.
    assert krippendorff_alpha(KRIPPENDORFF_2011_UNITS + [["1"], ["5"]]) == krippendorff_alpha(KRIPPENDORFF_2011_UNITS)


def test_alpha_kappa_and_pi_with_two_raters_and_complete_data():
    # Krippendorff (2011), section A (binary data, two observers, no missing data): published alpha = 0.095.
    # By hand: units 2, 4, 5, 7, 8, 10 agree, p_o = 6/10; the first observer has two 1s, the second four, so
    # the 20 values hold six 1s and fourteen 0s, Scott's P_e = (36 + 196) / 400 = 0.58 and
    # pi = (0.6 - 0.58) / 0.42 = 1/21; Cohen's p_e = (2*4 + 8*6) / 100 = 0.56, kappa = 0.04 / 0.44 = 1/11.
    # Exact small-sample relation (Krippendorff 2011): alpha = 1 - (1 - pi) (n - 1) / n with n = 2N values,
    # i.e. alpha = pi + (1 - pi) / (2N) = 1/21 + (20/21) / 20 = 2/21.
    first, second = list("0100000010"), list("1110010000")
    units = [list(unit) for unit in zip(first, second)]
    pi, alpha = fleiss_kappa(units), krippendorff_alpha(units)
    assert pi == pytest.approx(1 / 21, abs=1e-15)
    assert cohen_kappa(first, second) == pytest.approx(1 / 11, abs=1e-15)
    assert alpha == pytest.approx(2 / 21, abs=1e-15) and alpha == pytest.approx(0.095, abs=5e-4)

    # The same relation with any number m of raters: alpha = kappa_F + (1 - kappa_F) / (N m).
    for items in (WIKIPEDIA_ITEMS, _units(RANDOM)):
        kappa_f, values = fleiss_kappa(items), sum(len(item) for item in items)
        assert krippendorff_alpha(items) == pytest.approx(kappa_f + (1 - kappa_f) / values, rel=1e-12)

    # Where the two raters' marginals are equal, Cohen's kappa is Scott's pi, so alpha -> kappa as N grows.
    x = ["a", "a", "b", "tie", "b", "a", "both_bad", "tie"]
    y = ["a", "b", "a", "tie", "b", "a", "tie", "both_bad"]
    kappa = cohen_kappa(x, y)
    for copies in (1, 10, 1000):
        units = [list(unit) for unit in zip(x, y)] * copies
        assert fleiss_kappa(units) == pytest.approx(kappa, rel=1e-12)
        assert krippendorff_alpha(units) == pytest.approx(kappa + (1 - kappa) / (2 * len(x) * copies), rel=1e-12)
    assert abs(krippendorff_alpha(units) - kappa) < 1e-3
    # Otherwise Cohen's p_e <= Scott's (sum p_x p_y <= sum ((p_x + p_y) / 2)^2), so kappa >= pi.
    assert cohen_kappa(list(RANDOM[0]), list(RANDOM[3])) >= fleiss_kappa(_units(RANDOM[0::3]))


def test_percent_agreement():
    # Equal unit sizes: the share of agreeing ordered pairs within units. [a, a, b]: 2 of 6; [a, a]: 2 of 2.
    assert percent_agreement([["a", "a", "b"], ["b", "b", "a"], ["tie", "tie", "tie"]]) == pytest.approx(
        (2 + 2 + 6) / 18)
    # Unequal sizes: each unit's pairs weigh 1 / (m_u - 1), so every value counts once. [a, a, a] gives its three
    # values 6/2 = 3 agreements, [a, b] its two values 0: 3/5 (whereas 6 of the 8 ordered pairs agree).
    assert percent_agreement([["a", "a", "a"], ["a", "b"]]) == pytest.approx(3 / 5, abs=1e-15)
    assert percent_agreement([["a", "a", "a"], ["a", "b"], ["b"]]) == pytest.approx(3 / 5, abs=1e-15)
    assert percent_agreement([]) is None and percent_agreement([["a"], ["b"]]) is None
    # alpha = (A_o - A_e) / (1 - A_e) with A_e = 1 - D_e: alpha 113/152 and A_o 0.8 give D_e = 1216/1560.
    a_e = 1 - Fraction(1216, 1560)
    assert krippendorff_alpha(KRIPPENDORFF_2011_UNITS) == pytest.approx(float((Fraction(4, 5) - a_e) / (1 - a_e)))


def test_perfect_agreement_is_one():
    labels = ["a", "b", "tie", "both_bad", "a", "b"]
    assert cohen_kappa(labels, labels) == 1.0
    assert fleiss_kappa([[label] * 3 for label in labels]) == 1.0
    assert krippendorff_alpha([[label] * (2 + i % 3) for i, label in enumerate(labels)] + [["tie"]]) == 1.0
    assert percent_agreement([[label] * (2 + i % 3) for i, label in enumerate(labels)]) == 1.0


def _verdict(pair_id: int, annotator: str, choice: str, kind: str = "human") -> dict:
    return {"pair_id": pair_id, "annotator": annotator, "kind": kind, "choice": choice, "left_id": 1,
            "rationale": "", "seconds": None, "created": "2025-01-01T00:00:00+00:00"}


def test_summarize_hand_example():
    human = {1: {"ann": "a", "bob": "a", "cy": "a"},
             2: {"ann": "b", "bob": "b", "cy": "a"},
             3: {"ann": "tie", "bob": "a"},
             4: {"ann": "a", "bob": "b"},
             5: {"cy": "both_bad"},
             7: {"ann": "b", "bob": "b"}}
    judge = {1: "a", 2: "b", 3: "a", 4: "b", 5: "both_bad", 6: "a", 7: "a"}
    verdicts = [_verdict(pair, name, choice) for pair, by in human.items() for name, choice in by.items()]
    verdicts += [_verdict(pair, "judge", choice, kind="ai") for pair, choice in judge.items()]
    summary = summarize(verdicts)

    # Units (pairs with >= 2 humans): 1 [a a a], 2 [b b a], 3 [tie a], 4 [a b], 7 [b b]; n = 12 values.
    # Agreeing ordered pairs / (m_u - 1): 6/2 + 2/2 + 0 + 0 + 2/1 = 6, so A_o = 6/12.
    # Disagreeing ordered pairs / (m_u - 1): 0 + 4/2 + 2 + 2 + 0 = 6; labels a 6, b 5, tie 1, so
    # alpha = 1 - (n - 1) * 6 / (12^2 - (36 + 25 + 1)) = 1 - 66/82 = 8/41.
    # Fleiss over the three pairs with 2 humans (3, 4, 7; two pairs have 3): P = 1/3; labels a 2, b 3, tie 1
    # of 6, P_e = 14/36; kappa = (1/3 - 7/18) / (11/18) = -1/11.
    humans = summary["humans"]
    assert humans["pairs"] == 5 and humans["fleiss_pairs"] == 3
    assert humans["agreement"] == pytest.approx(0.5, abs=1e-15)
    assert humans["krippendorff_alpha"] == pytest.approx(8 / 41, abs=1e-15)
    assert humans["fleiss_kappa"] == pytest.approx(-1 / 11, abs=1e-15)
    # ann-bob share 1, 2, 3, 4, 7 and agree on 1, 2, 7: 3/5. ann a a b b tie (sorted), bob a a b b b:
    # chance = 2*2 + 2*3 = 10, kappa = (5*3 - 10) / (25 - 10) = 1/3. ann-cy and bob-cy share 1 (a, a) and 2
    # (b, a): 1/2 agree, and cy is constant on a, so kappa = 0.
    assert humans["pairwise"] == [
        {"a": "ann", "b": "bob", "pairs": 5, "agreement": pytest.approx(3 / 5), "cohen_kappa": pytest.approx(1 / 3)},
        {"a": "ann", "b": "cy", "pairs": 2, "agreement": 0.5, "cohen_kappa": 0.0},
        {"a": "bob", "b": "cy", "pairs": 2, "agreement": 0.5, "cohen_kappa": 0.0}]
    # Majority labels: 1 a, 2 b, 5 both_bad (one human), 7 b; 3 and 4 tie and 6 has no humans. The judge says
    # a, b, both_bad, a there: 3/4 agree. Judge a 2, b 1, both_bad 1; majority a 1, b 2, both_bad 1:
    # chance = 2 + 2 + 1 = 5, kappa = (4*3 - 5) / (16 - 5) = 7/11.
    assert summary["ai"] == [{"judge": "judge", "pairs": 4, "agreement": 0.75,
                              "cohen_kappa": pytest.approx(7 / 11, abs=1e-15)}]
    assert set(summary) == {"humans", "ai"}
    assert set(humans) == {"pairs", "agreement", "krippendorff_alpha", "fleiss_kappa", "fleiss_pairs", "pairwise"}


def test_summarize_edge_cases():
    assert summarize([]) == {"humans": {"pairs": 0, "agreement": None, "krippendorff_alpha": None,
                                        "fleiss_kappa": None, "fleiss_pairs": 0, "pairwise": []}, "ai": []}
    verdicts = [_verdict(1, "ann", "a"), _verdict(1, "bob", "b"), _verdict(1, "bob", "a"),  # bob's later verdict
                _verdict(2, "ann", "b"), _verdict(2, "bob", "b"), _verdict(2, "cy", "b"),
                _verdict(3, "ann", "tie"), _verdict(3, "bob", "tie"), _verdict(3, "cy", "a"),
                _verdict(4, "ann", "a"), _verdict(4, "bob", "b"),
                _verdict(9, "loner", "a", kind="ai")]  # no human on pair 9
    summary = summarize(verdicts)
    # Two pairs with 2 humans, two with 3: the larger number wins the tie. Pairs 2 [b b b] and 3 [tie tie a]:
    # P = (1 + 1/3) / 2 = 2/3; labels b 3, tie 2, a 1 of 6, P_e = 14/36; kappa = (2/3 - 7/18) / (11/18) = 5/11.
    assert summary["humans"]["pairs"] == 4 and summary["humans"]["fleiss_pairs"] == 2
    assert summary["humans"]["fleiss_kappa"] == pytest.approx(5 / 11, abs=1e-15)
    # ann a b tie a, bob a b tie b (his later verdict on pair 1): 3/4 agree; chance = 2*1 + 1*2 + 1*1 = 5,
    # kappa = (4*3 - 5) / (16 - 5) = 7/11.
    assert summary["humans"]["pairwise"][0] == {"a": "ann", "b": "bob", "pairs": 4, "agreement": 0.75,
                                                "cohen_kappa": pytest.approx(7 / 11, abs=1e-15)}
    assert summary["ai"] == [{"judge": "loner", "pairs": 0, "agreement": None, "cohen_kappa": None}]
    # Humans who agree on every pair, all on one label: nothing to correct for chance against.
    same = summarize([_verdict(pair, name, "a") for pair in (1, 2) for name in ("ann", "bob")])
    assert same["humans"] == {"pairs": 2, "agreement": 1.0, "krippendorff_alpha": None, "fleiss_kappa": None,
                              "fleiss_pairs": 2,
                              "pairwise": [{"a": "ann", "b": "bob", "pairs": 2, "agreement": 1.0, "cohen_kappa": 1.0}]}
    with pytest.raises(ValueError):
        summarize([_verdict(1, "ann", "a", kind="robot")])
