"""The counts that make assignment and verdicts an index seek (align.annotation.assign): after random annotation they
agree with the rules computed from scratch, an older file gets them once, and no statement on the annotation path
scans a table of the collection."""

import random
import re
import sqlite3
import uuid
from types import SimpleNamespace

import pytest

from align.annotation import assign, store
from align.annotation.schema import SCHEMA
from align.annotation.store import HOLD_SECONDS, Candidates, Collection
from align.errors import AlignError

# The rules as the store computed them before it kept counts: the humans other than `me` who judged a pair or hold it
# (assigned since `cutoff`, not judged), the pair an annotator holds, the pair they get, and their progress.
LOAD = """(SELECT COUNT(*) FROM annotators n WHERE n.kind = 'human' AND n.id != :me AND (
    EXISTS (SELECT 1 FROM verdicts v WHERE v.pair_id = p.id AND v.annotator_id = n.id)
    OR EXISTS (SELECT 1 FROM assignments s WHERE s.pair_id = p.id AND s.annotator_id = n.id
               AND s.issued >= :cutoff)))"""
HELD = ("SELECT s.pair_id, s.handle FROM assignments s WHERE s.annotator_id = :me AND NOT EXISTS (SELECT 1 "
        "FROM verdicts v WHERE v.pair_id = s.pair_id AND v.annotator_id = :me) ORDER BY s.issued DESC LIMIT 1")
NEXT = (f"SELECT p.id, {LOAD} AS others FROM pairs p WHERE others < :k AND NOT EXISTS (SELECT 1 FROM verdicts v "
        "WHERE v.pair_id = p.id AND v.annotator_id = :me) ORDER BY others DESC, p.shuffle LIMIT 1")
OPEN = ("SELECT COUNT(*) FROM pairs p WHERE NOT EXISTS (SELECT 1 FROM verdicts v WHERE v.pair_id = p.id "
        "AND v.annotator_id = :me) AND (SELECT COUNT(DISTINCT v.annotator_id) FROM verdicts v JOIN annotators n "
        "ON n.id = v.annotator_id WHERE v.pair_id = p.id AND n.kind = 'human') < :k")


class Clock:
    """The store's clock, which only the test moves."""

    def __init__(self, monkeypatch):
        self.now = 1.0e9
        monkeypatch.setattr(store, "time", SimpleNamespace(time=lambda: self.now))

    @property
    def cutoff(self) -> float:
        return self.now - HOLD_SECONDS


def expected_next(collection, me: int, cutoff: float) -> tuple[int, str | None] | None:
    """(pair, handle where it is the one `me` holds) that the rules give `me` now, or None."""
    with collection.reading() as db:
        args = {"me": me, "cutoff": cutoff, "k": collection.overlap_in(db)}
        held = db.execute(HELD, args).fetchone()
        if held and db.execute(f"SELECT {LOAD} FROM pairs p WHERE p.id = :pair",
                               args | {"pair": held["pair_id"]}).fetchone()[0] < args["k"]:
            return held["pair_id"], held["handle"]
        row = db.execute(NEXT, args).fetchone()
    return (row["id"], None) if row else None


def from_scratch(collection, cutoff: float) -> dict:
    """Every kept count as the rules define it, with holds issued before `cutoff` lapsed."""
    with collection.reading() as db:
        k = collection.overlap_in(db)
        judges = {row["id"]: set() for row in db.execute("SELECT id FROM pairs")}
        for row in db.execute("SELECT v.pair_id, v.annotator_id FROM verdicts v JOIN annotators n "
                              "ON n.id = v.annotator_id WHERE n.kind = 'human'"):
            judges[row["pair_id"]].add(row["annotator_id"])
        loads = dict(db.execute(f"SELECT p.id, {LOAD} FROM pairs p", {"me": -1, "cutoff": cutoff}).fetchall())
        states = {(row["pair_id"], row["annotator_id"]): "judged" if row["judged"] else
                  "held" if row["issued"] >= cutoff and row["kind"] == "human" else "lapsed"
                  for row in db.execute("SELECT s.*, n.kind, EXISTS (SELECT 1 FROM verdicts v WHERE v.pair_id = "
                                        "s.pair_id AND v.annotator_id = s.annotator_id) AS judged FROM assignments s "
                                        "JOIN annotators n ON n.id = s.annotator_id")}
        progress = {}
        for (who,) in db.execute("SELECT id FROM annotators").fetchall():
            done = db.execute("SELECT COUNT(DISTINCT pair_id) FROM verdicts WHERE annotator_id = ?", (who,)).fetchone()
            progress[who] = {"done": done[0], "total": done[0] + db.execute(OPEN, {"me": who, "k": k}).fetchone()[0]}
        short = sum(len(ids) < k for ids in judges.values())
    return {"pairs": {p: (len(ids), ids, loads[p]) for p, ids in judges.items()}, "states": states,
            "progress": progress, "short": short}


