"""The rank stage, and the DPO family (dpo, kto) on the same group batch, end to end on the tiny model."""

import json
import statistics

import pytest
import torch

from align.config import parse_recipe
from align.losses.dpo import kto_kl_estimate
from align.pipeline import run_recipe
from align.stages import kto
from tests.conftest import _tiny_head

TRAIN = "max_length: 96, max_prompt_length: 64, batch_size: 4"


def _stage(name: str, kind: str, data: str, loss: str, steps: int, eval_data: str = "synthetic:ranked_heldout",
           rows: int = 32) -> str:
    return f"""\
  - name: {name}
    kind: {kind}
    init: ${{sft.adapter}}
    data: {{path: "{data}", max_rows: {rows}}}
    eval_data: {{path: "{eval_data}", max_rows: 16}}
    loss: {{{loss}}}
    train: {{max_steps: {steps}, lr: 3.0e-3, {TRAIN}}}
"""


def _run(tmp_path, *stages: str) -> dict:
    text = _tiny_head("tinyrank", tmp_path, "none", sft_steps=6) + "".join(stages)
    return run_recipe(parse_recipe(text), quiet=True)["stages"]


def test_plackett_luce_raises_heldout_kendall_tau_above_the_start(tmp_path):
    stages = _run(tmp_path, _stage("rank", "rank", "synthetic:ranked", "type: plackett_luce, beta: 0.1", steps=24,
                                   rows=64))
    metrics = stages["rank"]["metrics"]
    # log(4!) = 3.178: the loss of all-equal rewards
    assert metrics["global_step"] == 24 and metrics["train_loss"] < 3.178
    # policy == reference at the start, so every implicit reward is 0 and tau is 0 exactly; a random tiny
    # model generalises little (0.125 measured), but the sign must be right
    assert metrics["eval_rank/kendall_tau"] > 0.05 and metrics["eval_rank/accuracy"] > 0.5
    assert metrics["rank/kendall_tau"] > 0.3  # the last logged training steps
    assert {"rewards/rank_0", "rewards/rank_3", "eval_rewards/rank_0", "eval_rewards/rank_3"} <= metrics.keys()


@pytest.mark.parametrize("loss", ["type: lipo, beta: 0.1", "type: pro", "type: rrhf"])
def test_every_rank_loss_trains(tmp_path, loss):
    metrics = _run(tmp_path, _stage("rank", "rank", "synthetic:ranked", loss, steps=3))["rank"]["metrics"]
    assert metrics["global_step"] == 3 and "eval_rank/kendall_tau" in metrics
    # pro, rrhf: reference-free
    assert (tmp_path / "tinyrank" / "rank" / "ref_logps_train.pt").is_file() == ("lipo" in loss)


def test_plackett_luce_on_pairs_is_dpo(tmp_path):
    """The same pairs, seed and steps through `rank` (Plackett–Luce) and `dpo` (sigmoid) train identically."""
    pairs = "synthetic:preference"
    stages = _run(tmp_path, _stage("dpo", "dpo", pairs, "type: sigmoid, beta: 0.1", 4,
                                   eval_data="synthetic:preference_heldout"),
                  _stage("rank", "rank", pairs, "type: plackett_luce, beta: 0.1", 4,
                         eval_data="synthetic:preference_heldout"))
    dpo, rank = stages["dpo"]["metrics"], stages["rank"]["metrics"]
    assert dpo["train_loss"] == pytest.approx(rank["train_loss"], abs=1e-5)
    assert dpo["eval_loss"] == pytest.approx(rank["eval_loss"], abs=1e-5)
    assert dpo["eval_rank/accuracy"] == pytest.approx(dpo["eval_rewards/accuracies"])  # K = 2: one pair per group


def test_dpo_on_rankings_trains_best_against_worst_and_reports_tau(tmp_path):
    stages = _run(tmp_path, _stage("dpo", "dpo", "synthetic:ranked", "type: sigmoid, beta: 0.1", 2))
    metrics = stages["dpo"]["metrics"]
    assert "eval_rank/kendall_tau" in metrics and "eval_rewards/rank_3" in metrics  # held-out groups keep K = 4
    train_cache = torch.load(tmp_path / "tinyrank" / "dpo" / "ref_logps_train.pt")
    eval_cache = torch.load(tmp_path / "tinyrank" / "dpo" / "ref_logps_eval.pt")
    assert {len(v) for v in train_cache} == {2} and {len(v) for v in eval_cache} == {4}


@pytest.mark.parametrize("loss", ["type: simpo, beta: 2.0", "type: orpo, beta: 0.1"])
def test_reference_free_dpo_family_losses_train_without_a_reference(tmp_path, loss):
    stages = _run(tmp_path, _stage("dpo", "dpo", "synthetic:preference", loss, 3,
                                   eval_data="synthetic:preference_heldout"))
    metrics = stages["dpo"]["metrics"]
    assert metrics["global_step"] == 3 and metrics["train_loss"] > 0
    assert ("nll_loss" in metrics) == ("orpo" in loss)
    state = json.loads((tmp_path / "tinyrank" / "dpo" / "stage.json").read_text())
    assert state["reference"].startswith("none") and not list((tmp_path / "tinyrank" / "dpo").glob("ref_logps_*"))


def test_kto_on_pairs_split_into_desirable_and_undesirable(tmp_path, monkeypatch):
    estimates = []  # KTO's reference point z0 before its clamp at 0: 12 training steps, then 8 held-out batches

    def unclamped(policy_kl_logps, ref_kl_logps):
        estimates.append(float((policy_kl_logps - ref_kl_logps).mean()))
        return kto_kl_estimate(policy_kl_logps, ref_kl_logps)

    monkeypatch.setattr(kto, "kto_kl_estimate", unclamped)
    stages = _run(tmp_path, _stage("kto", "kto", "synthetic:preference", "beta: 0.1", 12,
                                   eval_data="synthetic:preference_heldout"))
    metrics = stages["kto"]["metrics"]
    assert metrics["global_step"] == 12 and len(estimates) == 12 + 8
    # the policy starts as its reference, the SFT adapter (0 up to bf16 rounding), and training moves it away
    assert abs(estimates[0]) < 1e-4
    assert statistics.mean(map(abs, estimates[12:])) > 0.05  # 0.23 measured
    # desirable answers' implicit rewards rise above undesirable ones' on held-out pairs
    assert metrics["eval_rewards/chosen"] > metrics["eval_rewards/rejected"]
