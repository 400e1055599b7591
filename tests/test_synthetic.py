"""The embedded synthetic task (splits, determinism, the held-out line) and the rules that check answers."""

import pytest

from align.data import synthetic
from align.data.formats import load_examples
from align.data.schemas import PreferenceExample, SFTExample, TaskExample
from align.eval.rules import RULE_KINDS, check

SCHEMA = {"sft": SFTExample, "preference": PreferenceExample, "task": TaskExample}
TRAIN_SPLITS = ("sft", "preference", "prompts")
HELDOUT_SPLITS = ("heldout", "preference_heldout")


def prompt_text(example) -> str:
    (message,) = example.prompt
    assert message["role"] == "user"
    return message["content"]


@pytest.mark.parametrize("split", list(synthetic.SPLIT_KINDS))
def test_split_kind_size_and_determinism(split):
    kind = synthetic.SPLIT_KINDS[split]
    examples = synthetic.load(split, kind)
    assert len({prompt_text(e) for e in examples}) == synthetic.SPLIT_SIZES[split]  # distinct prompts
    assert all(type(e) is SCHEMA[kind] for e in examples)
    assert synthetic.load(split, kind) == examples  # same examples on every load
    if split != "preference_all":  # which pairs each prompt with every bad answer
        assert len(examples) == synthetic.SPLIT_SIZES[split]
    loaded = load_examples(f"synthetic:{split}", kind)
    assert (loaded.examples, loaded.format, loaded.skipped) == (examples, "synthetic", [])
    assert loaded.fingerprint == load_examples(f"synthetic:{split}", kind).fingerprint


def test_examples_are_well_formed():
    for e in synthetic.load("sft", "sft"):
        assert [m["role"] for m in e.completion] == ["assistant"] and e.completion[0]["content"].strip()
    for split in ("preference", "preference_heldout"):
        for e in synthetic.load(split, "preference"):
            assert e.chosen[0]["content"] != e.rejected[0]["content"] and e.margin is None
    for e in synthetic.load("heldout", "task"):
        assert e.rule["kind"] in RULE_KINDS and e.rule["family"] in synthetic.FAMILIES


def test_n_and_seed():
    assert len(synthetic.load("sft", "sft", n=10)) == 10
    assert synthetic.load("sft", "sft", n=10) == synthetic.load("sft", "sft")[:10]
    assert synthetic.load("sft", "sft", n=10, seed=1) != synthetic.load("sft", "sft", n=10)


def test_wrong_kind_or_unknown_split_raises():
    with pytest.raises(ValueError, match="holds sft examples"):
        synthetic.load("sft", "preference")
    with pytest.raises(ValueError, match="unknown synthetic split"):
        synthetic.load("nope", "sft")
    with pytest.raises(ValueError, match="holds task examples"):
        synthetic.load("prompts", "sft")


@pytest.mark.parametrize("split", list(synthetic.SPLIT_KINDS))
def test_every_split_loads_as_prompts_with_their_rules(split):
    expected = [TaskExample([{"role": "user", "content": prompt}], {**rule, "family": family})
                for family, (prompt, _good, _bads, rule) in synthetic.instances(split)]
    assert synthetic.load(split, "prompt") == expected
    loaded = load_examples(f"synthetic:{split}", "prompt", max_rows=5)
    assert (loaded.examples, loaded.format) == (expected[:5], "synthetic")


def test_prompts_split_is_ppo_prompts_of_its_own():
    assert synthetic.SPLIT_SIZES["prompts"] == 448 and synthetic.SPLIT_KINDS["prompts"] == "task"
    prompts = load_examples("synthetic:prompts", "prompt").examples
    assert len(prompts) == 448 and load_examples("synthetic:prompts", "task").examples == prompts
    assert {e.rule["family"] for e in prompts} == set(synthetic.FAMILIES)
    texts = {prompt_text(e) for e in prompts}
    for split in ("sft", "preference"):  # its own stream: a few prompts recur by chance, most do not
        assert len(texts & {prompt_text(e) for e in synthetic.load(split, "prompt")}) < len(texts) // 4


def test_heldout_prompts_never_appear_in_training_splits():
    train = {prompt_text(e) for s in TRAIN_SPLITS for e in synthetic.load(s, synthetic.SPLIT_KINDS[s])}
    heldout = {prompt_text(e) for s in HELDOUT_SPLITS for e in synthetic.load(s, synthetic.SPLIT_KINDS[s])}
    assert train and heldout and not train & heldout
    for split in TRAIN_SPLITS + HELDOUT_SPLITS:  # the line is drawn by the prompt's hash, for any seed
        for seed in (0, 1):
            for _, (prompt, *_rest) in synthetic.instances(split, n=70, seed=seed):
                assert synthetic._is_heldout(prompt) == (split in HELDOUT_SPLITS)


