"""Preference collection: the store's assignment and idempotency, the export rules, import, generation and
AI judging from run stages, and an exported collection training a dpo stage."""

import json
import os
import random
import sqlite3
import stat
import uuid

import pytest

from align.annotation.store import Candidates, Collection
from align.cli import main
from align.collect.export import export_collection
from align.config import parse_recipe
from align.data.formats import load_examples
from align.errors import AlignError, DataError
from align.pipeline import run_recipe
from tests.conftest import tiny_recipe


def _prompt(i):
    return [{"role": "user", "content": f"question {i}"}]


def _collection(tmp_path, prompts=4, responses=2, overlap=1) -> Collection:
    collection = Collection.create(tmp_path / "c.sqlite")
    collection.add([Candidates(_prompt(i), [(f"answer {i}.{j}", f"m{j}") for j in range(responses)])
                    for i in range(prompts)])
    collection.set_overlap(overlap)
    return collection


def _judge_all(collection, who, pick) -> int:
    """`who` judges every pair offered, choosing `pick(task)` (a shown choice); returns how many."""
    n = 0
    while (task := collection.next_pair(who)) is not None:
        collection.submit(who, task["pair_id"], task["left"]["id"], pick(task), str(uuid.uuid4()))
        n += 1
    return n


def test_each_pair_goes_to_overlap_annotators_and_a_held_pair_comes_back(tmp_path):
    collection = _collection(tmp_path, prompts=5, responses=3, overlap=2)  # 15 pairs
    people = [collection.add_annotator(name) for name in ("ann", "bob", "cy")]
    first = collection.next_pair(people[0])
    assert collection.next_pair(people[0]) == first  # a reload shows the same pair, same sides
    assert first["progress"] == {"done": 0, "total": 15}
    for who in people:
        _judge_all(collection, who, lambda task: "left")
    judged = [v["pair_id"] for v in collection.verdicts()]
    assert len(judged) == 30 and all(judged.count(p) == 2 for p in set(judged))
    assert collection.progress(people[2])["done"] == 30 - 15 - collection.progress(people[1])["done"]


def test_submissions_are_idempotent_and_map_the_shown_side_to_the_pair(tmp_path):
    collection = _collection(tmp_path, prompts=1)
    who = collection.add_annotator("ann")
    task = collection.next_pair(who)
    ack = collection.submit(who, task["pair_id"], task["left"]["id"], "right", "s-1", rationale=" fine ")
    again = collection.submit(who, task["pair_id"], task["left"]["id"], "right", "s-1")
    assert again == {**ack, "repeated": True} and ack["progress"] == {"done": 1, "total": 1}
    [verdict] = collection.verdicts()
    pair = collection.pairs()[0]
    assert verdict["choice"] == ("a" if task["right"]["id"] == pair["a"]["id"] else "b")
    assert verdict["rationale"] == "fine" and verdict["left_id"] == task["left"]["id"]
    with pytest.raises(AlignError, match="choice must be one of"):
        collection.submit(who, task["pair_id"], task["left"]["id"], "A", "s-3")
    with pytest.raises(AlignError, match="another pair or annotator"):
        collection.submit(collection.add_annotator("bob"), task["pair_id"], task["left"]["id"], "left", "s-1")


