"""Ranked and unpaired data: OASST trees, ranked lists, UltraFeedback, scored responses, pairs read as
rankings of two or as unpaired rows, and the other kinds reading ranked files."""

import gzip
import json
from collections import Counter

import pytest

import align.models.tiny
from align.cli import main
from align.data.formats import load_examples
from align.data.schemas import PreferenceExample, RankedExample, TaskExample, UnpairedExample
from align.errors import DataError
from tests.conftest import SHARED
from tests.test_data_formats import bot, user, write_jsonl

OASST_FILE = SHARED / "data" / "ranked" / "oasst_en_100_trees_0-59.jsonl.gz"
needs_oasst = pytest.mark.skipif(not OASST_FILE.is_file(), reason=f"real OASST trees not present at {OASST_FILE}")


def load(tmp_path, rows, kind, format="auto"):
    return load_examples(write_jsonl(tmp_path / "d.jsonl", rows), kind, format=format)


def node(text, role, replies=(), **extra):
    return {"text": text, "role": role, "replies": list(replies), **extra}


# --- OASST trees -------------------------------------------------------------------------------------

# A tree with a ranked group at the root and a deeper one under the best reply, a deleted reply (with a
# ranked group of its own under it), an unranked reply and a group with a single ranked reply.
TREE = {"message_tree_id": "t1", "prompt": node("q1", "prompter", [
    node("a-best", "assistant", [node("q2", "prompter", [
        node("b-second", "assistant", rank=1), node("b-best", "assistant", rank=0),
        node("b-unranked", "assistant", rank=None)])], rank=0),
    node("a-worst", "assistant", [node("lonely", "prompter", [node("c", "assistant", rank=0)])], rank=2),
    node("a-middle", "assistant", rank=1),
    node("a-deleted", "assistant", [node("q3", "prompter", [node("x", "assistant", rank=0),
                                                           node("y", "assistant", rank=1)])], rank=3, deleted=True),
])}
TREE_GROUPS = [
    RankedExample([user("q1")], [[bot("a-best")], [bot("a-worst")], [bot("a-middle")]], [0.0, -2.0, -1.0]),
    RankedExample([user("q1"), bot("a-best"), user("q2")], [[bot("b-second")], [bot("b-best")]], [-1.0, 0.0]),
]


def test_oasst_tree_gives_every_ranked_group_with_its_conversation(tmp_path):
    data = load(tmp_path, [TREE], "ranked")
    assert data.format == "oasst_tree" and data.examples == TREE_GROUPS and data.rows_read == 1
    # some exports give the root message itself as the row
    assert load(tmp_path, [TREE["prompt"]], "ranked").examples == TREE_GROUPS


def test_oasst_trees_without_a_ranked_group_give_nothing_but_count_as_rows(tmp_path):
    empty = {"message_tree_id": "t0", "prompt": node("hi", "prompter", [node("hello", "assistant")])}
    data = load(tmp_path, [empty, TREE, empty], "ranked")
    assert data.examples == TREE_GROUPS and data.rows_read == 3
    with pytest.raises(DataError, match="its 1 rows hold none"):
        load(tmp_path, [empty], "ranked")


def test_other_kinds_read_oasst_trees_one_example_per_group(tmp_path):
    assert load(tmp_path, [TREE], "preference").examples == [
        PreferenceExample([user("q1")], [bot("a-best")], [bot("a-worst")]),
        PreferenceExample([user("q1"), bot("a-best"), user("q2")], [bot("b-best")], [bot("b-second")])]
    data = load(tmp_path, [TREE], "prompt")
    assert data.format == "oasst_tree"
    assert data.examples == [TaskExample([user("q1")]), TaskExample([user("q1"), bot("a-best"), user("q2")])]
    assert [(e.completion[0]["content"], e.desirable) for e in load(tmp_path, [TREE], "unpaired").examples] == [
        ("a-best", True), ("a-worst", False), ("b-best", True), ("b-second", False)]


def oasst_trees() -> list[dict]:
    with gzip.open(OASST_FILE, "rt", encoding="utf-8") as f:
        return [json.loads(line) for line in f]


def groups_by_parent_links(tree: dict) -> list[tuple[list[tuple[str, str]], list[str], list[int]]]:
    """The ranked groups found another way: index the messages by id, then climb `parent_id` to the root."""
    messages, stack = {}, [tree["prompt"]]
    while stack:
        message = stack.pop()
        messages[message["message_id"]] = message
        stack.extend(message["replies"])
    groups = []
    for message in messages.values():
        ranked = [r for r in message["replies"] if r.get("rank") is not None and not r["deleted"]]
        if message["role"] != "prompter" or len(ranked) < 2:
            continue
        path, current = [], message
        while current is not None:
            path.insert(0, (current["role"], current["text"]))
            current = messages.get(current.get("parent_id"))
        groups.append((path, [r["text"] for r in ranked], [r["rank"] for r in ranked]))
    return groups


