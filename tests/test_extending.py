"""align is extended from outside its package: this module registers a stage kind, a preference loss and a reward
source of its own, and runs them through everything a built-in one goes through: `align validate`, `align run`, a
rerun that skips what is unchanged, a resume after an interruption, `align eval` and `align export`."""

import dataclasses
import json
from typing import ClassVar

import pytest
import torch
import torch.nn.functional as F
import transformers

from align.cli import main
from align.losses import preference
from align.rewards import REWARD_SOURCES, Reward, RewardSource, register_source
from align.stages.groups import PreferenceStageConfig, encode_groups, run_groups
from align.stages.kind import KINDS, StageKind, register
from tests.conftest import _tiny_head


@dataclasses.dataclass(frozen=True, kw_only=True)
class MeanMarginLoss(preference.PreferenceLoss):
    """Reference-free: the sigmoid of beta times the margin of length-averaged log-probs, best against worst."""

    name: ClassVar[str] = "toy_mean_margin"
    listwise: ClassVar[bool] = False
    needs_reference: ClassVar[bool] = False
    mean_logps: ClassVar[bool] = True

    def losses(self, logps, ref_logps, lengths, scores, mask):
        best, worst = preference.best_and_worst(scores, mask)  # [B] each
        margin = preference.pick(logps, best) - preference.pick(logps, worst)  # [B]
        return -F.logsigmoid(self.beta * margin), {"toy/margin": float(margin.detach().mean())}


@dataclasses.dataclass(kw_only=True)
class MarginStageConfig(PreferenceStageConfig):
    """A stage kind of this module: it trains MeanMarginLoss on preference pairs, with its own `beta`."""

    kind: str = "toy_margin"
    beta: float = 2.0


def run_margin_stage(stage, ctx, data):
    def rows(loaded):  # a pair is a group of two, best first
        return encode_groups([ex.as_ranked() for ex in loaded.examples], ctx.tokenizer, stage.train)

    held_out = rows(data["eval"]) if data.get("eval") else None
    train = rows(data["train"])
    return run_groups(stage, ctx, train, held_out, MeanMarginLoss(beta=stage.beta))


class ShortReplies(Reward):
    name, kind, needs_rules = "short", "toy", False

    def __init__(self, words: int):
        self.words = words

    def score(self, prompts, responses, rules=None):
        return torch.tensor([-abs(len(r.split()) - self.words) / self.words for r in responses])


@dataclasses.dataclass(kw_only=True)
class ShortRepliesSource(RewardSource):
    short: int  # the number of words a reply should have

    def load(self, model=None, tokenizer=None, adapter="reward", lengths=(512, 256)):
        return ShortReplies(self.short)


@pytest.fixture
def extensions():
    register(StageKind("toy_margin", MarginStageConfig, run_margin_stage, data="preference",
                       implicit_reward=lambda stage: MeanMarginLoss(beta=stage.beta), curves=("loss", "toy/margin")))
    preference.register(MeanMarginLoss)
    register_source("short")(ShortRepliesSource)
    yield
    del KINDS["toy_margin"], preference.LOSSES[MeanMarginLoss.name], REWARD_SOURCES["short"]


TRAIN = "lr: 3.0e-3, batch_size: 8, max_length: 96, max_prompt_length: 64"


def _recipe(output_dir) -> str:
    return _tiny_head("toy", output_dir, "none", sft_steps=4) + f"""\
  - name: margin
    kind: toy_margin
    init: ${{sft.adapter}}
    beta: 2.0
    data: {{path: "synthetic:preference", max_rows: 48}}
    train: {{max_steps: 4, save_steps: 2, {TRAIN}}}
  - name: dpo
    kind: dpo
    init: ${{sft.adapter}}
    data: {{path: "synthetic:preference", max_rows: 48}}
    loss: {{type: toy_mean_margin, beta: 2.0}}
    train: {{max_steps: 2, {TRAIN}}}
  - name: ppo
    kind: ppo
    init: ${{margin.adapter}}
    data: {{path: "synthetic:prompts", max_rows: 16}}
    rewards: [{{short: 3}}]
    ppo: {{rollout_batch_size: 8, minibatch_size: 4, ppo_epochs: 1, max_new_tokens: 6}}
    train: {{max_steps: 1, {TRAIN}}}
forgetting: {{enabled: false}}
eval:
  tasks: {{path: "synthetic:heldout", max_rows: 4}}
  preferences: {{path: "synthetic:preference_heldout", max_rows: 16}}
  max_new_tokens: 4
"""


def _state(run_dir, stage) -> dict:
    return json.loads((run_dir / stage / "stage.json").read_text())


def test_a_stage_kind_a_loss_and_a_reward_source_from_outside_align_go_everywhere(tmp_path, extensions,
                                                                                  monkeypatch, capsys):
    recipe = tmp_path / "toy.yaml"
    recipe.write_text(_recipe(tmp_path / "runs"))
    assert main(["validate", str(recipe)]) == 0
    run_dir = tmp_path / "runs" / "toy"

    save = transformers.Trainer._save_checkpoint

    def save_then_stop(self, *args, **kwargs):
        save(self, *args, **kwargs)
        if self.state.global_step == 2 and "margin" in str(self.args.output_dir):
            raise KeyboardInterrupt  # as Ctrl-C would, between the margin stage's checkpoint and its next step

    monkeypatch.setattr(transformers.Trainer, "_save_checkpoint", save_then_stop)
    assert main(["run", str(recipe), "--quiet"]) == 130
    assert "run the same command again to resume" in capsys.readouterr().err
    assert _state(run_dir, "margin")["status"] == "interrupted"
    monkeypatch.setattr(transformers.Trainer, "_save_checkpoint", save)
    assert main(["run", str(recipe), "--quiet"]) == 0
    margin = _state(run_dir, "margin")
    assert margin["status"] == "done" and margin["resumed_from"].endswith("checkpoint-2")
    logged = [json.loads(line) for line in (run_dir / "margin" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in logged if "loss" in r] == [1, 2, 3, 4]  # each step once across the interruption
    margins = [r["toy/margin"] for r in logged if "toy/margin" in r]
    assert margins[-1] > margins[0]  # the toy loss widened the margin it trains
    assert all(_state(run_dir, s)["status"] == "done" for s in ("sft", "dpo", "ppo"))
    assert "reward/short:short" in _state(run_dir, "ppo")["metrics"]  # PPO was paid by the toy reward source

    finished = {s: _state(run_dir, s)["finished_at"] for s in ("sft", "margin", "dpo", "ppo")}
    capsys.readouterr()
    assert main(["run", str(recipe), "--quiet"]) == 0
    assert {s: _state(run_dir, s)["finished_at"] for s in finished} == finished
    assert capsys.readouterr().err.count("config unchanged") == 4

    assert main(["eval", str(run_dir), "--stages", "margin", "dpo", "--out", str(tmp_path / "eval"), "--quiet"]) == 0
    stages = json.loads((tmp_path / "eval" / "eval.json").read_text())["stages"]
    # scored with the implicit reward that the toy kind's descriptor and the toy loss's registration give (a kind
    # without one gets None)
    assert isinstance(stages["margin"]["implicit_reward_accuracy"], float)
    assert isinstance(stages["dpo"]["implicit_reward_accuracy"], float)

    assert main(["export", str(run_dir / "margin"), "--adapter-only", str(tmp_path / "exported")]) == 0
    assert (tmp_path / "exported" / "adapter_model.safetensors").is_file()