def test_a_verdict_counts_only_for_an_open_assignment_as_it_was_shown(tmp_path):
    collection = _collection(tmp_path, prompts=2, overlap=2)
    ann, bob = (collection.add_annotator(name) for name in ("ann", "bob"))
    judge = collection.add_annotator("judge", kind="ai")
    task = collection.next_pair(ann)
    pair_id, left, right = task["pair_id"], task["left"]["id"], task["right"]["id"]
    other = next(p for p in collection.pairs() if p["pair_id"] != pair_id)
    refused = [(bob, pair_id, left), (bob, pair_id, right),  # ann's pair, not bob's: he could decide it alone
               (ann, other["pair_id"], other["a"]["id"]),  # a real pair no one gave ann
               (ann, pair_id, right),  # ann's pair with the other side on the left: her choice would flip
               (judge, pair_id, left)]  # AI judges record through `collect judge`, never an assignment
    for n, (who, pair, shown_left) in enumerate(refused):
        with pytest.raises(AlignError, match="is not assigned to"):
            collection.submit(who, pair, shown_left, "left", f"forged-{n}")
    collection.submit(ann, pair_id, left, "left", "s-1")
    with pytest.raises(AlignError, match="ann has judged this pair already"):  # one verdict per person
        collection.submit(ann, pair_id, left, "right", "s-2")
    assert collection.submit(ann, pair_id, left, "left", "s-1")["repeated"]  # a resend is still answered
    assert [(v["annotator"], v["pair_id"], v["left_id"]) for v in collection.verdicts()] == [("ann", pair_id, left)]


def test_the_file_is_sqlite_in_wal_mode(tmp_path):
    collection = _collection(tmp_path)
    assert sqlite3.connect(collection.path).execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    (tmp_path / "not.sqlite").write_text("hello")
    with pytest.raises(AlignError, match="not a collection file"):
        Collection.open(tmp_path / "not.sqlite")
    with pytest.raises(AlignError, match="no collection there"):
        Collection.open(tmp_path / "missing.sqlite")


def test_the_file_is_private_before_sqlite_opens_it(tmp_path, monkeypatch):
    def private(path) -> bool:
        return stat.S_IMODE(os.stat(path).st_mode) == 0o600

    connect = sqlite3.connect

    def checked_connect(path, *args, **kwargs):
        assert private(path), "SQLite opened a file that others may read"
        return connect(path, *args, **kwargs)

    monkeypatch.setattr(sqlite3, "connect", checked_connect)
    collection = _collection(tmp_path)
    with collection.reading() as db:  # while a connection is open, the -wal and -shm files exist
        db.execute("SELECT COUNT(*) FROM pairs").fetchone()
        assert all(private(f"{collection.path}{suffix}") for suffix in ("", "-wal", "-shm"))


def test_a_file_from_before_handles_gets_them_and_keeps_its_holds(tmp_path):
    collection = _collection(tmp_path)
    ann = collection.add_annotator("ann")
    task = collection.next_pair(ann)
    with collection.transaction() as db:  # the assignments table as it was before handles
        db.execute("DROP INDEX assignments_by_handle")
        db.execute("ALTER TABLE assignments DROP COLUMN handle")
    collection = Collection.open(collection.path)
    again = collection.next_pair(ann)
    assert again["handle"] and again == task | {"handle": again["handle"]}
    assert collection.assigned(ann, again["handle"]) == (task["pair_id"], task["left"]["id"])


def _verdicts(collection, choices: dict[str, list[str]]) -> None:
    """Annotator name -> their choices (in a/b terms) on pairs 1, 2, ... in order, each given on the pair's
    assignment (in the order they are assigned; the overlap must let every name judge every pair)."""
    pairs = collection.pairs()
    index = {pair["pair_id"]: n for n, pair in enumerate(pairs)}
    for name, picks in choices.items():
        who = collection.add_annotator(name)
        while (task := collection.next_pair(who)) is not None:
            pick = picks[index[task["pair_id"]]]
            left_is_a = task["left"]["id"] == pairs[index[task["pair_id"]]]["a"]["id"]
            shown = {"a": "left" if left_is_a else "right", "b": "right" if left_is_a else "left"}.get(pick, pick)
            collection.submit(who, task["pair_id"], task["left"]["id"], shown, str(uuid.uuid4()))