@needs_oasst
def test_real_oasst_trees_match_the_readme_and_an_independent_walk():
    expected = [group for tree in oasst_trees() for group in groups_by_parent_links(tree)]
    # the README's counts of ranked groups per size K
    assert Counter(len(texts) for _, texts, _ in expected) == {2: 30, 3: 73, 4: 13, 5: 1, 6: 3, 8: 1, 9: 1}
    data = load_examples(str(OASST_FILE), "ranked")
    assert data.format == "oasst_tree" and data.rows_read == 60 and len(data.examples) == 122
    roles = {"prompter": "user", "assistant": "assistant"}
    walked = [(json.dumps([[roles[role], text] for role, text in path]), texts, [-rank for rank in ranks])
              for path, texts, ranks in expected]
    converted = [(json.dumps([[m["role"], m["content"]] for m in ex.prompt]), [r[0]["content"] for r in ex.responses],
                  ex.scores) for ex in data.examples]
    assert sorted(walked) == sorted(converted)  # the two walks visit the groups in different orders


@needs_oasst
def test_real_oasst_deep_groups_follow_the_branch_they_are_on():
    examples = load_examples(str(OASST_FILE), "ranked").examples
    assert Counter(len(ex.prompt) for ex in examples) == {1: 60, 3: 61, 5: 1}
    deepest = max(examples, key=lambda ex: len(ex.prompt))
    assert [m["role"] for m in deepest.prompt] == ["user", "assistant", "user", "assistant", "user"]
    # each message of the prompt is a reply to the one before it in the tree
    texts = [m["content"] for m in deepest.prompt]
    tree = next(t for t in oasst_trees() if t["prompt"]["text"] == texts[0])
    current = tree["prompt"]
    for text in texts[1:]:
        current = next(reply for reply in current["replies"] if reply["text"] == text)
    ranked = sorted((r for r in current["replies"] if r.get("rank") is not None), key=lambda r: r["rank"])
    pair = deepest.best_vs_worst()
    assert pair.chosen[0]["content"] == ranked[0]["text"] and pair.rejected[0]["content"] == ranked[-1]["text"]


@needs_oasst
def test_real_oasst_trees_as_pairs_prompts_and_unpaired_rows():
    ranked = load_examples(str(OASST_FILE), "ranked").examples
    pairs = load_examples(str(OASST_FILE), "preference")
    assert pairs.format == "oasst_tree" and pairs.examples == [ex.best_vs_worst() for ex in ranked]
    assert load_examples(str(OASST_FILE), "prompt").examples == [TaskExample(ex.prompt) for ex in ranked]
    assert len(load_examples(str(OASST_FILE), "unpaired").examples) == 2 * len(ranked)


# --- ranked lists, UltraFeedback, scored responses ---------------------------------------------------

RANKED_CASES = [
    ("ranked", {"prompt": "q", "responses": ["a", "b", "c"], "ranks": [0, 1, 1]},  # a tie
     RankedExample([user("q")], [[bot("a")], [bot("b")], [bot("c")]], [0.0, -1.0, -1.0])),
    ("ranked", {"prompt": [user("q")], "responses": [[bot("a")], "b"], "scores": [0.5, 2]},
     RankedExample([user("q")], [[bot("a")], [bot("b")]], [0.5, 2.0])),
    ("ranked", {"prompt": "q", "responses": ["a", "b"], "ranks": [1, 0], "scores": None},  # null = absent
     RankedExample([user("q")], [[bot("a")], [bot("b")]], [-1.0, 0.0])),
    ("ultrafeedback", {"instruction": "q", "completions": [
        {"response": "a", "overall_score": 7.5, "fine-grained_score": 4.0},
        {"response": "b", "overall_score": None, "fine-grained_score": 4.25},  # the fine-grained score stands in
        {"response": "c", "overall_score": 7.5}]},
     RankedExample([user("q")], [[bot("a")], [bot("b")], [bot("c")]], [7.5, 4.25, 7.5])),
    ("scored_responses", {"prompt": "q", "all_generated_responses": ["a", "b"], "all_rm_scores": [-0.5, 1.25],
                          "chosen": "b", "rejected": "a"},
     RankedExample([user("q")], [[bot("a")], [bot("b")]], [-0.5, 1.25])),
    # every pair format, as a ranking of two under its own name
    ("preference", {"prompt": "q", "chosen": "good", "rejected": "bad", "margin": 3},
     RankedExample([user("q")], [[bot("good")], [bot("bad")]], [1.0, 0.0])),
    ("implicit_prompt", {"chosen": [user("q"), bot("good")], "rejected": [user("q"), bot("bad")]},
     RankedExample([user("q")], [[bot("good")], [bot("bad")]], [1.0, 0.0])),
    ("hh_rlhf", {"chosen": "\n\nHuman: q\n\nAssistant: good", "rejected": "\n\nHuman: q\n\nAssistant: bad"},
     RankedExample([user("q")], [[bot("good")], [bot("bad")]], [1.0, 0.0])),
]