def kept(collection) -> dict:
    """The counts as the store keeps them, in from_scratch's terms."""
    with collection.reading() as db:
        pairs = {row["id"]: (row["judged"], set(assign._ids(row["judges"])), row["load"])
                 for row in db.execute("SELECT id, judged, judges, load FROM pairs")}
        states = {(row["pair_id"], row["annotator_id"]): row["state"]
                  for row in db.execute("SELECT pair_id, annotator_id, state FROM assignments")}
        progress = {who: assign.progress(db, who) for (who,) in db.execute("SELECT id FROM annotators").fetchall()}
        short = int(db.execute("SELECT value FROM meta WHERE key = 'short_pairs'").fetchone()[0])
    return {"pairs": pairs, "states": states, "progress": progress, "short": short}


def exercise(collection, people, judge, clock: Clock, rng: random.Random, steps: int) -> dict:
    """`steps` random actions (asking for a pair, judging it, resending a verdict, time passing, a new overlap, an
    AI judge's verdicts), each checked against the rules; returns how often each action ran."""
    in_hand, acked, ran = {}, [], {}
    swept = clock.cutoff  # the counts are those of the holds alive at the last assignment (or the upgrade)
    pair_ids = [p["pair_id"] for p in collection.pairs()]
    for _ in range(steps):
        action = rng.choices(("next", "judge", "resend", "wait", "overlap", "ai"), (8, 6, 1, 2, 1, 1))[0]
        who = rng.choice(people)
        if action == "next":
            expected = expected_next(collection, who.id, clock.cutoff)
            task, swept = collection.next_pair(who), clock.cutoff
            assert (task and task["pair_id"]) == (expected and expected[0])
            if expected and expected[1]:  # the pair they hold comes back as it was shown
                assert task["handle"] == expected[1]
                assert who.id not in in_hand or {**task, "progress": 0} == {**in_hand[who.id], "progress": 0}
            in_hand[who.id] = task
        elif action == "judge" and in_hand.get(who.id):
            task = in_hand.pop(who.id)
            submission = str(uuid.uuid4())
            ack = collection.submit(who, task["pair_id"], task["left"]["id"], rng.choice(store.SHOWN_CHOICES),
                                    submission)
            acked.append((who, task, submission, ack["verdict_id"]))
        elif action == "resend" and acked:
            who, task, submission, verdict_id = rng.choice(acked)
            again = collection.submit(who, task["pair_id"], task["left"]["id"], "tie", submission)
            assert again["repeated"] and again["verdict_id"] == verdict_id
        elif action == "wait":
            clock.now += rng.choice((5, HOLD_SECONDS / 2, HOLD_SECONDS + 1))
        elif action == "overlap":
            collection.set_overlap(rng.randint(1, 3))
        elif action == "ai":
            collection.record_ai_verdicts(judge, [(p, rng.choice(store.CHOICES), "") for p in pair_ids
                                                  if rng.random() < 0.5])
        else:
            continue
        ran[action] = ran.get(action, 0) + 1
        assert kept(collection) == from_scratch(collection, swept), f"after {action}"
    return ran


def _collection(tmp_path, prompts: int, responses: int, overlap: int) -> Collection:
    collection = Collection.create(tmp_path / "c.sqlite")
    collection.add([Candidates([{"role": "user", "content": f"q {i}"}], [(f"r {i}.{j}", f"m{j}")
                                                                        for j in range(responses)])
                    for i in range(prompts)], seed=1)
    collection.set_overlap(overlap)
    return collection


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_kept_counts_agree_with_the_rules_after_random_annotation(tmp_path, monkeypatch, seed):
    clock = Clock(monkeypatch)
    collection = _collection(tmp_path, prompts=6, responses=3, overlap=2)  # 18 pairs
    people = [collection.add_annotator(name) for name in ("ann", "bob", "cy", "dee")]
    ran = exercise(collection, people, collection.add_annotator("judge", kind="ai"), clock, random.Random(seed), 250)
    assert all(ran.get(action, 0) > 0 for action in ("next", "judge", "resend", "wait", "overlap", "ai"))
    clock.now += HOLD_SECONDS / 2
    with collection.transaction() as db:  # what an upgrade does: every count from the rows
        assign.recount(db, collection.overlap_in(db), clock.cutoff)
    assert kept(collection) == from_scratch(collection, clock.cutoff)


