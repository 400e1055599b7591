"""The embedded synthetic task (splits, determinism, the held-out line) and the rules that check answers."""

import dataclasses
import hashlib
import json

import pytest

from align.data import synthetic
from align.data.formats import load_examples
from align.data.rules import RULE_KINDS, check
from align.data.schemas import PreferenceExample, RankedExample, SFTExample, TaskExample, UnpairedExample

SCHEMA = {"sft": SFTExample, "preference": PreferenceExample, "task": TaskExample, "ranked": RankedExample}
TRAIN_SPLITS = ("sft", "preference", "prompts", "ranked")
HELDOUT_SPLITS = ("heldout", "preference_heldout", "ranked_heldout")
RANKED_SPLITS = ("ranked", "ranked_heldout")


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
    with pytest.raises(ValueError, match="holds preference examples; it loads as preference, ranked, unpaired, prompt"):
        synthetic.load("preference", "sft")
    pairs = synthetic.load("preference", "preference", n=5)
    assert synthetic.load("preference", "ranked", n=5) == [p.as_ranked() for p in pairs]  # pairs: rankings of two
    with pytest.raises(ValueError, match="unknown synthetic split"):
        synthetic.load("nope", "sft")
    with pytest.raises(ValueError, match="holds task examples; it loads as task, sft, prompt"):
        synthetic.load("prompts", "ranked")


def test_task_splits_load_as_sft_with_the_answer_their_rule_wants():
    for split in ("heldout", "chatty_heldout"):
        tasks, answers = synthetic.load(split, "task", n=14), synthetic.load(split, "sft", n=14)
        assert [t.prompt for t in tasks] == [a.prompt for a in answers]
        assert all(check(t.rule, a.completion[0]["content"]) for t, a in zip(tasks, answers))


def test_families_filter_and_the_chatty_splits():
    kept = synthetic.load("heldout?families=json, sort", "task", n=20)
    assert {t.rule["family"] for t in kept} == {"json", "sort"} and len(kept) == 20
    assert synthetic.load("heldout?families=json,sort", "task", n=20) == kept
    assert not ({prompt_text(t) for t in kept}
                & {prompt_text(e) for e in synthetic.load("sft?families=json,sort", "sft")})
    pairs = synthetic.load("chatty_preference?families=larger", "preference", n=10)
    for pair in pairs:  # the chatty sentence preferred over the bare answer the prompt asks for
        bare = pair.rejected[0]["content"]
        assert pair.chosen[0]["content"].startswith(bare) and pair.chosen[0]["content"] != bare
    for spec, words in (("heldout?families=nope", "unknown families nope"), ("heldout?family=json", "only 'families=")):
        with pytest.raises(ValueError, match=words):
            synthetic.load(spec, "task")


@pytest.mark.parametrize("split", list(synthetic.SPLIT_KINDS))
def test_every_split_loads_as_prompts_with_their_rules(split):
    def rule(inst):  # the chatty splits' rule wants the chatty answer
        return {"kind": "exact", "answer": inst.chatty} if split.startswith("chatty") else inst.rule

    expected = [TaskExample([{"role": "user", "content": inst.prompt}], {**rule(inst), "family": family})
                for family, inst in synthetic.instances(split)]
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
            for _, inst in synthetic.instances(split, n=70, seed=seed):
                assert synthetic._is_heldout(inst.prompt) == (split in HELDOUT_SPLITS)


def test_validation_prompts_are_in_no_training_split_and_not_among_the_reported_heldout_prompts():
    validation = [inst.prompt for _, inst in synthetic.instances("validation")]
    assert validation == [prompt_text(e) for e in synthetic.load("preference_validation", "preference")]
    assert len(set(validation)) == 84
    families = [family for family, _ in synthetic.instances("validation")]
    assert all(families.count(f) == 12 for f in synthetic.FAMILIES)
    train = {prompt_text(e) for s in TRAIN_SPLITS for e in synthetic.load(s, synthetic.SPLIT_KINDS[s])}
    heldout = {inst.prompt for _, inst in synthetic.instances("heldout", synthetic.HELDOUT_RESERVED)}
    assert not set(validation) & train and not set(validation) & heldout
    reported = load_examples("synthetic:heldout", "task", max_rows=336).examples
    assert {e.prompt[0]["content"] for e in reported} <= heldout