def test_export_rules_majority_all_ties_and_both_bad(tmp_path):
    collection = _collection(tmp_path, prompts=5, overlap=3)
    _verdicts(collection, {"ann": ["a", "a", "tie", "both_bad", "a"],
                           "bob": ["a", "b", "tie", "both_bad", "b"],
                           "cy": ["b", "b", "a", "both_bad", "tie"]})
    summary = export_collection(collection, tmp_path / "majority.jsonl")
    rows = [json.loads(line) for line in (tmp_path / "majority.jsonl").read_text().splitlines()]
    rows.sort(key=lambda row: row["pair_id"])
    # pair 1: a 2-1; pair 2: b 2-1; pair 3: tie wins; pair 4: both bad; pair 5: a, b, tie one each
    assert [(r["prompt"][0]["content"], r["chosen"], r["rejected"]) for r in rows] == [
        ("question 0", "answer 0.0", "answer 0.1"), ("question 1", "answer 1.1", "answer 1.0")]
    assert rows[0]["votes"] == {"a": 2, "b": 1, "tie": 0, "both_bad": 0} and rows[0]["annotators"] == ["ann", "bob"]
    assert summary["left_out"] == {"tie": 1, "both_bad": 1, "no_majority": 1}
    summary = export_collection(collection, tmp_path / "all.jsonl", aggregate="all")
    assert summary["rows"] == 9 and summary["left_out"] == {"tie": 3, "both_bad": 3}
    bob = export_collection(collection, tmp_path / "bob.jsonl", aggregate="all", who="bob")
    assert bob["rows"] == 3
    loaded = load_examples(str(tmp_path / "majority.jsonl"), "preference")
    assert loaded.format == "preference"
    assert {ex.chosen[-1]["content"] for ex in loaded.examples} == {"answer 0.0", "answer 1.1"}
    with pytest.raises(AlignError, match="no annotator zed; annotators: ann, bob, cy"):
        export_collection(collection, tmp_path / "x.jsonl", who="zed")
    with pytest.raises(AlignError, match="nothing to export"):
        export_collection(collection, tmp_path / "x.jsonl", who="ai")


def test_ranked_export_scores_responses_by_net_win_rate(tmp_path):
    collection = _collection(tmp_path, prompts=1, responses=3)  # pairs (0,1), (0,2), (1,2)
    _verdicts(collection, {"ann": ["a", "a", "b"]})  # 0 > 1, 0 > 2, 2 > 1
    export_collection(collection, tmp_path / "ranked", kind="ranked", fmt="datasets")
    [example] = load_examples(str(tmp_path / "ranked"), "ranked").examples
    assert [r[-1]["content"] for r in example.responses] == ["answer 0.0", "answer 0.2", "answer 0.1"]
    assert example.scores == [1.0, 0.0, -1.0]


def test_import_reads_eval_pairs_and_names_a_bad_row(tmp_path):
    path = tmp_path / "pairs.jsonl"
    rows = [{"prompt": [{"role": "user", "content": "hi"}], "a": "hello", "b": "hey", "a_model": "dpo",
             "b_model": "sft"}, {"prompt": "2+2?", "a": "4", "b": "5"}]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert main(["collect", "import", str(tmp_path / "c.sqlite"), str(path)]) == 0
    pairs = Collection.open(tmp_path / "c.sqlite").pairs()
    assert [(p["a"]["model"], p["b"]["model"]) for p in pairs] == [("dpo", "sft"), ("imported", "imported")]
    path.write_text(path.read_text() + json.dumps({"prompt": "x", "a": ["no"], "b": "y"}) + "\n")
    with pytest.raises(DataError, match=r"pairs.jsonl, row 3, field 'a': must be a string"):
        from align.collect.generate import read_candidates

        read_candidates(str(path))