@pytest.mark.parametrize("name, row, expected", RANKED_CASES)
def test_ranked_format_converts_and_is_detected(tmp_path, name, row, expected):
    data = load(tmp_path, [row], "ranked")
    assert (data.format, data.examples) == (name, [expected])
    assert load(tmp_path, [row], "ranked", format=name).examples == [expected]


@pytest.mark.parametrize("name, row, expected", [c for c in RANKED_CASES if c[0] in ("ranked", "ultrafeedback")])
def test_preference_kind_reads_a_ranked_file_as_best_against_worst(tmp_path, name, row, expected):
    data = load(tmp_path, [row], "preference")
    assert (data.format, data.examples) == (name, [expected.best_vs_worst()])


def test_best_vs_worst_takes_the_first_best_and_the_last_worst():
    ranking = RankedExample([user("q")], [[bot(t)] for t in "abcde"], [1.0, 3.0, 0.0, 3.0, 0.0])
    assert ranking.best_vs_worst() == PreferenceExample([user("q")], [bot("b")], [bot("e")])


def test_pair_files_keep_their_preference_format(tmp_path):
    # SimPO's data has both a scored list and a pair: the preference kind reads the pair, as it did before.
    row = RANKED_CASES[4][1]
    data = load(tmp_path, [row], "preference")
    assert data.format == "preference" and data.examples == [PreferenceExample([user("q")], [bot("b")], [bot("a")])]
    assert load(tmp_path, [{"prompt": "q", "responses": ["a", "b"], "ranks": [0, 1]}], "prompt").examples == [
        TaskExample([user("q")])]


# --- unpaired ----------------------------------------------------------------------------------------

def test_unpaired_rows_and_pairs_split_in_two(tmp_path):
    data = load(tmp_path, [{"prompt": "q", "completion": "a", "label": True},
                           {"prompt": [user("r")], "completion": [bot("b")], "label": False}], "unpaired")
    assert data.format == "unpaired" and data.examples == [UnpairedExample([user("q")], [bot("a")], True),
                                                           UnpairedExample([user("r")], [bot("b")], False)]
    pairs = [{"prompt": "q", "chosen": "good", "rejected": "bad"}, {"prompt": "r", "chosen": "yes", "rejected": "no"}]
    data = load(tmp_path, pairs, "unpaired")
    assert data.format == "preference" and data.rows_read == 2
    assert data.examples == [UnpairedExample([user("q")], [bot("good")], True),
                             UnpairedExample([user("q")], [bot("bad")], False),
                             UnpairedExample([user("r")], [bot("yes")], True),
                             UnpairedExample([user("r")], [bot("no")], False)]


# --- errors name the field ---------------------------------------------------------------------------

OK_RANKED = {"prompt": "q", "responses": ["a", "b"], "ranks": [0, 1]}
OK_UF = {"instruction": "q",
         "completions": [{"response": "a", "overall_score": 1}, {"response": "b", "overall_score": 2}]}