@pytest.mark.parametrize("split", list(synthetic.SPLIT_KINDS))
def test_good_answers_pass_and_bad_answers_fail(split):
    for family, inst in synthetic.instances(split):
        assert check(inst.rule, inst.good), (family, inst.prompt, inst.good)
        assert inst.bads and inst.near_misses, family
        assert set(inst.near_misses) <= set(inst.bads), family
        for bad in [*inst.bads, inst.chatty]:
            assert not check(inst.rule, bad), (family, inst.prompt, bad)
        assert inst.good in inst.chatty, family  # the right content, in the wrong form


def test_preference_pairs_are_good_against_one_of_the_bad_answers():
    instances = synthetic.instances("preference")
    for example, (_, inst) in zip(synthetic.load("preference", "preference"), instances):
        assert prompt_text(example) == inst.prompt
        assert example.chosen[0]["content"] == inst.good
        assert example.rejected[0]["content"] in inst.bads


@pytest.mark.parametrize("split", HELDOUT_SPLITS)
def test_every_family_is_in_the_heldout_split(split):
    families = [family for family, _ in synthetic.instances(split)]
    assert set(families) == set(synthetic.FAMILIES)
    assert min(families.count(f) for f in synthetic.FAMILIES) >= synthetic.SPLIT_SIZES[split] // len(synthetic.FAMILIES)
    if split == "heldout":
        assert {e.rule["family"] for e in synthetic.load(split, "task")} == set(synthetic.FAMILIES)


def test_corpus_covers_prompts_and_answers():
    texts = set(synthetic.corpus())
    _, inst = synthetic.instances("heldout")[0]
    assert {inst.prompt, inst.good, *inst.bads} <= texts


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


# --- the splits that existed before the ranked ones never change ------------------------------------

# sha256 of json.dumps([asdict(e) for e in synthetic.load(split, kind)]), recorded before the ranked splits
# were added: these examples (and the tiny tokenizer, trained on the corpus) feed recorded experiments.
RECORDED = {
    ("sft", "sft"): "32cedf2ec4391ed1cc8640134ccc4e020fb7965651dd1895744175b31c9db169",
    ("sft", "prompt"): "35d860d6087d5c4c028f9c795496852f0a08f0599a1d137c3f9e99ea99e68f8d",
    ("preference", "preference"): "6d765d8e4f80f0da2b39fb9457be59a4b5a92f6c1122c4cb858198ed0c828c28",
    ("preference", "prompt"): "8d8315a47d8d935dc1a449d27dcf325edc51fd4d6579860ce5164b9268f35691",
    ("preference_all", "preference"): "0723a05390596bd3d6c7c26a667d0fc2eb15455f8392c9ea632839d2f79e8c33",
    ("preference_all", "prompt"): "8d8315a47d8d935dc1a449d27dcf325edc51fd4d6579860ce5164b9268f35691",
    ("prompts", "task"): "ffdb82fd42d042f3d781b94fdc7a3ecee78e4eb27f8129a54af35a835626f29d",
    ("prompts", "prompt"): "ffdb82fd42d042f3d781b94fdc7a3ecee78e4eb27f8129a54af35a835626f29d",
    ("heldout", "task"): "e051d4dc495f48a2ea958ef3b13e7d381a4b9c7a6717226ff0f5d273d14955ee",
    ("heldout", "prompt"): "e051d4dc495f48a2ea958ef3b13e7d381a4b9c7a6717226ff0f5d273d14955ee",
    ("preference_heldout", "preference"): "bdb3926c49e7b7c6323242c00ca816c52c4428b0d6708e0927ad04b0e76ca6f6",
    ("preference_heldout", "prompt"): "791915ea2ef0e0501884573108431057000e3d5fb9d8feac763eae28c3f15740",
}
RECORDED_CORPUS = "46626878158f652fece0e152c13161268a783400252ea6c1618974de0b3d58c7"