def test_generate_from_two_stages_then_a_rule_judge_prefers_right_answers(tiny_run, tmp_path, capsys):
    path = tmp_path / "c.sqlite"
    assert main(["collect", "generate", str(path), "--prompts", "synthetic:prompts", "--max-prompts", "3",
                 "--model", str(tiny_run / "sft"), "--model", str(tiny_run / "dpo"), "-n", "2",
                 "--max-new-tokens", "6", "--quiet"]) == 0
    collection = Collection.open(path)
    models = {p[side]["model"] for p in collection.pairs() for side in "ab"}
    assert models == {"tiny/sft", "tiny/dpo"} and collection.counts()["prompts"] == 3
    assert all(p["rule"] for p in collection.pairs())  # the task's rules travel with the prompts
    # The tiny model's replies are noise: add a right and a wrong answer per prompt, for the judge to tell apart.
    right = {json.dumps(ex.prompt): ex.rule for ex in load_examples("synthetic:prompts", "prompt", max_rows=3).examples}
    collection.add([Candidates(json.loads(p), [(rule["answer"], "right"), ("definitely wrong", "wrong")], rule)
                    for p, rule in right.items()])
    assert main(["collect", "judge", str(path), "--judge", "synthetic_tasks", "--quiet"]) == 0
    export_collection(collection, tmp_path / "ai.jsonl", who="ai")
    rows = [json.loads(line) for line in (tmp_path / "ai.jsonl").read_text().splitlines()]
    assert {(r["chosen_model"], r["rejected_model"]) for r in rows} >= {("right", "wrong")}
    assert all(r["chosen_model"] == "right" or r["rejected_model"] != "right" for r in rows)
    with pytest.raises(AlignError, match="is neither an rm stage .* a reward card"):
        from align.collect.judge import load_collect_judge

        load_collect_judge(str(tiny_run / "dpo"))
    assert main(["collect", "generate", str(path), "--prompts", "synthetic:prompts", "--model", str(tiny_run)]) == 2
    assert "is a run folder: name one of its stages" in capsys.readouterr().err


def test_an_exported_collection_trains_a_dpo_stage(tmp_path):
    truth = load_examples("synthetic:preference", "preference", max_rows=96).examples
    collection = Collection.create(tmp_path / "c.sqlite")
    collection.add([Candidates(ex.prompt, [(ex.rejected[-1]["content"], "x"), (ex.chosen[-1]["content"], "y")])
                    for ex in truth], seed=1)
    collection.set_overlap(2)
    better = {ex.chosen[-1]["content"] for ex in truth}
    rng = random.Random(0)

    def careful(task):
        return "left" if task["left"]["text"] in better else "right"

    def hasty(task):  # right four times in five
        return careful(task) if rng.random() < 0.8 else {"left": "right", "right": "left"}[careful(task)]

    assert _judge_all(collection, collection.add_annotator("careful"), careful) == 96
    assert _judge_all(collection, collection.add_annotator("hasty"), hasty) == 96
    summary = export_collection(collection, tmp_path / "prefs.jsonl")
    assert 60 < summary["rows"] < 96 and summary["left_out"] == {"no_majority": 96 - summary["rows"]}
    recipe = tiny_recipe(tmp_path).replace('{path: "synthetic:preference", max_rows: 96}',
                                           f'{{path: "{tmp_path / "prefs.jsonl"}"}}')
    result = run_recipe(parse_recipe(recipe), quiet=True)
    state = json.loads((tmp_path / "tiny" / "dpo" / "stage.json").read_text())
    assert state["status"] == "done" and state["data"]["train"]["rows"] == summary["rows"]
    assert result["stages"]["dpo"]["metrics"]["eval_rewards/accuracies"] > 0.5


