"""Run a recipe's stages in order on one base model, skipping finished stages and resuming
interrupted ones, then evaluate (`align.eval.evaluate`, when the recipe has an eval section) and write
`runs/<recipe>/summary.json`.

A stage's config hash covers the base model's identity (what `model.base` resolved to, its quantization, dtype and
chat template: align.models.identity), the rest of the model section, the stage's own section, its data fingerprints
and the hashes of the stages it references, so changing the SFT stage reruns the DPO stage that starts from
it, and nothing else reruns. `stage.json` says `running` from the start of a stage until it is `done`:
a run killed in between (even with SIGKILL) resumes from the stage's last checkpoint next time.

Under a launcher (`accelerate launch`, `torchrun`) every process runs this file, and the stages train together
(align.stages.engine). The main process decides for all whether a stage is skipped, writes every shared file, and
alone measures forgetting, evaluates and writes the summary; the others finish once the last stage has trained.
"""

from __future__ import annotations

import importlib.metadata
import shutil
import time
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import asdict
from pathlib import Path

import transformers
from filelock import FileLock
from rich.markup import escape

from align import distributed, replay
from align.config import Recipe
from align.data.formats import load_examples
from align.data.mixture import load_section
from align.errors import AlignError, StagePruned
from align.eval.forgetting import load_sets, stage_forgetting
from align.eval.report import summary_table
from align.models.host import ModelHost
from align.models.identity import base_identity, identity_key, machine
from align.models.load import compute_dtype, load_base, resolve_base
from align.refs import parse_refs, resolve_all_refs, resolve_refs
from align.run_folder import (
    CACHE_DIR,
    FINISHED,
    INTERRUPTED,
    LOCKS_DIR,
    PRUNED,
    RUNNING,
    SUMMARY_FILE,
    StageFolder,
    find_finished,
    identity_hash,
    read_json,
    write_json,
)
from align.runs import Run, save_recipe
from align.settings import StageConfig
from align.stages.engine import StageContext, device_batch_size
from align.stages.kind import KINDS, kind_of
from align.tracking import numbers, report_summary, stage_trackers
from align.ui import StepObserver, console, forgetting_table, stages_table

SUMMARY_EVAL_KEYS = ("win_rate", "lc_win_rate", "mean_reward", "mean_length", "kl_to_reference", "task_accuracy",
                     "task_accuracy_change", "implicit_reward_accuracy")
LIBRARIES = ("align", "torch", "transformers", "peft", "trl", "accelerate", "bitsandbytes", "datasets")


def library_versions() -> dict[str, str]:
    return {name: importlib.metadata.version(name) for name in LIBRARIES}


def _data_summary(loaded) -> dict:
    summary = {
        "source": loaded.source,
        "format": loaded.format,
        "rows": len(loaded.examples),
        "skipped": [str(e) for e in loaded.skipped],
        "fingerprint": loaded.fingerprint,
    }
    return {**summary, "mixture": loaded.composition} if loaded.composition else summary


# the observers that someone running the pipeline adds to a stage's own (align.sweep: a trial's pruner)
Watchers = Callable[[StageConfig], list[StepObserver]]


