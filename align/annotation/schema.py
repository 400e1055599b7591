"""The collection file's tables, and what makes an older file current: created private to its owner, given
assignment handles where it was made before assignments had them, and the counts that assignment keeps
(align.annotation.assign) where it was made before they were kept (align.annotation.store uses it)."""

from __future__ import annotations

import os
import secrets
from pathlib import Path

from align.annotation.assign import recount

SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS prompts (
    id INTEGER PRIMARY KEY, messages TEXT NOT NULL UNIQUE, rule TEXT NOT NULL DEFAULT '{}');
CREATE TABLE IF NOT EXISTS responses (
    id INTEGER PRIMARY KEY, prompt_id INTEGER NOT NULL REFERENCES prompts(id), text TEXT NOT NULL,
    model TEXT NOT NULL, UNIQUE (prompt_id, text));
CREATE TABLE IF NOT EXISTS pairs (
    id INTEGER PRIMARY KEY, prompt_id INTEGER NOT NULL REFERENCES prompts(id),
    a INTEGER NOT NULL REFERENCES responses(id), b INTEGER NOT NULL REFERENCES responses(id),
    shuffle INTEGER NOT NULL, UNIQUE (a, b), CHECK (a < b));
CREATE TABLE IF NOT EXISTS annotators (
    id INTEGER PRIMARY KEY, name TEXT NOT NULL UNIQUE, token TEXT NOT NULL UNIQUE,
    kind TEXT NOT NULL CHECK (kind IN ('human', 'ai')), created TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS assignments (
    pair_id INTEGER NOT NULL REFERENCES pairs(id), annotator_id INTEGER NOT NULL REFERENCES annotators(id),
    left_id INTEGER NOT NULL REFERENCES responses(id), issued REAL NOT NULL, handle TEXT,
    PRIMARY KEY (pair_id, annotator_id));
CREATE TABLE IF NOT EXISTS verdicts (
    id INTEGER PRIMARY KEY, pair_id INTEGER NOT NULL REFERENCES pairs(id),
    annotator_id INTEGER NOT NULL REFERENCES annotators(id),
    choice TEXT NOT NULL CHECK (choice IN ('a', 'b', 'tie', 'both_bad')),
    left_id INTEGER NOT NULL REFERENCES responses(id), rationale TEXT NOT NULL DEFAULT '',
    seconds REAL, submission TEXT NOT NULL UNIQUE, created TEXT NOT NULL);
CREATE INDEX IF NOT EXISTS verdicts_by_pair ON verdicts (pair_id, annotator_id);
CREATE VIEW IF NOT EXISTS current_verdicts AS
    SELECT v.* FROM verdicts v WHERE v.id = (
        SELECT MAX(w.id) FROM verdicts w WHERE w.pair_id = v.pair_id AND w.annotator_id = v.annotator_id);
"""


def create_private(path: Path) -> None:
    """An empty file that only its owner may read or write, made before SQLite opens it (SQLite gives the
    -wal and -shm files the database file's permissions). An existing file keeps the ones it has."""
    try:
        os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
    except FileExistsError:
        pass


def new_handle() -> str:
    return secrets.token_urlsafe(16)


# Columns added since SCHEMA, which keeps the tables as files had them before: the counts of align.annotation.assign.
COUNTED = {
    "pairs": ("judged INTEGER NOT NULL DEFAULT 0", "judges TEXT NOT NULL DEFAULT ''",
              "load INTEGER NOT NULL DEFAULT 0"),
    "assignments": ("state TEXT NOT NULL DEFAULT 'held' CHECK (state IN ('held', 'lapsed', 'judged'))",),
    "annotators": ("done INTEGER NOT NULL DEFAULT 0", "done_short INTEGER NOT NULL DEFAULT 0"),
}
COUNTED_INDEXES = """
CREATE INDEX IF NOT EXISTS pairs_by_load ON pairs (load, judges, shuffle);
CREATE INDEX IF NOT EXISTS assignments_open ON assignments (annotator_id, issued) WHERE state != 'judged';
CREATE INDEX IF NOT EXISTS assignments_held ON assignments (issued) WHERE state = 'held';
"""


def is_current(db) -> bool:
    return has_handles(db) and _counted(db)


def make_current(db, k: int, cutoff: float) -> None:
    """Bring a file made by an earlier version up to date, inside the caller's transaction: handles, then the
    counts, computed once from the rows (at overlap `k`, holds issued before `cutoff` lapsed) and kept from then on.
    A file that is current already is left as it is."""
    add_handles(db)
    if not _counted(db):
        for table, columns in COUNTED.items():
            for column in columns:
                db.execute(f"ALTER TABLE {table} ADD COLUMN {column}")
        recount(db, k, cutoff)
    for statement in filter(str.strip, COUNTED_INDEXES.split(";")):
        db.execute(statement)


def _counted(db) -> bool:
    return db.execute("SELECT 1 FROM meta WHERE key = 'short_pairs'").fetchone() is not None


def has_handles(db) -> bool:
    return "handle" in {row["name"] for row in db.execute("PRAGMA table_info(assignments)")}


def add_handles(db) -> None:
    """Index assignments by handle, first giving each one a handle where the file was made before they had
    them (holds in progress then keep their pair and sides)."""
    if not has_handles(db):
        db.execute("ALTER TABLE assignments ADD COLUMN handle TEXT")
        for row in db.execute("SELECT rowid FROM assignments").fetchall():
            db.execute("UPDATE assignments SET handle = ? WHERE rowid = ?", (new_handle(), row["rowid"]))
    db.execute("CREATE UNIQUE INDEX IF NOT EXISTS assignments_by_handle ON assignments (handle)")
