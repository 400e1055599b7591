"""What a stage kind is, said once: each `align/stages/<kind>.py` registers one `StageKind`, and everything else
(the recipe's validation, the pipeline, eval, forgetting, export, the collection's judge) asks the descriptor
instead of naming a kind.

A new kind is one file that defines its config (a `StageConfig` subclass with `kind: str = "<name>"`), its `run`,
and calls `register(StageKind(...))`; a module outside align can register one too, before the recipe is parsed.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

from align.errors import AlignError


def _no_summary(metrics: dict) -> dict:
    return {}


@dataclass(frozen=True)
class StageKind:
    name: str  # the recipe's `kind:`
    config: type  # its align.config.StageConfig subclass
    run: Callable  # run(stage config, StageContext, {"train": LoadedData, "eval": LoadedData | None}) -> StageOutput
    data: str  # the data kind it trains on (align.data.formats.KINDS)
    eval_data: str | None = None  # the data kind of its held-out set; None = `data`
    # a policy answers prompts; a reward model scores answers; data: preference rows (align.stages.label)
    produces: Literal["policy", "reward", "data"] = "policy"
    # Trains on demonstrations (SFT): the default reference of eval, the default retention set of forgetting
    # measurements (its held-out data) and the default replay source of later stages.
    demonstrations: bool = False
    heldout_pairs: bool = False  # its held-out data are preference pairs: eval's default judge-accuracy set
    # The implicit reward of a policy trained on preferences (align.losses.preference.ImplicitReward), from its
    # config; eval scores held-out pairs with it. None: the kind has none.
    implicit_reward: Callable | None = None
    # {section: {metric: value}} of the held-out numbers that summary.json collects from its final metrics
    summary: Callable[[dict], dict] = _no_summary
    curves: tuple[str, ...] = ()  # metrics.jsonl keys the report plots, where logged
    multi_process: bool = True  # trains under a launcher (several processes); False: one process only
    # Before anything trains under a launcher: raises where the stage's global batch does not divide among the
    # processes. None: its `train.batch_size` must (align.stages.engine.device_batch_size).
    check_shares: Callable | None = None

    @property
    def policy(self) -> bool:
        return self.produces == "policy"

    @property
    def held_out(self) -> str:
        return self.eval_data or self.data


KINDS: dict[str, StageKind] = {}


def register(kind: StageKind) -> StageKind:
    if kind.name in KINDS:
        raise ValueError(f"a stage kind called '{kind.name}' is registered already")
    KINDS[kind.name] = kind
    return kind


def kind_of(stage) -> StageKind:
    """The descriptor of a stage config's kind."""
    try:
        return KINDS[stage.kind]
    except KeyError:
        raise AlignError(f"stage '{stage.name}': unknown kind '{stage.kind}'; known: {', '.join(KINDS)}") from None
