"""A collection: prompts, candidate responses, the pairs people compare, annotators and their verdicts,
in one SQLite file.

Durability is the point of the design. The file is in WAL mode with `synchronous=FULL`, every write is
one transaction, and a verdict is acknowledged only after its transaction commits, so a server killed at
any moment keeps every verdict it acknowledged. Submissions are idempotent: the client names each one
(`submission`, a UUID it makes once per click), and the same submission sent again, after a lost reply
or a restart, returns the first one's verdict instead of adding another. The file is made readable by
its owner only (it holds every token), before SQLite first opens it; its -wal and -shm files follow it.

Assignment: each pair is shown to `overlap` human annotators. An annotator asking for work gets the pair
they were last given and have not judged, or else one that fewer than `overlap` people have judged or
hold (a hold lapses after `HOLD_SECONDS`), fullest first, so that pairs reach their overlap before new
ones start. Left/right order is drawn at random when a pair is assigned. A human verdict is accepted only
for an open assignment of its annotator (assigned, not judged yet), with the side the assignment put on
the left, so nobody can vote on pairs they were not given, nor twice on one. Each assignment has a random
`handle`: the page names its task by it and never sees an id (ids follow the order responses were added
in, and so tell the models apart). AI annotators (`align collect judge`) judge every pair and take no
part in assignment.

Scale: assigning a pair, recording a verdict and the progress they return read a few index entries whatever
the size of the collection, from counts kept in the same transactions (align.annotation.assign); changing the
overlap recounts what depends on it. A file made before the counts were kept gets them when it is opened.
"""

from __future__ import annotations

import json
import random
import secrets
import sqlite3
import threading
import time
import weakref
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

from align.annotation import assign
from align.annotation.schema import SCHEMA, create_private, is_current, make_current, new_handle
from align.errors import AlignError

CHOICES = ("a", "b", "tie", "both_bad")  # stored relative to the pair's (a, b), whatever side showed it
SHOWN_CHOICES = ("left", "right", "tie", "both_bad")  # what the page sends
HOLD_SECONDS = 15 * 60  # an assigned, unjudged pair stops counting towards its overlap after this

@dataclass(frozen=True)
class Annotator:
    id: int
    name: str
    token: str
    kind: str  # "human" | "ai"


@dataclass(frozen=True)
class Candidates:
    """One prompt and the responses to compare on it, each with the model (or source) that wrote it."""

    prompt: list[dict]  # chat messages
    responses: list[tuple[str, str]]  # (text, model)
    rule: dict | None = None  # the task rule, where the prompt has one (rule reward cards judge with it)


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def _hold_cutoff() -> float:
    """Holds issued before this have lapsed."""
    return time.time() - HOLD_SECONDS