@pytest.mark.parametrize("split", list(synthetic.SPLIT_KINDS))
def test_good_answers_pass_and_bad_answers_fail(split):
    for family, (prompt, good, bads, rule) in synthetic.instances(split):
        assert check(rule, good), (family, prompt, good)
        assert bads, family
        for bad in bads:
            assert not check(rule, bad), (family, prompt, bad)


def test_preference_pairs_are_good_against_one_of_the_bad_answers():
    instances = synthetic.instances("preference")
    for example, (_, (prompt, good, bads, _rule)) in zip(synthetic.load("preference", "preference"), instances):
        assert prompt_text(example) == prompt
        assert example.chosen[0]["content"] == good
        assert example.rejected[0]["content"] in bads


@pytest.mark.parametrize("split", HELDOUT_SPLITS)
def test_every_family_is_in_the_heldout_split(split):
    families = [family for family, _ in synthetic.instances(split)]
    assert set(families) == set(synthetic.FAMILIES)
    assert min(families.count(f) for f in synthetic.FAMILIES) >= synthetic.SPLIT_SIZES[split] // len(synthetic.FAMILIES)
    if split == "heldout":
        assert {e.rule["family"] for e in synthetic.load(split, "task")} == set(synthetic.FAMILIES)


def test_corpus_covers_prompts_and_answers():
    texts = set(synthetic.corpus())
    family, (prompt, good, bads, _) = synthetic.instances("heldout")[0]
    assert {prompt, good, *bads} <= texts


# --- rules ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("response, ok", [
    ("12", True),
    ("12.", True),  # one trailing period is dropped
    ("  12  \n", True),  # surrounding whitespace
    ("12 .", True),
    ("12..", False),  # only one period
    ("13", False),
    ("The answer is 12.", False),
    ("", False),
])
def test_exact(response, ok):
    assert check({"kind": "exact", "answer": "12"}, response) is ok


def test_exact_collapses_spaces_and_keeps_case():
    rule = {"kind": "exact", "answer": "apple apple"}
    assert check(rule, "apple   apple")
    assert check(rule, "apple\tapple\n")
    assert not check(rule, "appleapple")
    assert check({"kind": "exact", "answer": "APPLE"}, "APPLE.")
    assert not check({"kind": "exact", "answer": "APPLE"}, "apple")


def test_exact_normalises_the_answer_too():
    assert check({"kind": "exact", "answer": "Paris."}, "Paris")
    assert check({"kind": "exact", "answer": 12}, "12")  # a number answer is compared as text


def test_one_of():
    rule = {"kind": "one_of", "answers": ["Paris", "paris france"]}
    assert check(rule, "Paris.")
    assert check(rule, " paris   france ")
    assert not check(rule, "London")
    assert not check(rule, "PARIS")


@pytest.mark.parametrize("response, ok", [
    ('{"count": 3}', True),
    (' {"count":3}\n', True),
    ('{"count": 4}', False),
    ('{"count": "3"}', False),
    ("{count: 3}", False),  # not JSON
    ('Here is the JSON: {"count": 3}', False),
    ("", False),
])
def test_json(response, ok):
    assert check({"kind": "json", "answer": {"count": 3}}, response) is ok


def test_unknown_rule_kind_raises():
    with pytest.raises(ValueError, match="unknown rule kind 'regex'"):
        check({"kind": "regex", "pattern": "a"}, "a")
    with pytest.raises(ValueError, match="unknown rule kind"):
        check({}, "a")


def test_preference_all_pairs_every_bad_answer_of_the_preference_prompts():
    pairs = synthetic.load("preference_all", "preference")
    one_each = synthetic.load("preference", "preference")
    prompts = {p.prompt[0]["content"] for p in one_each}
    assert {p.prompt[0]["content"] for p in pairs} == prompts
    by_prompt = {}
    for p in pairs:
        by_prompt.setdefault(p.prompt[0]["content"], set()).add(p.rejected[0]["content"])
    for p in one_each:  # the single pair DPO sees is one of the comparisons the reward model sees
        assert p.rejected[0]["content"] in by_prompt[p.prompt[0]["content"]]
    assert len(pairs) > 2 * len(one_each)
    assert len(synthetic.load("preference_all", "preference", n=10)) == 10
