"""Speed of the collection store's annotation path (`next_pair`, `submit`) at campaign size, against the store as it
was before it kept counts (`--baseline-rev`, loaded from git history).

Each store gets its own collection file, built through its own `Collection.create` and `add` (one transaction) from
the same seeded prompts: 4 responses of ~60 words to each, every 2 of them a pair (6 per prompt, `--pairs` rounded
up to a multiple of 6), overlap `--overlap`, `--annotators` human annotators, WAL with `synchronous=FULL` as the
store sets it. Two runs on each, every annotator a thread that asks for a pair and sends a verdict on it in a loop:

- paced: each annotator reads for a while (`--pause`, uniform, from a seeded RNG per annotator) between receiving a
  pair and submitting its verdict, for `--seconds`: the latency of `next` and `submit` (p50, p95, max) that a
  person waits, with the other annotators' calls arriving meanwhile;
- saturation: no pauses, for `--saturation-seconds`: next+submit per second, every thread calling back to back.

The store before at 100k pairs takes seconds a call and holds the write lock meanwhile, so its runs get
`--baseline-seconds` each; calls in flight at the end finish (or fail after SQLite's 30 s busy timeout, counted as
errors) and the wall time and operations say what it managed. Last, the new store opens the old store's file,
with its assignments and verdicts, and upgrades it: that time is printed too. Timings include the fsync of every
commit, so they depend on the disk under `--dir` (default: a temporary folder).

    .venv/bin/python scripts/bench_collect.py                                  # 100k pairs: about 3 minutes
    .venv/bin/python scripts/bench_collect.py --pairs 2000 --seconds 3 --saturation-seconds 1 --baseline-seconds 1
"""

from __future__ import annotations

import argparse
import importlib
import json
import math
import platform
import random
import re
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path

from align.annotation import store as current

ROOT = Path(__file__).resolve().parents[1]
WORDS = ("the a model answer because therefore which however result value step first then so it is not "
         "we can see that this gives more less than").split()
TARGET_MS = 20  # the p95 for next and submit, paced


def baseline_store(rev: str, work: Path):
    """align/collect/store.py as it was at `rev`, with the schema module it imports, as a package of its own."""
    name = "collect_at_" + re.sub(r"\W", "_", rev) + f"_{uuid.uuid4().hex[:8]}"
    package = work / name
    package.mkdir()
    (package / "__init__.py").write_text("")
    for module in ("schema", "store"):
        shown = subprocess.run(["git", "show", f"{rev}:align/collect/{module}.py"], cwd=ROOT, capture_output=True,
                               text=True)
        if shown.returncode != 0:
            raise SystemExit(f"bench_collect: git show {rev}:align/collect/{module}.py: {shown.stderr.strip()}")
        (package / f"{module}.py").write_text(shown.stdout.replace("align.collect.schema", f"{name}.schema"))
    sys.path.insert(0, str(work))
    try:
        return importlib.import_module(f"{name}.store")
    finally:
        sys.path.remove(str(work))


def candidates(module, pairs: int, seed: int) -> list:
    """Prompts with 4 responses each, 6 pairs a prompt, enough for `pairs`, as `module`'s Candidates."""
    rng = random.Random(seed)

    def text() -> str:
        return " ".join(rng.choice(WORDS) for _ in range(60))

    return [module.Candidates([{"role": "user", "content": f"prompt {i}: {text()}"}],
                              [(f"{i}.{j} {text()}", f"model-{j % 2}") for j in range(4)])
            for i in range(math.ceil(pairs / 6))]


def build(module, path: Path, args) -> tuple:
    """A collection of `module`'s store at `path`, its annotators, and the seconds it took."""
    started = time.perf_counter()
    collection = module.Collection.create(path)
    added = collection.add(candidates(module, args.pairs, args.seed), seed=args.seed)
    collection.set_overlap(args.overlap)
    people = [collection.add_annotator(f"annotator-{n}") for n in range(args.annotators)]
    return collection, people, added["pairs"], time.perf_counter() - started