class Collection:
    """A collection file. Each method opens its own connection, so one object serves many threads; a process that
    serves annotators uses one object, whose writers take turns and which keeps the file open between calls."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self._attached: sqlite3.Connection | None = None
        self._attaching, self._writing = threading.Lock(), threading.Lock()

    @classmethod
    def create(cls, path: str | Path) -> Collection:
        """The collection at `path`, made (with its admin token) where no file is there yet."""
        collection = cls(path)
        collection.path.parent.mkdir(parents=True, exist_ok=True)
        create_private(collection.path)
        with collection.reading() as db:
            db.executescript(SCHEMA)  # idempotent; executescript commits by itself
        with collection.transaction() as db:
            db.execute("INSERT OR IGNORE INTO meta VALUES ('admin_token', ?), ('overlap', '1'), ('created', ?)",
                       (secrets.token_urlsafe(16), _now()))
            make_current(db, collection.overlap_in(db), _hold_cutoff())
        return collection

    @classmethod
    def open(cls, path: str | Path) -> Collection:
        """An existing collection; an AlignError that says how to make one where `path` is none."""
        path = Path(path)
        if not path.is_file():
            raise AlignError(f"{path}: no collection there; make one with `align collect generate {path} ...` "
                             f"or `align collect import {path} FILE`")
        collection = cls(path)
        try:
            with collection.reading() as db:
                db.execute("SELECT value FROM meta WHERE key = 'admin_token'").fetchone()
                outdated = not is_current(db)
        except sqlite3.DatabaseError as err:
            raise AlignError(f"{path}: not a collection file ({err})") from None
        if outdated:  # write only where needed: reading a collection must not need write access
            with collection.transaction() as db:
                make_current(db, collection.overlap_in(db), _hold_cutoff())
        return collection

    def _connect(self) -> sqlite3.Connection:
        db = sqlite3.connect(self.path, timeout=30, isolation_level=None, check_same_thread=False)
        db.row_factory = sqlite3.Row
        db.execute("PRAGMA journal_mode=WAL")
        db.execute("PRAGMA synchronous=FULL")  # a commit survives power loss, not only a killed process
        db.execute("PRAGMA foreign_keys=ON")
        self._stay_attached()
        return db

    def _stay_attached(self) -> None:
        """Keep a connection open while this object lives. The last connection to a WAL file to close copies the
        whole log into the file, with fsyncs of its own, and each call's connection would be the last one: a write
        would cost several fsyncs instead of one. Checkpoints then come as SQLite schedules them (every 1000 pages of
        log) and when this object goes; a commit is as durable either way."""
        with self._attaching:
            if self._attached is None:
                attached = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
                attached.execute("PRAGMA schema_version").fetchall()  # a read, done: maps the log's index and ends
                weakref.finalize(self, attached.close)
                self._attached = attached

    @contextmanager
    def transaction(self):
        """A write transaction (BEGIN IMMEDIATE: writers queue instead of failing midway), committed on exit. The
        writers of this object take turns at a lock before that: SQLite lets one write at a time anyway, and one that
        finds the file locked sleeps in growing steps (up to 100 ms) before it looks again, so under load the waits
        would be the sleeps, not the writes. Writers in other processes queue with SQLite's busy timeout."""
        db = self._connect()
        with self._writing:
            try:
                db.execute("BEGIN IMMEDIATE")
                yield db
                db.execute("COMMIT")
            except BaseException:
                if db.in_transaction:
                    db.execute("ROLLBACK")
                raise
            finally:
                db.close()

    @contextmanager
    def reading(self):
        db = self._connect()
        try:
            yield db
        finally:
            db.close()

    # --- settings ---------------------------------------------------------------------------------------

    def meta(self, key: str) -> str | None:
        with self.reading() as db:
            row = db.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
        return row["value"] if row else None

    @property
    def admin_token(self) -> str:
        return self.meta("admin_token")

    @property
    def overlap(self) -> int:
        return int(self.meta("overlap"))

    def set_overlap(self, k: int) -> None:
        if k < 1:
            raise AlignError(f"overlap must be >= 1 (annotators per pair), got {k}")
        with self.transaction() as db:
            db.execute("UPDATE meta SET value = ? WHERE key = 'overlap'", (str(k),))
            assign.recount_short(db, k)

    # --- content ----------------------------------------------------------------------------------------

    def add(self, candidates: list[Candidates], pairs: str = "all", seed: int = 0) -> dict:
        """Store prompts and responses (a text already stored for its prompt is kept once) and the pairs to
        compare: every two different responses to a prompt (`all`), only two by different models
        (`across`), or only two of the same `Candidates` (`within`: pairs given as such, as when
        importing). Returns how many of each were new."""
        if pairs not in ("all", "across", "within"):
            raise AlignError(f"pairs must be 'all', 'across' or 'within', got {pairs!r}")
        rng = random.Random(seed)
        new = {"prompts": 0, "responses": 0, "pairs": 0}
        with self.transaction() as db:
            for item in candidates:
                messages = json.dumps(item.prompt, ensure_ascii=False)
                cur = db.execute("INSERT OR IGNORE INTO prompts (messages, rule) VALUES (?, ?)",
                                 (messages, json.dumps(item.rule or {})))
                new["prompts"] += cur.rowcount
                prompt_id = db.execute("SELECT id FROM prompts WHERE messages = ?", (messages,)).fetchone()["id"]
                for text, model in item.responses:
                    cur = db.execute("INSERT OR IGNORE INTO responses (prompt_id, text, model) VALUES (?, ?, ?)",
                                     (prompt_id, text, model))
                    new["responses"] += cur.rowcount
                stored = db.execute("SELECT id, model, text FROM responses WHERE prompt_id = ? ORDER BY id",
                                    (prompt_id,)).fetchall()
                if pairs == "within":
                    texts = {text for text, _ in item.responses}
                    stored = [row for row in stored if row["text"] in texts]
                for i, first in enumerate(stored):
                    for second in stored[i + 1:]:
                        if pairs == "across" and first["model"] == second["model"]:
                            continue
                        cur = db.execute("INSERT OR IGNORE INTO pairs (prompt_id, a, b, shuffle) VALUES (?, ?, ?, ?)",
                                         (prompt_id, first["id"], second["id"], rng.randrange(1 << 30)))
                        new["pairs"] += cur.rowcount
            assign.add_pairs(db, new["pairs"])
        return new

    # --- annotators -------------------------------------------------------------------------------------

    def add_annotator(self, name: str, kind: str = "human") -> Annotator:
        """The annotator called `name`, made with a fresh token where there is none yet."""
        name = name.strip()
        if not name or kind not in ("human", "ai"):
            raise AlignError(f"an annotator needs a name and kind 'human' or 'ai', got {name!r} ({kind})")
        with self.transaction() as db:
            db.execute("INSERT OR IGNORE INTO annotators (name, token, kind, created) VALUES (?, ?, ?, ?)",
                       (name, secrets.token_urlsafe(12), kind, _now()))
            row = db.execute("SELECT * FROM annotators WHERE name = ?", (name,)).fetchone()
        if row["kind"] != kind:
            raise AlignError(f"annotator '{name}' exists already as a {row['kind']} annotator")
        return Annotator(row["id"], row["name"], row["token"], row["kind"])

    def annotators(self) -> list[Annotator]:
        with self.reading() as db:
            rows = db.execute("SELECT * FROM annotators ORDER BY id").fetchall()
        return [Annotator(r["id"], r["name"], r["token"], r["kind"]) for r in rows]

    def annotator(self, token: str) -> Annotator | None:
        with self.reading() as db:
            row = db.execute("SELECT * FROM annotators WHERE token = ?", (token,)).fetchone()
        return Annotator(row["id"], row["name"], row["token"], row["kind"]) if row else None

    # --- annotation -------------------------------------------------------------------------------------

    def next_pair(self, who: Annotator) -> dict | None:
        """The pair `who` should judge now, shown in the order recorded for them, or None when nothing is
        left for them: `{handle, pair_id, prompt, left: {id, text}, right: {id, text}, progress}`."""
        if who.kind != "human":
            raise AlignError(f"{who.name} is an AI annotator: AI annotators take no part in assignment, "
                             "they judge every pair through `align collect judge`")
        with self.transaction() as db:
            k = self.overlap_in(db)
            assign.expire_holds(db, _hold_cutoff())
            held = assign.in_hand(db, who.id)
            if held is not None and assign.others_on(db, held) < k:
                pair_id, left_id, handle = held["pair_id"], held["left_id"], held["handle"]
            else:
                assign.release(db, who.id)  # where others filled it meanwhile: let it go
                pair = assign.pick(db, who.id, k)
                if pair is None:
                    return None
                pair_id, left_id, handle = pair["id"], random.choice((pair["a"], pair["b"])), new_handle()
                assign.hold(db, pair_id, who.id, left_id, handle, time.time())
            return {"handle": handle} | self._shown(db, pair_id, left_id) | {"progress": assign.progress(db, who.id)}

    @staticmethod
    def overlap_in(db) -> int:
        return int(db.execute("SELECT value FROM meta WHERE key = 'overlap'").fetchone()["value"])

    @staticmethod
    def _shown(db, pair_id: int, left_id: int) -> dict:
        pair = db.execute("SELECT * FROM pairs WHERE id = ?", (pair_id,)).fetchone()
        right_id = pair["b"] if left_id == pair["a"] else pair["a"]
        text = {r["id"]: r["text"] for r in db.execute("SELECT id, text FROM responses WHERE id IN (?, ?)",
                                                       (left_id, right_id))}
        prompt = db.execute("SELECT messages FROM prompts WHERE id = ?", (pair["prompt_id"],)).fetchone()
        return {"pair_id": pair_id, "prompt": json.loads(prompt["messages"]),
                "left": {"id": left_id, "text": text[left_id]}, "right": {"id": right_id, "text": text[right_id]}}

    def progress(self, who: Annotator) -> dict:
        """{done, total}: pairs `who` judged, and those plus the ones still open to them."""
        with self.reading() as db:
            return assign.progress(db, who.id)

    def assigned(self, who: Annotator, handle: str) -> tuple[int, int] | None:
        """(pair_id, left_id) of `who`'s assignment called `handle`, judged or not; None where `who` has none."""
        with self.reading() as db:
            row = db.execute("SELECT pair_id, left_id FROM assignments WHERE handle = ? AND annotator_id = ?",
                             (handle, who.id)).fetchone()
        return (row["pair_id"], row["left_id"]) if row else None

    def submit(self, who: Annotator, pair_id: int, left_id: int, choice: str, submission: str,
               rationale: str = "", seconds: float | None = None) -> dict:
        """Record `who`'s verdict on a pair assigned to them and not judged by them yet, as the assignment
        showed it (`left_id` on the left; `choice` one of SHOWN_CHOICES). Idempotent in `submission`.
        Returns `{verdict_id, repeated, progress}`. Messages name no ids: the page must not learn them."""
        if choice not in SHOWN_CHOICES:
            raise AlignError(f"choice must be one of {', '.join(SHOWN_CHOICES)}, got {choice!r}")
        if not submission or len(submission) > 100:
            raise AlignError("a submission needs an id (1-100 characters) that it keeps when sent again")
        with self.transaction() as db:
            k = self.overlap_in(db)
            seen = db.execute("SELECT * FROM verdicts WHERE submission = ?", (submission,)).fetchone()
            if seen is not None:
                if (seen["pair_id"], seen["annotator_id"]) != (pair_id, who.id):
                    raise AlignError(f"submission {submission!r} was used for another pair or annotator")
                return {"verdict_id": seen["id"], "repeated": True, "progress": assign.progress(db, who.id)}
            pair = _open_assignment(db, who, pair_id, left_id)
            cur = db.execute(
                "INSERT INTO verdicts (pair_id, annotator_id, choice, left_id, rationale, seconds, submission, "
                "created) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                (pair_id, who.id, _stored_choice(choice, left_id, pair), left_id, rationale.strip()[:2000],
                 seconds, submission, _now()))
            assign.count_verdict(db, who.id, pair_id, k)
            return {"verdict_id": cur.lastrowid, "repeated": False, "progress": assign.progress(db, who.id)}

    def record_ai_verdicts(self, who: Annotator, verdicts: list[tuple[int, str, str]]) -> int:
        """(pair_id, choice in CHOICES, rationale) from an AI annotator, replacing its earlier ones."""
        if who.kind != "ai":
            raise AlignError(f"{who.name} is a human annotator: only an AI annotator's verdicts are replaced at once")
        with self.transaction() as db:
            db.execute("DELETE FROM verdicts WHERE annotator_id = ?", (who.id,))
            for pair_id, choice, rationale in verdicts:
                a = db.execute("SELECT a FROM pairs WHERE id = ?", (pair_id,)).fetchone()["a"]
                db.execute("INSERT INTO verdicts (pair_id, annotator_id, choice, left_id, rationale, submission, "
                           "created) VALUES (?, ?, ?, ?, ?, ?, ?)",
                           (pair_id, who.id, choice, a, rationale, f"ai:{who.id}:{pair_id}", _now()))
            assign.recount_annotator(db, who.id, self.overlap_in(db))
        return len(verdicts)

    # --- reading ----------------------------------------------------------------------------------------

    def pairs(self) -> list[dict]:
        """Every pair: {pair_id, prompt_id, prompt, rule, a: {id, text, model}, b: {...}}."""
        with self.reading() as db:
            rows = db.execute(
                "SELECT p.id, p.prompt_id, q.messages, q.rule, ra.id AS a_id, ra.text AS a_text, ra.model AS a_model, "
                "rb.id AS b_id, rb.text AS b_text, rb.model AS b_model FROM pairs p "
                "JOIN prompts q ON q.id = p.prompt_id JOIN responses ra ON ra.id = p.a "
                "JOIN responses rb ON rb.id = p.b ORDER BY p.id").fetchall()
        return [{"pair_id": r["id"], "prompt_id": r["prompt_id"], "prompt": json.loads(r["messages"]),
                 "rule": json.loads(r["rule"]),
                 "a": {"id": r["a_id"], "text": r["a_text"], "model": r["a_model"]},
                 "b": {"id": r["b_id"], "text": r["b_text"], "model": r["b_model"]}} for r in rows]

    def verdicts(self) -> list[dict]:
        """Every annotator's current verdict per pair: {pair_id, annotator, kind, choice, left_id,
        rationale, seconds, created}, in the order they were given."""
        with self.reading() as db:
            rows = db.execute(
                "SELECT v.pair_id, n.name, n.kind, v.choice, v.left_id, v.rationale, v.seconds, v.created "
                "FROM current_verdicts v JOIN annotators n ON n.id = v.annotator_id ORDER BY v.id").fetchall()
        return [{"pair_id": r["pair_id"], "annotator": r["name"], "kind": r["kind"], "choice": r["choice"],
                 "left_id": r["left_id"], "rationale": r["rationale"], "seconds": r["seconds"],
                 "created": r["created"]} for r in rows]

    def complete_pairs(self) -> set[int]:
        """The pairs that have reached their overlap: `overlap` people judged them (AI judges, which take every
        pair, do not count)."""
        with self.reading() as db:  # `judged`: the humans who judged the pair, kept by align.annotation.assign
            rows = db.execute("SELECT id AS pair_id FROM pairs WHERE judged >= ?", (self.overlap_in(db),)).fetchall()
        return {row["pair_id"] for row in rows}

    def counts(self) -> dict:
        with self.reading() as db:
            return {table: db.execute(f"SELECT COUNT(*) FROM {table}").fetchone()[0]
                    for table in ("prompts", "responses", "pairs", "annotators", "current_verdicts")}


def _open_assignment(db, who: Annotator, pair_id: int, left_id: int):
    """The pair (a, b) that `who` holds an open assignment for with `left_id` on the left; an AlignError where
    there is no such assignment or `who` judged it already."""
    pair = db.execute("SELECT p.a, p.b FROM assignments s JOIN pairs p ON p.id = s.pair_id "
                      "WHERE s.pair_id = ? AND s.annotator_id = ? AND s.left_id = ?",
                      (pair_id, who.id, left_id)).fetchone()
    if pair is None:
        raise AlignError(f"this pair, with this side on the left, is not assigned to {who.name}")
    judged = db.execute("SELECT 1 FROM verdicts WHERE pair_id = ? AND annotator_id = ?", (pair_id, who.id))
    if judged.fetchone():
        raise AlignError(f"{who.name} has judged this pair already")
    return pair


def _stored_choice(shown: str, left_id: int, pair) -> str:
    """A choice as shown on the page (left/right) in the pair's own terms (a/b)."""
    if shown in ("tie", "both_bad"):
        return shown
    picked_left = shown == "left"
    return "a" if (left_id == pair["a"]) == picked_left else "b"