def test_a_file_made_before_the_counts_gets_them_once_and_assigns_by_the_rules(tmp_path, monkeypatch):
    clock = Clock(monkeypatch)
    path = tmp_path / "old.sqlite"
    db = sqlite3.connect(path)  # the tables as files had them, with holds alive and lapsed, and verdicts
    with db:
        db.executescript(SCHEMA)
        assert "load" not in {row[1] for row in db.execute("PRAGMA table_info(pairs)")}
        db.execute("CREATE UNIQUE INDEX assignments_by_handle ON assignments (handle)")
        db.execute("INSERT INTO meta VALUES ('admin_token', 't'), ('overlap', '2'), ('created', 'then')")
        shuffles = iter(random.Random(0).sample(range(1000), 12))
        for i in range(4):
            db.execute("INSERT INTO prompts (id, messages) VALUES (?, ?)", (i + 1, f'[{{"content": "{i}"}}]'))
            db.executemany("INSERT INTO responses (id, prompt_id, text, model) VALUES (?, ?, ?, ?)",
                           [(3 * i + j + 1, i + 1, f"r {i}.{j}", f"m{j}") for j in range(3)])
            db.executemany("INSERT INTO pairs (prompt_id, a, b, shuffle) VALUES (?, ?, ?, ?)",
                           [(i + 1, 3 * i + a + 1, 3 * i + b + 1, next(shuffles)) for a, b in ((0, 1), (0, 2), (1, 2))])
        db.executemany("INSERT INTO annotators VALUES (?, ?, ?, ?, 'then')",
                       [(1, "ann", "ta", "human"), (2, "bob", "tb", "human"), (3, "cy", "tc", "human"),
                        (4, "judge", "tj", "ai")])
        then, long_ago = clock.now - 60, clock.now - 2 * HOLD_SECONDS
        assignments = [(1, 1, then, "h11"), (2, 1, then, "h21"), (3, 1, then, "h31"),  # ann judged 1, 2; holds 3
                       (1, 2, long_ago, "h12"), (4, 2, long_ago, "h42"),  # bob judged 1; his hold on 4 lapsed
                       (2, 3, then, "h23")]  # cy judged 2
        db.executemany("INSERT INTO assignments SELECT ?, ?, a, ?, ? FROM pairs WHERE id = ?",
                       [(p, who, issued, handle, p) for p, who, issued, handle in assignments])
        judged = [(1, 1), (2, 1), (1, 2), (2, 3)] + [(p, 4) for p in range(1, 13)]
        db.executemany("INSERT INTO verdicts (pair_id, annotator_id, choice, left_id, submission, created) "
                       "SELECT ?, ?, 'a', a, ?, 'then' FROM pairs WHERE id = ?",
                       [(p, who, f"s{p}.{who}", p) for p, who in judged])
    db.close()
    collection = Collection.open(path)
    assert kept(collection) == from_scratch(collection, clock.cutoff)
    assert kept(collection)["progress"][4] == {"done": 12, "total": 12}  # the AI judge's verdicts are kept too
    monkeypatch.setattr(store, "make_current", lambda *args: pytest.fail("a current file was upgraded again"))
    collection = Collection.open(path)

    ann, bob, cy = (collection.annotator(token) for token in ("ta", "tb", "tc"))
    assert collection.next_pair(ann)["handle"] == "h31"  # her hold, as it was
    assert collection.next_pair(bob)["handle"] == "h42"  # lapsed, but nobody else took it: his still
    assert collection.next_pair(cy)["pair_id"] == 3  # the fullest pair cy has not judged: ann holds it
    exercise(collection, [ann, bob, cy], collection.annotator("tj"), clock, random.Random(3), 120)


