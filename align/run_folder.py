"""A run folder as align writes it, and the one module that knows its layout:

    runs/<recipe>/recipe.yaml        the recipe as run (align.runs reads it back)
    runs/<recipe>/summary.json       the run's summary
    runs/<recipe>/<stage>/stage.json the stage's life cycle, identity, data, machine and final metrics
    runs/<recipe>/<stage>/metrics.jsonl, adapter/, checkpoints/, replay/buffer.jsonl, labels.jsonl (label stages)
    runs/<recipe>/<stage>/tensorboard/, tracking.json   what align.tracking writes: event files, trackers' run ids

`stage.json` goes `running` (from the start of a stage) to `done`, or `interrupted` when it raises; a SIGKILL leaves
`running`, and the next launch resumes from the stage's last checkpoint. `stopped_early` (a stage that ended before
its last step, with a usable adapter) and `pruned` (one a sweep abandoned: no adapter to use) have their names here.
A stage's identity is the hash of everything that decides what it trains (align.pipeline says what goes in); a
finished stage is found by that hash, in this run folder or another. Every JSON file is written whole or not at all.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

from align import distributed
from align.ui import StepObserver

RECIPE_FILE, SUMMARY_FILE, STAGE_FILE, METRICS_FILE = "recipe.yaml", "summary.json", "stage.json", "metrics.jsonl"
RUNNING, DONE, INTERRUPTED, STOPPED_EARLY, PRUNED = "running", "done", "interrupted", "stopped_early", "pruned"
FINISHED = (DONE, STOPPED_EARLY)  # a stage that left an adapter later stages may start from
TENSORBOARD_DIR, TRACKING_FILE = "tensorboard", "tracking.json"
LOCKS_DIR = ".locks"  # <output_dir>/.locks/<config hash>.lock: held while a stage with that identity is built
# <output_dir>/.cache/<base identity key>/: what stages of every run on that base may share (reference log-probs)
CACHE_DIR = ".cache"
# <stage>/replay/buffer.jsonl: the stage's sample of its data, for later stages; mixed.jsonl: what it mixed in itself
REPLAY_DIR, REPLAY_BUFFER, REPLAY_MIXED = "replay", "buffer", "mixed"
LABELS_FILE = "labels.jsonl"  # <stage>/labels.jsonl: the preference rows a label stage's annotators gave


def identity_hash(obj) -> str:
    """A short, stable digest of a JSON-able object: keys sorted, anything else by its str()."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


def read_json(path: Path) -> dict:
    return json.loads(path.read_text()) if path.is_file() else {}


def write_atomic(path: Path, text: str) -> None:
    """`path` holds `text` whole or its old content, whatever kills the process: written beside it, then renamed."""
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(text)
    tmp.replace(path)


def read_jsonl(path: Path) -> list[dict] | None:
    """The rows of a JSON-lines file; None where there is no file."""
    return [json.loads(line) for line in path.read_text().splitlines()] if path.is_file() else None


def write_jsonl(path: Path, rows: list[dict]) -> None:
    """`rows`, a JSON line each, written atomically by the main process."""
    if distributed.is_main():
        write_atomic(path, "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows))


def write_json(path: Path, obj: dict) -> None:
    """`obj` written atomically; under a launcher by the main process only (every JSON file of a run is shared)."""
    if distributed.is_main():
        write_atomic(path, json.dumps(obj, indent=2, default=str))


@dataclass(frozen=True)
class MetricsLog(StepObserver):
    """A stage's metrics.jsonl: one record per logged step, appended as the loop logs it; a resumed stage first drops
    what the killed run logged after the checkpoint it resumes from, so that every step is logged once."""

    path: Path

    def logged(self, step: int, metrics: dict) -> None:
        self.append({"step": step, **metrics})

    def _whole_lines(self) -> list[str]:
        """The records' lines; a kill mid-append leaves half a last line, which is not one."""
        text = self.path.read_text() if self.path.is_file() else ""
        lines = text.splitlines() if text.endswith("\n") else text.splitlines()[:-1]
        return [line for line in lines if line]

    def keep_until(self, step: int) -> None:
        """Keep the records up to `step` (a half-written last line goes too)."""
        if self.path.is_file():
            kept = [line for line in self._whole_lines() if json.loads(line)["step"] <= step]
            self.path.write_text("".join(line + "\n" for line in kept))

    def last_step(self) -> int:
        """The last step logged (0 for none), a half-written last line left by a kill not counted."""
        return max((json.loads(line)["step"] for line in self._whole_lines()), default=0)

    def append(self, record: dict) -> None:
        with self.path.open("a") as f:
            f.write(json.dumps(record) + "\n")

    def records(self) -> list[dict]:
        return [json.loads(line) for line in self.path.read_text().splitlines()] if self.path.is_file() else []


@dataclass(frozen=True)
class StageFolder:
    dir: Path

    @property
    def name(self) -> str:
        return self.dir.name

    @property
    def metrics(self) -> MetricsLog:
        return MetricsLog(self.dir / METRICS_FILE)

    def outputs(self) -> dict[str, str]:
        """What later stages may reference as `${<stage>.<key>}`."""
        return {"adapter": str(self.dir / "adapter"), "dir": str(self.dir),
                "replay": str(self.dir / REPLAY_DIR / f"{REPLAY_BUFFER}.jsonl"), "labels": str(self.dir / LABELS_FILE)}

    def state(self) -> dict:
        return read_json(self.dir / STAGE_FILE)

    def write(self, state: dict) -> None:
        write_json(self.dir / STAGE_FILE, state)

    def finished_as(self, config_hash: str) -> bool:
        state = self.state()
        return state.get("status") in FINISHED and state.get("config_hash") == config_hash


def find_finished(runs_dir: Path, config_hash: str) -> StageFolder | None:
    """A finished stage with this identity in any run folder under `runs_dir` (a recipe's `output_dir`), so that
    another run can start from its adapter instead of training it again."""
    for path in sorted(Path(runs_dir).glob(f"*/*/{STAGE_FILE}")):
        folder = StageFolder(path.parent)
        if folder.finished_as(config_hash) and (folder.dir / "adapter").is_dir():
            return folder
    return None
