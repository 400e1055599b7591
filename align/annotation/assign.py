"""Assignment: the pair an annotator gets next, and the counts kept so that choosing it, recording a verdict and
telling an annotator their progress read a few index entries, however large the collection (align.annotation.store
calls these inside its transactions; the rules are in its docstring).

The counts, each changed in the transaction that changes what it counts:

- `pairs.judged`, `pairs.judges`: how many humans judged the pair, and which (`,3,7,`: their ids, sorted);
- `pairs.load`: `judged` plus its holds, the assignments in state `held`;
- `assignments.state`: `held` (not judged, and counted in its pair's load), `lapsed` (not judged, issued more
  than HOLD_SECONDS ago: no longer counted, though its annotator still gets the pair back while there is room
  for them) or `judged`;
- `annotators.done`, `annotators.done_short`: the pairs they judged, and how many of those are still short of
  the overlap (fewer than `overlap` humans judged them);
- meta `short_pairs`: the pairs still short of the overlap.

Holds lapse lazily: `expire_holds`, at the start of every assignment, uncounts those issued before its cutoff
(an index on the issue time of the counted ones finds them). The next pair is an index seek over
(load, judges, shuffle): within one load, the pairs a group of people judged lie together, so the groups the
annotator is in are stepped over with one seek each, however many pairs they hold. `recount` computes every
count from the rows: for a file made before they were kept, and to check them.
"""

from __future__ import annotations


def expire_holds(db, cutoff: float) -> None:
    """Stop counting the holds issued before `cutoff` towards their pairs' load."""
    lapsed = db.execute("SELECT pair_id, annotator_id FROM assignments WHERE state = 'held' AND issued < ?",
                        (cutoff,)).fetchall()
    db.executemany("UPDATE assignments SET state = 'lapsed' WHERE pair_id = ? AND annotator_id = ?", lapsed)
    db.executemany("UPDATE pairs SET load = load - 1 WHERE id = ?", [(row["pair_id"],) for row in lapsed])


def in_hand(db, who_id: int):
    """The assignment `who_id` was given last and has not judged (pair_id, left_id, handle, state), or None."""
    return db.execute("SELECT pair_id, left_id, handle, state FROM assignments WHERE annotator_id = ? "
                      "AND state != 'judged' ORDER BY issued DESC LIMIT 1", (who_id,)).fetchone()


def others_on(db, assignment) -> int:
    """How many other people judged or hold the pair of `assignment`."""
    load = db.execute("SELECT load FROM pairs WHERE id = ?", (assignment["pair_id"],)).fetchone()["load"]
    return load - (assignment["state"] == "held")


def release(db, who_id: int) -> None:
    """Take back the assignments `who_id` has not judged."""
    released = db.execute("SELECT pair_id, state FROM assignments WHERE annotator_id = ? AND state != 'judged'",
                          (who_id,)).fetchall()
    for row in released:
        db.execute("DELETE FROM assignments WHERE pair_id = ? AND annotator_id = ?", (row["pair_id"], who_id))
        db.execute("UPDATE pairs SET load = load - ? WHERE id = ?", (row["state"] == "held", row["pair_id"]))


def pick(db, who_id: int, k: int):
    """The pair (id, a, b) that `who_id`, holding none, gets next: of those with a load under `k` that they have not
    judged, the fullest, then the one first in shuffle order; None where there is none."""
    me, best = f",{who_id},", None
    for group in _groups(db, k):
        if best is not None and group["load"] < best["load"]:
            break
        if me not in group["judges"]:
            first = db.execute("SELECT id, a, b, load, shuffle FROM pairs WHERE load = ? AND judges = ? "
                               "ORDER BY shuffle LIMIT 1", (group["load"], group["judges"])).fetchone()
            if best is None or first["shuffle"] < best["shuffle"]:
                best = first
    return best


def _groups(db, k: int):
    """The (load, judges) of the pairs with a load under `k`, fullest first, each once: a seek apiece (SQLite seeks a
    row-value bound such as (load, judges) < (?, ?) on `load` alone, and would read a whole load)."""
    below = "SELECT load, judges FROM pairs WHERE load < ? ORDER BY load DESC, judges DESC LIMIT 1"
    group = db.execute(below, (k,)).fetchone()
    while group is not None:
        yield group
        group = (db.execute("SELECT load, judges FROM pairs WHERE load = ? AND judges < ? ORDER BY judges DESC "
                            "LIMIT 1", (group["load"], group["judges"])).fetchone()
                 or db.execute(below, (group["load"],)).fetchone())


def hold(db, pair_id: int, who_id: int, left_id: int, handle: str, issued: float) -> None:
    db.execute("INSERT INTO assignments (pair_id, annotator_id, left_id, issued, handle, state) "
               "VALUES (?, ?, ?, ?, ?, 'held')", (pair_id, who_id, left_id, issued, handle))
    db.execute("UPDATE pairs SET load = load + 1 WHERE id = ?", (pair_id,))


