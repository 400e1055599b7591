"""Preference losses are objects in one registry (align.losses.preference): the built-in ones give what their
functions give, the recipe accepts exactly the registered names, and a loss registered from outside align trains in
a dpo stage and is what eval's implicit-reward accuracy asks."""

import dataclasses
import functools
import json
from typing import ClassVar

import pytest
import torch
import torch.nn.functional as F

from align.config import parse_recipe
from align.errors import ConfigError
from align.eval.evaluate import evaluate_run
from align.losses import preference
from align.losses.dpo import dpo_loss, orpo_loss
from align.losses.rank import plackett_luce_loss, pro_loss, ranking_metrics
from align.losses.sft import sft_loss
from align.pipeline import run_recipe
from align.runs import open_run
from align.stages.groups import preference_objective
from tests.conftest import tiny_recipe

assert_close = functools.partial(torch.testing.assert_close, atol=1e-6, rtol=0)
G = torch.Generator().manual_seed(0)
LOGPS = -torch.rand(3, 4, generator=G, dtype=torch.float64) * 20  # [B, K] summed log-probs
REF = -torch.rand(3, 4, generator=G, dtype=torch.float64) * 20
LENGTHS = torch.tensor([[4, 5, 6, 7], [3, 3, 3, 3], [9, 2, 5, 1]])
SCORES = torch.tensor([[3.0, 1.0, 2.0, 0.0], [0.0, 1.0, 1.0, 0.0], [1.0, 0.0, 0.0, 0.0]])
MASK = torch.tensor([[True] * 4, [True] * 4, [True, True, False, False]])


def test_pairwise_sigmoid_with_rpo_is_dpo_on_best_against_worst_plus_the_best_answers_nll():
    loss = preference.build("sigmoid", beta=0.5, nll_weight=0.3, label_smoothing=0.1)
    total, metrics = preference_objective(loss)(LOGPS, REF, LENGTHS, SCORES, MASK)
    best, worst = torch.tensor([0, 1, 0]), torch.tensor([3, 3, 1])  # first best, last worst
    pick = lambda t, i: t[torch.arange(3), i]  # noqa: E731
    dpo = dpo_loss(pick(LOGPS, best), pick(LOGPS, worst), pick(REF, best), pick(REF, worst), beta=0.5,
                   label_smoothing=0.1)
    assert_close(total, dpo.losses.mean() + 0.3 * sft_loss(pick(LOGPS, best), pick(LENGTHS, best)))
    assert metrics["rewards/accuracies"] == pytest.approx(
        float((dpo.chosen_rewards > dpo.rejected_rewards).float().mean()))
    ranking = ranking_metrics(0.5 * (LOGPS - REF), SCORES, MASK)  # every response's implicit reward, summed log-probs
    assert "nll_loss" in metrics and all(metrics[k] == pytest.approx(v) for k, v in ranking.items())


def test_reference_free_and_length_averaged_losses_say_so():
    ipo, orpo, pro = (preference.build(name, beta=2.0) for name in ("ipo", "orpo", "pro"))
    assert (ipo.needs_reference, ipo.mean_logps) == (True, True)
    assert_close(ipo.implicit_reward(LOGPS, REF, LENGTHS), 2.0 * (LOGPS / LENGTHS - REF / LENGTHS))
    assert (orpo.needs_reference, orpo.added_nll_weight) == (False, 1.0)  # ORPO's SFT term is part of ORPO
    assert_close(orpo.implicit_reward(LOGPS, None, LENGTHS), 2.0 * LOGPS / LENGTHS)
    pair = SCORES[:, :2], MASK[:, :2]
    total, _ = preference_objective(orpo)(LOGPS[:, :2], None, LENGTHS[:, :2], *pair)
    mean = LOGPS[:, :2] / LENGTHS[:, :2]
    best, worst = torch.tensor([0, 1, 0]), torch.tensor([1, 0, 1])
    expected = orpo_loss(mean[torch.arange(3), best], mean[torch.arange(3), worst], beta=2.0).losses.mean()
    expected = expected + sft_loss(LOGPS[torch.arange(3), best], LENGTHS[torch.arange(3), best])
    assert_close(total, expected)
    # PRO holds its NLL term itself (weight 1 unless asked) and ranks by the mean log-prob, without beta
    assert (pro.listwise, pro.added_nll_weight, pro.nll) == (True, 0.0, 1.0)
    total, _ = preference_objective(pro)(LOGPS, None, LENGTHS, SCORES, MASK)
    assert_close(total, pro_loss(LOGPS, LENGTHS, SCORES, MASK, sft_weight=1.0).losses.mean())