def run(collection, people, seconds: float, pause: tuple[float, float] | None, seed: int, label: str,
        progress) -> dict:
    """Every annotator a thread asking for pairs and judging them until `seconds` have passed, pausing `pause`
    seconds between the two where given; what they managed and how long each call took."""
    deadline = time.monotonic() + seconds
    lock = threading.Lock()
    calls = {"next": [], "submit": []}
    done, errors, crashed = [0], [], []

    def annotate(n: int, who) -> None:
        rng = random.Random(seed * 1000 + n)
        if pause:  # people arrive over the first pause, not all in the same millisecond
            time.sleep(rng.uniform(0, pause[1]))
        try:
            while time.monotonic() < deadline:
                try:
                    start = time.perf_counter()
                    task = collection.next_pair(who)
                    with lock:
                        calls["next"].append(time.perf_counter() - start)
                    if task is None:
                        return
                    if pause:
                        time.sleep(rng.uniform(*pause))
                    start = time.perf_counter()
                    collection.submit(who, task["pair_id"], task["left"]["id"], rng.choice(current.SHOWN_CHOICES),
                                      f"{label}-{n}-{uuid.uuid4()}")
                    with lock:
                        calls["submit"].append(time.perf_counter() - start)
                        done[0] += 1
                except sqlite3.OperationalError as err:  # the write lock waited for past SQLite's busy timeout
                    with lock:
                        errors.append(str(err))
        except BaseException as err:  # the main thread fails the run with it
            crashed.append(err)

    threads = [threading.Thread(target=annotate, args=(n, who), daemon=True) for n, who in enumerate(people)]
    bar = progress.add_task(label, total=seconds)
    started = time.monotonic()
    for thread in threads:
        thread.start()
    while any(thread.is_alive() for thread in threads):
        progress.update(bar, completed=min(time.monotonic() - started, seconds),
                        description=f"{label}: {done[0]} next+submit")
        time.sleep(0.2)
    wall = time.monotonic() - started
    progress.update(bar, completed=seconds, description=f"{label}: {done[0]} next+submit")
    if crashed:
        raise crashed[0]
    return {"label": label, "seconds": seconds, "wall_s": wall, "done": done[0], "errors": len(errors),
            "error_kinds": sorted(set(errors)), "per_s": done[0] / wall,
            **{name: spread(values) for name, values in calls.items()}}


def spread(seconds: list[float]) -> dict:
    """n, p50, p95 and max in milliseconds (nearest rank; None where there were no calls)."""
    ms = sorted(s * 1000 for s in seconds)

    def rank(q: float) -> float | None:
        return ms[math.ceil(q * len(ms)) - 1] if ms else None

    return {"n": len(ms), "p50": rank(0.5), "p95": rank(0.95), "max": rank(1.0)}


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f}"


def bench(module, work: Path, args, name: str, seconds: float, saturation_seconds: float, progress) -> dict:
    collection, people, pairs, build_s = build(module, work / f"{name}.sqlite", args)
    paced = run(collection, people, seconds, tuple(args.pause), args.seed, f"{name}, paced", progress)
    saturated = run(collection, people, saturation_seconds, None, args.seed, f"{name}, saturation", progress)
    return {"path": str(collection.path), "pairs": pairs, "build_s": build_s, "paced": paced, "saturation": saturated}


def machine() -> str:
    cpuinfo = Path("/proc/cpuinfo")
    names = re.findall(r"model name\s*:\s*(.+)", cpuinfo.read_text()) if cpuinfo.exists() else []
    return (f"{names[0] if names else platform.processor() or platform.machine()}, "
            f"{len(names) or 'unknown'} cores; Python {platform.python_version()}, SQLite {sqlite3.sqlite_version}")