def test_ai_annotators_take_no_part_in_assignment(tmp_path):
    collection = _collection(tmp_path, prompts=2, responses=2, overlap=1)
    judge, ann = collection.add_annotator("judge", kind="ai"), collection.add_annotator("ann")
    with pytest.raises(AlignError, match="AI annotators take no part in assignment"):
        collection.next_pair(judge)
    with pytest.raises(AlignError, match="only an AI annotator's verdicts"):
        collection.record_ai_verdicts(ann, [])
    collection.record_ai_verdicts(judge, [(p["pair_id"], "a", "") for p in collection.pairs()])
    assert collection.next_pair(ann)["progress"] == {"done": 0, "total": 2}  # AI verdicts fill no pair


def _traced(monkeypatch) -> tuple[list[str], list[int]]:
    """Every SQL statement the collection runs from now on, with its parameters filled in, and a count of the
    virtual-machine instructions they run (a measure of their work that no other process on the machine changes)."""
    ran, work, connect = [], [0], Collection._connect

    def traced(self):
        db = connect(self)
        db.set_trace_callback(ran.append)
        db.set_progress_handler(lambda: work.__setitem__(0, work[0] + 1), 1)
        return db

    monkeypatch.setattr(Collection, "_connect", traced)
    return ran, work


def full_scans(db, statements) -> list[str]:
    """`statement: plan step` for each step that reads a whole table or index, or sorts what it read: SQLite's
    SCAN, with an index or without (SEARCH seeks), and its temporary B-trees."""
    found = []
    for sql in dict.fromkeys(statements):
        if not re.match(r"\s*(BEGIN|COMMIT|ROLLBACK|PRAGMA)\b", sql, re.I):
            found += [f"{sql}: {row[3]}" for row in db.execute(f"EXPLAIN QUERY PLAN {sql}")
                      if "SCAN" in row[3] or "TEMP B-TREE" in row[3]]
    return found


def _annotate(tmp_path, monkeypatch, prompts: int) -> tuple[Collection, list[str], int]:
    """Every path through next_pair and submit, on a collection of 3 * `prompts` pairs at overlap 3 where two people
    judged 40 pairs that now wait for a third: the collection, the statements run, and their work."""
    clock = Clock(monkeypatch)
    collection = _collection(tmp_path / str(prompts), prompts=prompts, responses=3, overlap=3)
    ann, bob, cy = (collection.add_annotator(name) for name in ("ann", "bob", "cy"))
    judge = collection.add_annotator("judge", kind="ai")
    collection.record_ai_verdicts(judge, [(p["pair_id"], "a", "") for p in collection.pairs()])
    for _ in range(40):
        for who in (ann, bob):
            task = collection.next_pair(who)
            collection.submit(who, task["pair_id"], task["left"]["id"], "left", str(uuid.uuid4()))
    with monkeypatch.context() as patch:
        statements, work = _traced(patch)
        task = collection.next_pair(ann)  # steps over the 40 pairs she judged in one seek
        assert len(statements) < 30, statements
        assert collection.next_pair(ann) == task  # hers again
        cy_task = collection.next_pair(cy)  # one of the 40: cy fills it
        ack = collection.submit(cy, cy_task["pair_id"], cy_task["left"]["id"], "tie", "cy-1")
        assert collection.submit(cy, cy_task["pair_id"], cy_task["left"]["id"], "tie", "cy-1")["repeated"]
        with pytest.raises(AlignError):
            collection.submit(cy, task["pair_id"], task["left"]["id"], "left", "cy-2")  # not cy's
        clock.now += HOLD_SECONDS + 1
        collection.next_pair(bob)  # ann's hold lapses
        collection.next_pair(ann)
        collection.submit(ann, task["pair_id"], task["left"]["id"], "left", "ann-late")
        collection.progress(ann)
    assert not ack["repeated"] and any("'lapsed'" in sql for sql in statements)
    return collection, statements, work[0]


def test_the_annotation_path_seeks_and_never_scans(tmp_path, monkeypatch):
    collection, statements, work = _annotate(tmp_path, monkeypatch, prompts=60)
    with sqlite3.connect(collection.path) as db:
        assert full_scans(db, statements) == []
        assert full_scans(db, ["SELECT COUNT(*) FROM pairs"])  # what a scan looks like, so the check can fail
    # SQLite calls some partial reads of an index SEARCH too; work that does not grow with the collection reads none
    assert _annotate(tmp_path, monkeypatch, prompts=300)[2] <= 1.1 * work