def test_plackett_luce_objective_is_the_listwise_function():
    total, metrics = preference_objective(preference.build("plackett_luce", beta=0.1))(LOGPS, REF, LENGTHS, SCORES,
                                                                                       MASK)
    assert_close(total, plackett_luce_loss(LOGPS, REF, SCORES, MASK, beta=0.1).losses.mean())
    assert "nll_loss" not in metrics and set(metrics) >= {"rank/accuracy", "rank/kendall_tau"}


@dataclasses.dataclass(frozen=True, kw_only=True)
class Indifferent(preference.PreferenceLoss):
    """A toy pairwise loss from outside align: DPO's sigmoid on summed log-probs without a reference, whose implicit
    reward is the same for every answer, so it can never order a pair."""

    name: ClassVar[str] = "toy_indifferent"
    listwise: ClassVar[bool] = False
    needs_reference: ClassVar[bool] = False

    def losses(self, logps, ref_logps, lengths, scores, mask):
        best, worst = preference.best_and_worst(scores, mask)
        margin = preference.pick(logps, best) - preference.pick(logps, worst)  # [B]
        return -F.logsigmoid(self.beta * margin), {"toy/margin": float(margin.detach().mean())}

    def implicit_reward(self, logps, ref_logps, lengths):
        return torch.zeros_like(logps)


@pytest.fixture
def toy_loss():
    preference.register(Indifferent)
    yield Indifferent
    del preference.LOSSES[Indifferent.name]


def test_recipe_takes_the_registered_names_only(tmp_path):
    recipe = tiny_recipe(tmp_path).replace("type: sigmoid", "type: toy_indifferent")
    with pytest.raises(ConfigError) as err:
        parse_recipe(recipe)
    assert "toy_indifferent" in str(err.value) and "simpo" in str(err.value)  # the error lists the registered names
    with pytest.raises(ConfigError):  # a listwise loss is a rank stage's
        parse_recipe(tiny_recipe(tmp_path).replace("type: sigmoid", "type: plackett_luce"))


def test_a_loss_registered_outside_align_trains_and_is_what_eval_scores(tmp_path, toy_loss):
    recipe = parse_recipe(tiny_recipe(tmp_path, dpo_steps=6).replace("type: sigmoid", "type: toy_indifferent"))
    summary = run_recipe(recipe, quiet=True)
    assert (json.loads((tmp_path / "tiny" / "dpo" / "stage.json").read_text())["reference"]
            == "none (reference-free loss)")
    logged = [json.loads(line) for line in (tmp_path / "tiny" / "dpo" / "metrics.jsonl").read_text().splitlines()]
    margins = [r["toy/margin"] for r in logged if "toy/margin" in r]
    assert len(margins) == 6 and margins[-1] > margins[0]  # the toy loss widened the margin it trains
    assert summary["stages"]["dpo"]["metrics"]["eval_rank/accuracy"] == 0.0  # ties are wrong: it orders nothing
    run = open_run(tmp_path / "tiny")
    result = evaluate_run(run, dataclasses.replace(recipe.eval or _eval_section(), stages=["dpo"]), quiet=True)
    assert result["stages"]["dpo"]["implicit_reward_accuracy"] == 0.0  # the toy's reward, not a built-in formula


def _eval_section():
    from align.config import EvalConfig
    from align.settings import DataConfig

    return EvalConfig(tasks=DataConfig(path="synthetic:heldout", max_rows=4),
                      preferences=DataConfig(path="synthetic:preference_heldout", max_rows=16), max_new_tokens=4)