def report(args, results: dict, upgrade_s: float, verdicts: int) -> dict:
    from rich.console import Console
    from rich.table import Column, Table

    console = Console()
    if not console.is_terminal:
        console.width = 160  # piped into a file or a test: room for the whole table
    right = dict(justify="right")
    table = Table("store", "run", Column("wall s", **right), Column("next+submit", **right),
                  Column("errors", **right), Column("next p50", **right), Column("p95", **right),
                  Column("max", **right), Column("submit p50", **right), Column("p95", **right),
                  Column("max", **right), Column("per s", **right),
                  title=f"{results['new']['pairs']:,} pairs, {args.annotators} annotators, overlap {args.overlap}, "
                        f"synchronous=FULL; latencies in ms; paced: {args.pause[0]:g}-{args.pause[1]:g} s between "
                        "a pair and its verdict")
    for name, result in results.items():
        for run_name in ("paced", "saturation"):
            r = result[run_name]
            latencies = (_ms(r[call][q]) for call in ("next", "submit") for q in ("p50", "p95", "max"))
            table.add_row(name, f"{run_name} ({r['seconds']:g} s)", f"{r['wall_s']:.1f}", f"{r['done']:,}",
                          str(r["errors"]), *latencies, f"{r['per_s']:.1f}")
    console.print(table)
    new, old = results["new"], results["before"]
    ratio = new["saturation"]["per_s"] / old["saturation"]["per_s"] if old["saturation"]["per_s"] else math.inf
    met = all(new["paced"][call]["p95"] is not None and new["paced"][call]["p95"] <= TARGET_MS
              for call in ("next", "submit"))
    console.print(f"saturation: {new['saturation']['per_s']:.1f} next+submit/s against {old['saturation']['per_s']:.2f}"
                  f"/s before ({args.baseline_rev}): {ratio:,.0f}x")
    console.print(f"paced p95 within {TARGET_MS} ms for next and submit: {'yes' if met else 'NO'}")
    for error in sorted({e for r in results.values() for run_ in ("paced", "saturation") for e in
                         r[run_]["error_kinds"]}):
        console.print(f"[yellow]error met:[/] {error}")
    console.print(f"built in {new['build_s']:.1f} s (before: {old['build_s']:.1f} s); the new store upgraded the "
                  f"old store's file ({verdicts:,} verdicts) in {upgrade_s:.2f} s")
    console.print(f"machine: {machine()}; files in {args.dir or tempfile.gettempdir()}")
    return {"settings": vars(args), "results": results, "saturation_ratio": ratio,
            "paced_p95_met": met, "upgrade_s": upgrade_s, "machine": machine()}


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--pairs", type=int, default=100_000, help="pairs in the collection (rounded up to 6s)")
    parser.add_argument("--annotators", type=int, default=20, help="annotator threads")
    parser.add_argument("--overlap", type=int, default=3, help="people per pair")
    parser.add_argument("--seconds", type=float, default=60, help="the paced run's wall time")
    parser.add_argument("--pause", type=float, nargs=2, default=(1.0, 3.0), metavar=("LOW", "HIGH"),
                        help="seconds between a pair and its verdict in the paced run, uniform")
    parser.add_argument("--saturation-seconds", type=float, default=15, help="the saturation run's wall time")
    parser.add_argument("--baseline-rev", default="1d16108", help="git revision of the store to compare with")
    parser.add_argument("--baseline-seconds", type=float, default=20,
                        help="wall time of each of the old store's runs (calls in flight then still finish)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--dir", help="folder for the collection files (default: a temporary one)")
    parser.add_argument("--json", help="write every number to this file")
    args = parser.parse_args(argv)
    if args.pairs < 1 or args.annotators < 1 or args.overlap < 1 or args.pause[0] > args.pause[1]:
        parser.error("--pairs, --annotators and --overlap must be >= 1, and --pause LOW <= HIGH")
    return args


def main(argv=None) -> dict:
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

    args = parse_args(argv)
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        work = Path(tmp)
        before = baseline_store(args.baseline_rev, work)
        with Progress(TextColumn("{task.description}"), BarColumn(), TimeElapsedColumn()) as progress:
            results = {"new": bench(current, work, args, "new", args.seconds, args.saturation_seconds, progress),
                       "before": bench(before, work, args, "before", args.baseline_seconds, args.baseline_seconds,
                                       progress)}
        old_file = Path(results["before"]["path"])
        with sqlite3.connect(old_file) as db:
            verdicts = db.execute("SELECT COUNT(*) FROM verdicts").fetchone()[0]
        started = time.perf_counter()
        current.Collection.open(old_file)
        upgrade_s = time.perf_counter() - started
    out = report(args, results, upgrade_s, verdicts)
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=2))
    return out


if __name__ == "__main__":
    main()
