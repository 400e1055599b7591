"""A finished (or partly finished) run on disk: `runs/<recipe>/`, as `align eval`, `chat` and `export` read it.

`align run` writes the recipe it ran, every default filled in and overrides applied, to
`runs/<recipe>/recipe.yaml`, so a run folder says by itself which base model and stages made it. A
stage is named `RUN/STAGE` (`runs/quickstart/dpo`); `base` is the untrained model.
"""

from __future__ import annotations

from contextlib import nullcontext
from dataclasses import asdict, dataclass
from pathlib import Path

import yaml

from align.config import Recipe, load_recipe
from align.errors import AlignError
from align.run_folder import FINISHED, RECIPE_FILE, STAGE_FILE, StageFolder

BASE = "base"


def save_recipe(recipe, run_dir: Path) -> None:
    fields = {k: v for k, v in asdict(recipe).items() if k != "path"}
    (run_dir / RECIPE_FILE).write_text(yaml.safe_dump(fields, sort_keys=False, allow_unicode=True), encoding="utf-8")


@dataclass
class Run:
    dir: Path
    recipe: Recipe

    @property
    def name(self) -> str:
        return self.dir.name

    def stage(self, name: str):
        """The stage's config; an AlignError naming the choices when the recipe has none of that name."""
        for stage in self.recipe.stages:
            if stage.name == name:
                return stage
        names = ", ".join([BASE, *(s.name for s in self.recipe.stages)])
        raise AlignError(f"{self.dir}: no stage '{name}'; choose from: {names}")

    def state(self, name: str) -> dict:
        return StageFolder(self.dir / name).state()

    def finished(self) -> list[str]:
        """Names of the stages that finished, in recipe order."""
        return [s.name for s in self.recipe.stages if self.state(s.name).get("status") in FINISHED]

    def outputs(self, name: str) -> dict[str, str]:
        """`${<name>.<key>}` of this run: its own folder's, or those of the run it reused the stage from."""
        reused = self.state(name).get("reused_from")
        return StageFolder(Path(reused) if reused else self.dir / name).outputs()

    def adapter(self, name: str) -> str | None:
        """The folder of a finished stage's adapter; None for `base`. AlignError for an unfinished stage."""
        if name == BASE:
            return None
        self.stage(name)
        state = self.state(name)
        if state.get("status") not in FINISHED:
            status = state.get("status", "not started")
            raise AlignError(f"{self.dir / name}: stage '{name}' has not finished (status: {status}); "
                             f"run `align run` on the recipe first")
        return state["adapter"]


def open_run(path: str | Path) -> Run:
    """The run at `path` (a folder `align run` wrote), with its recipe."""
    run_dir = Path(path)
    if not (run_dir / RECIPE_FILE).is_file():
        hint = " (a stage folder? give RUN/STAGE where a stage is meant)" if (run_dir / STAGE_FILE).is_file() else ""
        raise AlignError(f"{run_dir}: not a run folder: it has no {RECIPE_FILE}{hint}. Runs are written by "
                         "`align run RECIPE` to runs/<recipe name>/; for a run made before align kept its recipe, "
                         "run the same `align run` again: finished stages are skipped and the recipe is written")
    return Run(run_dir, load_recipe(run_dir / RECIPE_FILE))


def open_stage(spec: str | Path) -> tuple[Run, str]:
    """`RUN/STAGE` (e.g. runs/quickstart/dpo or runs/quickstart/base) as (run, stage name)."""
    path = Path(spec)
    run = open_run(path.parent)
    if path.name != BASE:
        run.adapter(path.name)  # an unknown or unfinished stage is an error here, before any model loads
    return run, path.name


def load_stage_model(run: Run, stage: str, trainable: bool = False):
    """(model, tokenizer): the run's base as its recipe loads it, with the stage's adapter on top (a
    PeftModel, adapter name = the stage's name), or the bare base for `base`."""
    from align.models.load import load_base

    base, tokenizer = load_base(run.recipe.model)
    adapter = run.adapter(stage)
    if adapter is None:
        return base, tokenizer
    from peft import PeftModel

    return PeftModel.from_pretrained(base, adapter, adapter_name=stage, is_trainable=trainable), tokenizer


def acting_as(model, stage: str):
    """Run `model` as `stage`'s policy (a context): its adapter, or the bare base for `base`."""
    if not hasattr(model, "peft_config"):
        return nullcontext(model)  # nothing but the base was loaded
    from align.models import adapters

    return adapters.using(model, None if stage == BASE else stage)