@pytest.mark.parametrize("kind, format, row, field, words", [
    ("ranked", "ranked", {**OK_RANKED, "ranks": [0, 1, 2]}, "ranks", "has 3 entries for the 2 responses"),
    ("ranked", "ranked", {**OK_RANKED, "ranks": [1, 1]}, "ranks",
     "all 2 responses have the same score; a ranking needs at least two different scores"),
    ("ranked", "ranked", {**OK_RANKED, "scores": [1, 2]}, "scores", "exactly one of 'ranks'"),
    ("ranked", "ranked", {"prompt": "q", "responses": ["a", "b"]}, "ranks", "exactly one of 'ranks'"),
    ("ranked", "ranked", {**OK_RANKED, "responses": ["a"], "ranks": [0]}, "responses", "at least 2"),
    ("ranked", "ranked", {**OK_RANKED, "responses": ["a", " "]}, "responses[1]", "empty"),
    ("ranked", "ranked", {"prompt": "q", "responses": ["a", "b"], "scores": [1, float("inf")]}, "scores[1]",
     "finite number"),
    ("ranked", "ranked", {**OK_RANKED, "ranks": [0, True]}, "ranks[1]", "finite number"),
    ("ranked", "ultrafeedback", {**OK_UF, "completions": [OK_UF["completions"][0], {"response": "b"}]},
     "completions[1].overall_score", "missing"),
    ("ranked", "ultrafeedback", {**OK_UF, "completions": [{"response": "a", "overall_score": 2}] * 2},
     "completions", "same score"),
    ("ranked", "ultrafeedback", {**OK_UF, "completions": [OK_UF["completions"][0], {"overall_score": 3}]},
     "completions[1].response", "missing"),
    ("ranked", "scored_responses", {"prompt": "q", "all_generated_responses": ["a", "b"], "all_rm_scores": [1]},
     "all_rm_scores", "has 1 entries"),
    ("ranked", "oasst_tree", {"prompt": node("q", "prompter", [node("a", "assistant", rank=0),
                                                               node("b", "assistant", rank="first")])},
     "prompt.replies[1].rank", "finite number"),
    ("ranked", "oasst_tree", {"prompt": node("q", "prompter", [node("a", "assistant", rank=0),
                                                               node("b", "assistant", rank=0)])},
     "prompt.replies", "same score"),
    ("ranked", "oasst_tree", {"prompt": node("q", "prompter", [node("a", "robot")])}, "prompt.replies[0].role",
     "unknown role"),
    ("preference", "ranked", {**OK_RANKED, "ranks": [0, 0]}, "ranks", "same score"),
    ("unpaired", "unpaired", {"prompt": "q", "completion": "a", "label": 1}, "label", "expected true or false"),
    ("unpaired", "unpaired", {"prompt": "q", "completion": "a", "label": "true"}, "label", "expected true or false"),
    ("unpaired", "unpaired", {"prompt": "q", "completion": "a"}, "label", "missing"),
    ("unpaired", "preference", {"prompt": "q", "chosen": "a", "rejected": "a"}, "rejected", "identical"),
])
def test_bad_row_names_file_row_and_field(tmp_path, kind, format, row, field, words):
    path = write_jsonl(tmp_path / "d.jsonl", [row])
    with pytest.raises(DataError) as info:
        load_examples(path, kind, format=format)
    assert (info.value.file, info.value.row, info.value.field) == (path, 1, field)
    assert words in info.value.message and f"row 1, field '{field}'" in str(info.value)


# --- align data inspect ------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def tiny_tok():
    return align.models.tiny.tiny_tokenizer()


def inspect(capsys, monkeypatch, tiny_tok, path, *extra) -> str:
    monkeypatch.setattr(align.models.tiny, "tiny_tokenizer", lambda *a, **k: tiny_tok)  # train it once only
    code = main(["data", "inspect", str(path), "--model", "builtin:tiny", *extra])
    captured = capsys.readouterr()
    output = " ".join((captured.out + captured.err).split())  # rich wraps long lines
    assert code == 0, output
    return output


@pytest.mark.parametrize("row, kind_format, shown", [
    ({"prompt": "Pick one.", "responses": ["x", "y", "z"], "ranks": [2, 0, 1]}, "ranked / ranked",
     ["response 1 (rank 3 of 3, score -2)", "response 2 (rank 1 of 3, score 0)", "response 3 (rank 2 of 3, score -1)"]),
    ({"prompt": "Pick one.", "completion": "x", "label": False}, "unpaired / unpaired", ["completion (undesirable)"]),
    ({"prompt": "Pick one.", "chosen": "x", "rejected": "y"}, "preference / preference", ["chosen", "rejected"]),
])
def test_inspect_detects_ranked_and_unpaired_files_and_leaves_pairs_to_preference(
        tmp_path, capsys, monkeypatch, tiny_tok, row, kind_format, shown):
    output = inspect(capsys, monkeypatch, tiny_tok, write_jsonl(tmp_path / "d.jsonl", [row]))
    assert kind_format in output and "1 usable, 0 skipped" in output and "rows read" not in output
    for label in shown:
        assert f"row 1, {label}:" in output


@needs_oasst
def test_inspect_shows_oasst_trees_as_ranked_groups(capsys, monkeypatch, tiny_tok):
    output = inspect(capsys, monkeypatch, tiny_tok, OASST_FILE, "--row", "2")
    assert "ranked / oasst_tree" in output and "122 usable, 0 skipped, from 60 rows read" in output
    assert ("row 2, response 1 (rank 1 of 2, score 0):" in output
            and "row 2, response 2 (rank 2 of 2, score -1):" in output)