def test_an_rm_stage_judges_as_an_ai_annotator_beside_people(tiny_rm_run, tmp_path):
    """The rm stage judges its own held-out pairs; a person who always picks the better answer is the truth,
    so the judge's agreement with people is the rm stage's held-out accuracy."""
    from align.collect.agreement import summarize
    from align.collect.judge import judge_collection

    heldout = load_examples("synthetic:preference_heldout", "preference", max_rows=10).examples
    collection = Collection.create(tmp_path / "c.sqlite")
    collection.add([Candidates(ex.prompt, [(ex.chosen[-1]["content"], "good"), (ex.rejected[-1]["content"], "bad")])
                    for ex in heldout])
    _verdicts(collection, {"truth": ["a"] * len(heldout)})
    result = judge_collection(collection, str(tiny_rm_run / "rm"), quiet=True)
    assert result["judge"] == "rm:tinyrm/rm" and result["pairs"] == 10 and result["tie"] == 0
    ai = [v for v in collection.verdicts() if v["kind"] == "ai"]
    assert len(ai) == 10 and all(v["rationale"].startswith("reward A ") for v in ai)
    [row] = summarize(collection.verdicts())["ai"]
    accuracy = json.loads((tiny_rm_run / "rm" / "stage.json").read_text())["metrics"]["eval_accuracy"]
    assert row["pairs"] == 10 and row["agreement"] == pytest.approx(accuracy)
    judge_collection(collection, str(tiny_rm_run / "rm"), tie_margin=1e9, quiet=True)  # judging again replaces
    assert [v["choice"] for v in collection.verdicts() if v["kind"] == "ai"] == ["tie"] * 10


def test_cli_annotators_status_and_export(tmp_path, capsys):
    collection = _collection(tmp_path, prompts=3, overlap=2)
    _verdicts(collection, {"ann": ["a", "b", "tie"], "bob": ["a", "a", "tie"]})
    assert main(["collect", "annotators", str(collection.path), "--add", "cy", "--url", "http://box:9000/"]) == 0
    out = capsys.readouterr().err
    cy = next(a for a in collection.annotators() if a.name == "cy")
    assert f"http://box:9000/a/{cy.token}" in out and f"http://box:9000/admin/{collection.admin_token}" in out
    assert main(["collect", "status", str(collection.path)]) == 0
    out = capsys.readouterr().err
    assert "ann – bob" in out and "67%" in out  # agree on 2 of 3 pairs
    assert main(["collect", "export", str(collection.path), str(tmp_path / "out")]) == 0
    out = capsys.readouterr().err
    assert "1 preference rows from 6 verdicts on 3 of 3 pairs; left out: " in out
    assert "1 no majority" in out and "1 tie" in out
    assert load_examples(str(tmp_path / "out"), "preference").format == "preference"  # a datasets folder
    assert main(["collect", "export", str(tmp_path / "none.sqlite"), str(tmp_path / "x.jsonl")]) == 2
    assert "no collection there" in capsys.readouterr().err


def test_export_complete_only_takes_pairs_that_reached_their_overlap(tmp_path, capsys):
    collection = _collection(tmp_path, prompts=3, overlap=2)
    _verdicts(collection, {"ann": ["a", "a", "b"]})
    bob = collection.add_annotator("bob")
    for _ in range(2):  # bob judges two of the three pairs; the third has one verdict of the two it needs
        task = collection.next_pair(bob)
        collection.submit(bob, task["pair_id"], task["left"]["id"], "tie", str(uuid.uuid4()))
    judge = collection.add_annotator("judge", kind="ai")  # AI verdicts do not complete a pair
    collection.record_ai_verdicts(judge, [(p["pair_id"], "a", "") for p in collection.pairs()])
    complete = collection.complete_pairs()
    assert len(complete) == 2
    summary = export_collection(collection, tmp_path / "all.jsonl", aggregate="all", complete_only=True)
    rows = [json.loads(line) for line in (tmp_path / "all.jsonl").read_text().splitlines()]
    assert {row["pair_id"] for row in rows} == complete and summary["rows"] == 2
    assert summary["left_out"] == {"incomplete": 1, "tie": 2}
    assert export_collection(collection, tmp_path / "every.jsonl", aggregate="all")["rows"] == 3
    assert main(["collect", "export", str(collection.path), str(tmp_path / "cli.jsonl"), "--aggregate", "all",
                 "--complete-only"]) == 0
    assert "left out: 2 tie, 1 incomplete" in capsys.readouterr().err