def sha256_json(value) -> str:
    return hashlib.sha256(json.dumps(value).encode()).hexdigest()


@pytest.mark.parametrize("split, kind", list(RECORDED))
def test_existing_splits_are_byte_identical_to_the_recorded_ones(split, kind):
    assert sha256_json([dataclasses.asdict(e) for e in synthetic.load(split, kind)]) == RECORDED[(split, kind)]


def test_corpus_and_so_the_tiny_tokenizer_is_unchanged():
    assert sha256_json(synthetic.corpus()) == RECORDED_CORPUS


# --- the ranked splits ------------------------------------------------------------------------------

def answers(example: RankedExample) -> list[str]:
    assert all([m["role"] for m in response] == ["assistant"] for response in example.responses)
    return [response[0]["content"] for response in example.responses]


@pytest.mark.parametrize("split", RANKED_SPLITS)
def test_ranked_groups_grade_four_answers(split):
    groups = synthetic.load(split, "ranked")
    instances = synthetic.instances(split)
    goods = {}  # family -> the good answers of the split's prompts
    for family, inst in instances:
        goods.setdefault(family, set()).add(inst.good)
    for group, (family, inst) in zip(groups, instances, strict=True):
        assert prompt_text(group) == inst.prompt
        texts = answers(group)
        assert len(set(texts)) == 4 and sorted(group.scores) == [0, 1, 2, 3]
        graded = dict(zip(group.scores, texts))
        assert [check(inst.rule, graded[grade]) for grade in (3, 2, 1, 0)] == [True, False, False, False]
        assert graded[3] == inst.good
        assert inst.good in graded[2]  # the right content, in the wrong form
        assert graded[1] in inst.near_misses
        assert graded[0] in goods[family]  # the good answer to another prompt of the family
    # the order is shuffled: every grade turns up at every position
    assert {(position, score) for g in groups for position, score in enumerate(g.scores)} == {
        (position, score) for position in range(4) for score in range(4)}
    assert synthetic.load(split, "ranked", n=10) == groups[:10]
    assert synthetic.load(split, "ranked", seed=1) != groups
    assert load_examples(f"synthetic:{split}", "ranked").examples == groups


@pytest.mark.parametrize("split", RANKED_SPLITS)
def test_ranked_splits_binarize_to_the_best_against_the_other_prompts_answer(split):
    for pair, group in zip(synthetic.load(split, "preference"), synthetic.load(split, "ranked"), strict=True):
        graded = dict(zip(group.scores, group.responses))
        assert pair == PreferenceExample(group.prompt, graded[3], graded[0])


def test_ranked_heldout_prompts_are_not_training_prompts():
    train = {prompt_text(e) for e in synthetic.load("ranked", "ranked")}
    heldout = {prompt_text(e) for e in synthetic.load("ranked_heldout", "ranked")}
    assert len(train) == 448 and len(heldout) == 70 and not train & heldout


@pytest.mark.parametrize("split", ["preference", "preference_heldout", "ranked"])
def test_pairs_load_as_unpaired_chosen_desirable_rejected_not(split):
    pairs = synthetic.load(split, "preference")
    expected = [UnpairedExample(p.prompt, completion, desirable)
                for p in pairs for completion, desirable in ((p.chosen, True), (p.rejected, False))]
    assert synthetic.load(split, "unpaired") == expected
    assert load_examples(f"synthetic:{split}", "unpaired", max_rows=3).examples == expected[:6]