class Pipeline:
    def __init__(self, recipe: Recipe, quiet: bool = False, host: ModelHost | None = None,
                 watchers: Watchers = lambda stage: []):
        self.recipe, self.quiet, self.watchers = recipe, quiet, watchers
        distributed.init()
        if not distributed.is_main():
            console.quiet = True  # the main process speaks for the run; the others would repeat every line
        self.run_dir = Path(recipe.output_dir) / recipe.name
        with distributed.main_first():  # a GGUF base is converted once, into the cache that the others then read
            self.resolved = resolve_base(recipe.model.base)
            self.identity = base_identity(recipe.model, self.resolved)
        self.dtype = compute_dtype(recipe.model.precision)
        self.host = host or ModelHost(recipe.model, self.resolved, loader=self._load_base)
        self.outputs: dict[str, dict[str, str]] = {}
        self.hashes: dict[str, str] = {}
        self.forgetting_sets = load_sets(recipe)

    def _load_base(self, model_cfg, resolved):
        console.print(f"[bold]base[/]: {resolved.description}  quantization={model_cfg.quantization} "
                      f"dtype={self.dtype}")
        return load_base(model_cfg, resolved)

    def load_data(self, stage) -> dict:
        def load(section, kind):
            return load_section(section, kind, stage.train.seed, lambda path: resolve_refs(path, self.outputs))

        kind = kind_of(stage)
        data = {"train": load(stage.data, kind.data),
                "eval": load(stage.eval_data, kind.held_out) if stage.eval_data else None}
        if getattr(stage, "replay", None):
            data["replay"] = load_examples(resolve_refs(stage.replay.source, self.outputs), "sft", stage.replay.format)
        return data

    def run_stage(self, stage) -> dict:
        folder = StageFolder(self.run_dir / stage.name)
        stage_dir = folder.dir
        data = self.load_data(stage)
        parents = sorted({ref.stage for value in _strings(asdict(stage)) for ref in parse_refs(value)})
        config_hash = identity_hash(
            {
                "model": {**model_settings(self.recipe.model), "identity": self.identity},
                "stage": asdict(stage),
                "seed": self.recipe.seed,
                "data": {k: v.fingerprint for k, v in data.items() if v},
                "parents": {p: self.hashes[p] for p in parents},
            }
        )
        self.hashes[stage.name] = config_hash
        self.outputs[stage.name] = folder.outputs()
        # The main process reads stage.json and the others take its word: no process skips a stage that another trains.
        state = distributed.broadcast(folder.state())
        if state.get("status") in FINISHED and state.get("config_hash") == config_hash:
            if state.get("reused_from"):
                self.outputs[stage.name] = StageFolder(Path(state["reused_from"])).outputs()
            console.print(f"[green]skip[/] {stage.name}: finished, config unchanged")
            return state
        with self.building(config_hash):
            reused = distributed.broadcast(find_finished(Path(self.recipe.output_dir), config_hash)
                                           if distributed.is_main() else None)
            if reused is not None and reused.dir != stage_dir:
                return self.reuse(stage, folder, reused)
            return self.train_stage(stage, folder, data, config_hash, parents, state)

    @contextmanager
    def building(self, config_hash: str):
        """While a stage with this identity is built, no other align process building it too (several `align sweep`
        processes, or runs of recipes that share a stage, under one output_dir) gets past this: it waits, then finds
        the stage finished and reuses it."""
        if not distributed.is_main():
            yield
            return
        locks = Path(self.recipe.output_dir) / LOCKS_DIR
        locks.mkdir(parents=True, exist_ok=True)
        with FileLock(str(locks / f"{config_hash}.lock")):
            yield

    def reuse(self, stage, folder: StageFolder, finished: StageFolder) -> dict:
        """A stage with this identity finished in another run folder: its adapter serves, and this run's stage.json
        says where it came from."""
        console.print(f"[green]reuse[/] {stage.name}: finished with the same config in {escape(str(finished.dir))}")
        state = {**finished.state(), "reused_from": str(finished.dir)}
        if distributed.is_main():
            shutil.rmtree(folder.dir, ignore_errors=True)  # what an earlier, different config of it left
            folder.dir.mkdir(parents=True)
        folder.write(state)
        self.outputs[stage.name] = finished.outputs()
        return state

    def train_stage(self, stage, folder: StageFolder, data: dict, config_hash: str, parents: list[str],
                    state: dict) -> dict:
        stage_dir = folder.dir
        main = distributed.is_main()
        if not main:
            distributed.barrier()  # until the main process has prepared the stage: `prepared` below is its side
        if state.get("config_hash") != config_hash:
            state = {}  # a changed stage starts over; an interrupted one keeps its checkpoints and start time
            if main and stage_dir.exists():
                shutil.rmtree(stage_dir)
        stage_dir.mkdir(parents=True, exist_ok=True)
        for bad in (e for v in data.values() if v for e in v.skipped):
            console.print(f"[yellow]skipped[/] {escape(str(bad))}", soft_wrap=True)
        state = {
            "name": stage.name,
            "kind": stage.kind,
            "status": RUNNING,
            "config_hash": config_hash,
            "parents": parents,
            "data": {k: _data_summary(v) for k, v in data.items() if v},
            "base": self.resolved.description,
            "identity": self.identity,
            "machine": machine(),
            "versions": library_versions(),
            "started_at": state.get("started_at") or time.strftime("%Y-%m-%dT%H:%M:%S"),
        }
        folder.write(state)
        if stage.replay_out and main:  # before training: it is the data's sample, whatever becomes of the run
            replay.keep_stage_sample(stage_dir, stage.name, data["train"], stage.replay_out.size, stage.train.seed)
        self.host.load()  # before the seed is set: loading the tiny fallback model draws its random weights
        ctx = StageContext(self.host, stage_dir, self.recipe.seed, self.dtype, self.quiet,
                           prepared=distributed.barrier if main else lambda: None,
                           trackers=[*self.trackers(stage, folder), *self.watchers(stage)] if main else [],
                           shared_cache=Path(self.recipe.output_dir) / CACHE_DIR / identity_key(self.identity))
        if "replay" in data:
            ctx.replay = replay.stage_mixer(stage, stage_dir, self.host.tokenizer, data["replay"])
        transformers.set_seed(stage.train.seed if stage.train.seed is not None else self.recipe.seed)
        start = time.time()
        try:
            out = kind_of(stage).run(resolve_all_refs(stage, self.outputs), ctx, data)
        except BaseException as stopped:
            state["status"] = PRUNED if isinstance(stopped, StagePruned) else INTERRUPTED
            folder.write(state)
            raise
        state.update(
            status=out.status,
            finished_at=time.strftime("%Y-%m-%dT%H:%M:%S"),
            seconds=round(time.time() - start, 1),
            metrics=out.metrics,
            resumed_from=out.resumed_from,
            adapter=str(out.adapter),
            **out.extra,
        )
        folder.write(state)
        return state

    def trackers(self, stage, folder: StageFolder) -> list:
        """The stage's runs in the recipe's trackers; a resumed stage's reopen, past the steps they already have."""
        tracking = self.recipe.tracking
        config = {"stage": asdict(stage), "model": asdict(self.recipe.model), "seed": self.recipe.seed}
        return stage_trackers(tracking.trackers(), folder.dir, f"{self.recipe.name}/{stage.name}", self.group(),
                              tracking.project, config, folder.metrics.last_step())

    def group(self) -> str:
        return self.recipe.tracking.group or self.recipe.name

    def measure_forgetting(self, stage, state: dict) -> None:
        """Add to `state` (and stage.json) what the stage's policy kept and lost: the policy it started
        from against the one it made, on the recipe's held-out retention sets (align.eval.forgetting)."""
        if self.forgetting_sets is None:
            return
        start = resolve_refs(stage.init, self.outputs) if stage.init else None
        key = identity_hash({"sets": self.forgetting_sets.fingerprint, "stage": state["config_hash"]})
        if state.get("forgetting", {}).get("key") == key:
            return
        if not kind_of(stage).policy:
            state["forgetting"] = {"key": key,
                                   "skipped": f"a {stage.kind} stage trains no policy: no policy changed"}
            StageFolder(self.run_dir / stage.name).write(state)
            return
        console.print(f"measuring what [bold]{stage.name}[/] forgot (from {escape(start or 'the base')})")
        cache_path = self.run_dir / "forgetting_cache.json"
        base_key = identity_key(self.identity)  # measurements on another base (or dtype) are not these
        cache = read_json(cache_path).get(base_key, {})
        result = stage_forgetting(self.host, stage, start, state["adapter"], self.forgetting_sets,
                                  self.recipe.forgetting, cache, self.quiet)
        write_json(cache_path, {base_key: cache})
        state["forgetting"] = {"key": key, "start": start or "base", **result}
        StageFolder(self.run_dir / stage.name).write(state)

    def check_processes(self) -> None:
        """Under a launcher, before anything trains: each stage can train in several processes, and its global batch
        divides among them."""
        if distributed.world_size() == 1:
            return
        for stage in self.recipe.stages:
            if not kind_of(stage).multi_process:
                raise AlignError(f"stage '{stage.name}': {stage.kind} stages train in one process (their loop has no "
                                 "multi-process version); run this recipe without a launcher")
            (kind_of(stage).check_shares or device_batch_size)(stage)

    def evaluate(self) -> dict:
        """`align eval` on this run with the recipe's eval section: RUN/eval/ with eval.json and report.html."""
        from align.eval.evaluate import evaluate_run

        return evaluate_run(Run(self.run_dir, self.recipe), self.recipe.eval, host=self.host, quiet=self.quiet,
                            identity=self.identity)

    def run(self) -> dict:
        """The run's summary; {} in the processes other than the main one, which only train."""
        self.check_processes()
        main = distributed.is_main()
        if main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            save_recipe(self.recipe, self.run_dir)
        summary = {"recipe": self.recipe.name, "run_dir": str(self.run_dir), "base": self.resolved.description,
                   "identity": self.identity, "machine": machine(), "stages": {}}
        if self.resolved.tiny:
            summary["warning"] = "tiny random model: no pretrained model was found"
        summary["forgetting"] = {}
        for stage in self.recipe.stages:
            state = self.run_stage(stage)
            if not main:
                continue  # the main process measures forgetting alone, while the others wait at the next stage
            self.measure_forgetting(stage, state)
            summary["stages"][stage.name] = {k: state.get(k) for k in ("kind", "status", "seconds", "metrics",
                                                                       "adapter", "resumed_from")}
            if "forgetting" in state:
                summary["forgetting"][stage.name] = {k: v for k, v in state["forgetting"].items() if k != "key"}
        if not main:
            return {}
        heldout: dict = {"rewards": {}, "ppo_scores": {}}
        for name, st in summary["stages"].items():  # each kind says which of its final metrics are held-out numbers
            for section, values in KINDS[st["kind"]].summary(st.get("metrics") or {}).items():
                heldout.setdefault(section, {})[name] = values
        evaluation = self.evaluate() if self.recipe.eval else None
        if evaluation:
            heldout["task_accuracy"] = {n: st["task_accuracy"] for n, st in evaluation["stages"].items()
                                        if st["task_accuracy"] is not None}
            heldout["per_family"] = {n: st["task_per_family"] for n, st in evaluation["stages"].items()
                                     if st["task_per_family"]}
            report = self.run_dir / "eval" / "report.html"
            summary["eval"] = {"report": str(report) if self.recipe.eval.report else None,
                               "reference": evaluation["settings"]["reference"],
                               "stages": {n: {k: st[k] for k in SUMMARY_EVAL_KEYS}
                                          for n, st in evaluation["stages"].items()}}
        summary["heldout"] = heldout
        write_json(self.run_dir / SUMMARY_FILE, summary)
        if evaluation and self.recipe.tracking.trackers():
            report_summary(self.recipe.tracking.trackers(), self.run_dir / "eval", self.group(),
                           self.recipe.tracking.project, numbers({f"{name}/{key}": value for name, stage in
                                                                  summary["eval"]["stages"].items()
                                                                  for key, value in stage.items()}))
        console.print(stages_table(summary))
        if summary["forgetting"]:
            console.print(forgetting_table(summary["forgetting"]))
        if evaluation:
            console.print(summary_table([evaluation]))
            if summary["eval"]["report"]:
                console.print(f"report: {summary['eval']['report']}")
        return summary


def model_settings(model_cfg) -> dict:
    """The model section without what the identity already says in resolved form: the name `base` resolves from,
    `precision` (the identity has the dtype it gave) and `chat_template` (the identity has the template used); nor
    `dequantized_generation`, which changes how fast generation computes, not what."""
    return {k: v for k, v in asdict(model_cfg).items()
            if k not in ("base", "precision", "chat_template", "dequantized_generation")}


def _strings(obj):
    if isinstance(obj, str):
        yield obj
    elif isinstance(obj, dict):
        for v in obj.values():
            yield from _strings(v)
    elif isinstance(obj, (list, tuple)):
        for v in obj:
            yield from _strings(v)


def run_recipe(recipe: Recipe, quiet: bool = False, host: ModelHost | None = None,
               watchers: Watchers = lambda stage: []) -> dict:
    """Run `recipe`'s stages and its eval; `host` lends the base (default: one that loads `recipe.model` once);
    `watchers` gives each stage observers of its steps besides its own."""
    return Pipeline(recipe, quiet, host, watchers).run()
