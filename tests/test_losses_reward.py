import types
from collections import defaultdict

import pytest
import torch
from trl.trainer.reward_trainer import RewardTrainer

from align.losses.reward import reward_loss, reward_metrics

T = lambda *xs: torch.tensor(xs, dtype=torch.float64)  # noqa: E731

# Two pairs: chosen = [2, 0], rejected = [0, 1] -> diffs r_c - r_r = [2, -1]; -log sigma(d) = log(1 + e^-d)
CHOSEN, REJECTED = T(2, 0), T(0, 1)


def test_hand_worked_plain():
    # (log(1 + e^-2) + log(1 + e^1)) / 2 = (0.1269280 + 1.3132617) / 2 = 0.7200948
    assert reward_loss(CHOSEN, REJECTED).item() == pytest.approx(0.7200948493, abs=1e-9)


def test_hand_worked_margin():
    # margin [1, -1] -> d - m = [2 - 1, -1 + 1] = [1, 0]
    # (log(1 + e^-1) + log 2) / 2 = (0.3132617 + 0.6931472) / 2 = 0.5032044
    assert reward_loss(CHOSEN, REJECTED, margin=T(1, -1)).item() == pytest.approx(0.5032044341, abs=1e-9)


def test_hand_worked_centering():
    # chosen + rejected = [2, 1] -> mean of squares (4 + 1) / 2 = 2.5; 0.01 * 2.5 = 0.025
    # 0.7200948 + 0.025 = 0.7450948
    loss = reward_loss(CHOSEN, REJECTED, center_coef=0.01)
    assert loss.item() == pytest.approx(0.7450948493, abs=1e-9)
    # both terms together: 0.5032044 + 0.025
    both = reward_loss(CHOSEN, REJECTED, margin=T(1, -1), center_coef=0.01)
    assert both.item() == pytest.approx(0.5282044341, abs=1e-9)


def test_gradient_pushes_chosen_up_rejected_down():
    c, r = CHOSEN.clone().requires_grad_(), REJECTED.clone().requires_grad_()
    reward_loss(c, r).backward()
    # dL/dc_i = -sigma(-d_i) / B: -sigma(-2)/2 = -0.1192029/2 = -0.0596015;  -sigma(1)/2 = -0.7310586/2 = -0.3655293
    torch.testing.assert_close(c.grad, T(-0.0596014610, -0.3655292893), atol=1e-9, rtol=0)
    torch.testing.assert_close(r.grad, -c.grad)


def test_metrics_count_ties_as_wrong():
    # chosen [2, 0, 1] vs rejected [0, 1, 1]: 2 > 0 right, 0 > 1 wrong, 1 > 1 a tie, wrong -> accuracy 1/3
    # margin mean(2, -1, 0) = 1/3;  chosen mean 3/3 = 1;  rejected mean 2/3
    chosen = T(2, 0, 1).requires_grad_()
    m = reward_metrics(chosen, T(0, 1, 1))
    assert m == pytest.approx({"accuracy": 1 / 3, "margin": 1 / 3, "rewards/chosen": 1.0, "rewards/rejected": 2 / 3})
    assert all(type(v) is float for v in m.values())


# ---- against TRL 1.16: RewardTrainer.compute_loss (the real method, called unbound on a stand-in) ----
def trl_compute_loss(chosen, rejected, margin=None, center_coef=None):
    """Run TRL's RewardTrainer.compute_loss on [B] rewards; returns (loss, logged metrics).

    TRL's batch is [chosen; rejected] and its model returns logits [2B, 1], one reward per sequence; the
    stand-in model hands back exactly that. `center_coef=None` is TRL's "off".
    """
    identity = lambda t: t  # noqa: E731
    stand_in = types.SimpleNamespace(
        model=types.SimpleNamespace(training=True),
        args=types.SimpleNamespace(center_rewards_coefficient=center_coef),
        accelerator=types.SimpleNamespace(gather=identity, gather_for_metrics=identity),
        _metrics={"train": defaultdict(list), "eval": defaultdict(list)}, _total_train_tokens=0, _tp_size=1,
    )  # fmt: skip
    outputs = types.SimpleNamespace(logits=torch.cat([chosen, rejected])[:, None])  # [2B, 1]
    n_seq = 2 * len(chosen)
    inputs = {"input_ids": torch.zeros(n_seq, 4, dtype=torch.long), "attention_mask": torch.ones(n_seq, 4)}
    if margin is not None:
        inputs["margin"] = margin
    loss = RewardTrainer.compute_loss(stand_in, lambda **kw: outputs, inputs)
    return loss, {k: v[0] for k, v in stand_in._metrics["train"].items()}


def random_rewards(B=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(B, generator=g, dtype=torch.float64) * 2 for _ in range(3)]  # chosen, rejected, margin


@pytest.mark.parametrize("use_margin", [False, True])
@pytest.mark.parametrize("center_coef", [None, 0.01])
def test_matches_trl(use_margin, center_coef):
    chosen, rejected, margin = random_rewards()
    margin = margin.abs() if use_margin else None
    trl_loss, _ = trl_compute_loss(chosen, rejected, margin, center_coef)
    ours = reward_loss(chosen, rejected, margin=margin, center_coef=center_coef or 0.0)
    torch.testing.assert_close(ours, trl_loss, atol=1e-6, rtol=0)


def test_metrics_match_trl():
    chosen, rejected, _ = random_rewards(seed=1)
    chosen[0] = rejected[0]  # a tie: TRL counts it as wrong too
    _, trl_metrics = trl_compute_loss(chosen, rejected)
    ours = reward_metrics(chosen, rejected)
    for k in ("accuracy", "margin"):
        assert ours[k] == pytest.approx(trl_metrics[k], abs=1e-6), k
    assert trl_metrics["mean_reward"] == pytest.approx((ours["rewards/chosen"] + ours["rewards/rejected"]) / 2)