def count_verdict(db, who_id: int, pair_id: int, k: int) -> None:
    """Count the verdict just stored for `who_id`'s open assignment of `pair_id`, at overlap `k`."""
    state = db.execute("SELECT state FROM assignments WHERE pair_id = ? AND annotator_id = ?",
                       (pair_id, who_id)).fetchone()["state"]
    db.execute("UPDATE assignments SET state = 'judged' WHERE pair_id = ? AND annotator_id = ?", (pair_id, who_id))
    pair = db.execute("SELECT judged, judges FROM pairs WHERE id = ?", (pair_id,)).fetchone()
    judged, judges = pair["judged"] + 1, _judges([*_ids(pair["judges"]), who_id])
    db.execute("UPDATE pairs SET judged = ?, judges = ?, load = load + ? WHERE id = ?",
               (judged, judges, state != "held", pair_id))  # a held pair's load counted this person already
    db.execute("UPDATE annotators SET done = done + 1, done_short = done_short + ? WHERE id = ?",
               (judged < k, who_id))
    if judged == k:  # the pair reached its overlap: short no longer, for whoever judged it before
        db.execute("UPDATE meta SET value = value - 1 WHERE key = 'short_pairs'")
        db.execute("UPDATE annotators SET done_short = done_short - 1 WHERE id IN "
                   "(SELECT annotator_id FROM verdicts WHERE pair_id = ? AND annotator_id != ?)", (pair_id, who_id))


def add_pairs(db, n: int) -> None:
    db.execute("UPDATE meta SET value = value + ? WHERE key = 'short_pairs'", (n,))


def progress(db, who_id: int) -> dict:
    """{done, total}: the pairs `who_id` judged, and those plus the ones short of the overlap they did not judge."""
    me = db.execute("SELECT done, done_short FROM annotators WHERE id = ?", (who_id,)).fetchone()
    short = int(db.execute("SELECT value FROM meta WHERE key = 'short_pairs'").fetchone()["value"])
    return {"done": me["done"], "total": me["done"] + short - me["done_short"]}


def recount_annotator(db, who_id: int, k: int) -> None:
    """`who_id`'s done and done_short from their verdicts, at overlap `k`."""
    db.execute("UPDATE annotators SET (done, done_short) = (SELECT COUNT(DISTINCT v.pair_id), "
               "  COUNT(DISTINCT CASE WHEN p.judged < :k THEN v.pair_id END) FROM verdicts v "
               "  JOIN pairs p ON p.id = v.pair_id WHERE v.annotator_id = :me) WHERE id = :me", {"me": who_id, "k": k})


def recount_short(db, k: int) -> None:
    """The counts that depend on the overlap, at overlap `k`: the pairs short of it, and every annotator's."""
    short = db.execute("SELECT COUNT(*) FROM pairs WHERE judged < ?", (k,)).fetchone()[0]
    db.execute("INSERT INTO meta VALUES ('short_pairs', ?) ON CONFLICT (key) DO UPDATE SET value = excluded.value",
               (str(short),))
    db.execute("UPDATE annotators SET done_short = 0")
    db.executemany("UPDATE annotators SET done_short = ? WHERE id = ?", db.execute(
        "SELECT COUNT(DISTINCT v.pair_id), v.annotator_id FROM verdicts v JOIN pairs p ON p.id = v.pair_id "
        "WHERE p.judged < ? GROUP BY v.annotator_id", (k,)).fetchall())


def recount(db, k: int, cutoff: float) -> None:
    """Every count from the rows, at overlap `k`, with holds issued before `cutoff` lapsed."""
    db.execute("UPDATE assignments SET state = CASE "
               "WHEN EXISTS (SELECT 1 FROM verdicts v WHERE v.pair_id = assignments.pair_id "
               "  AND v.annotator_id = assignments.annotator_id) THEN 'judged' "
               "WHEN issued >= ? AND annotator_id IN (SELECT id FROM annotators WHERE kind = 'human') THEN 'held' "
               "ELSE 'lapsed' END", (cutoff,))
    judges: dict[int, list[int]] = {}
    for row in db.execute("SELECT DISTINCT v.pair_id, v.annotator_id FROM verdicts v JOIN annotators n "
                          "ON n.id = v.annotator_id WHERE n.kind = 'human'"):
        judges.setdefault(row["pair_id"], []).append(row["annotator_id"])
    holds = dict(db.execute("SELECT pair_id, COUNT(*) FROM assignments WHERE state = 'held' GROUP BY pair_id"))
    db.execute("UPDATE pairs SET judged = 0, judges = '', load = 0")
    db.executemany("UPDATE pairs SET judged = ?, judges = ?, load = ? WHERE id = ?",
                   [(len(ids := judges.get(pair_id, [])), _judges(ids), len(ids) + holds.get(pair_id, 0), pair_id)
                    for pair_id in judges.keys() | holds.keys()])
    db.execute("UPDATE annotators SET done = 0")
    db.executemany("UPDATE annotators SET done = ? WHERE id = ?", db.execute(
        "SELECT COUNT(DISTINCT pair_id), annotator_id FROM verdicts GROUP BY annotator_id").fetchall())
    recount_short(db, k)


def _ids(judges: str) -> list[int]:
    return [int(i) for i in judges.strip(",").split(",") if i]


def _judges(ids: list[int]) -> str:
    """The `judges` of a pair that the annotators `ids` judged: one spelling per set, so that its pairs lie together."""
    return "".join(f",{i}" for i in sorted(ids)) + "," if ids else ""
