import json
import math

import pytest
import torch

from align.losses.ppo import (
    AdaptiveKLController,
    FixedKLController,
    RunningMoments,
    entropy_from_logits,
    gae,
    kl_controller,
    kl_penalty_rewards,
    masked_mean,
    masked_var,
    masked_whiten,
    policy_loss,
    value_loss,
)

T = lambda *rows: torch.tensor(rows, dtype=torch.float64)  # noqa: E731


# ---- GAE ----
def test_gae_by_hand():
    # gamma = 1, lam = 0.95;  delta_t = r_t + gamma V_{t+1} - V_t,  A_t = delta_t + gamma lam A_{t+1}
    # row 0, all real, r = [0.1, -0.2, 1.0], V = [0.5, 0.4, 0.3]:
    #   t=2: delta = 1.0 + 0 - 0.3 = 0.7 (nothing past the end)   A = 0.7
    #   t=1: delta = -0.2 + 0.3 - 0.4 = -0.3                       A = -0.3 + 0.95 * 0.7 = 0.365
    #   t=0: delta = 0.1 + 0.4 - 0.5 = 0.0                         A = 0.0 + 0.95 * 0.365 = 0.34675
    #   returns = A + V = [0.84675, 0.765, 1.0]
    # row 1, mask [1, 1, 0], r = [0.1, 1.0, 5.0], V = [0.5, 0.4, 9.0] (5.0 and 9.0 sit on padding, must be unused):
    #   t=2: padding                                               A = 0, return 0
    #   t=1: delta = 1.0 + 0 - 0.4 = 0.6 (V=9.0 is not bootstrapped) A = 0.6
    #   t=0: delta = 0.1 + 0.4 - 0.5 = 0.0                         A = 0.95 * 0.6 = 0.57
    #   returns = [0.57 + 0.5, 0.6 + 0.4, 0] = [1.07, 1.0, 0]
    rewards = T([0.1, -0.2, 1.0], [0.1, 1.0, 5.0])
    values = T([0.5, 0.4, 0.3], [0.5, 0.4, 9.0])
    mask = T([1, 1, 1], [1, 1, 0])
    advantages, returns = gae(rewards, values, mask, gamma=1.0, lam=0.95)
    torch.testing.assert_close(advantages, T([0.34675, 0.365, 0.7], [0.57, 0.6, 0.0]), atol=1e-12, rtol=0)
    torch.testing.assert_close(returns, T([0.84675, 0.765, 1.0], [1.07, 1.0, 0.0]), atol=1e-12, rtol=0)


def reference_gae(rewards, values, lengths, gamma, lam):
    """Plain-Python GAE, one row at a time: the episode is the row's first `length` tokens."""
    advantages = [[0.0] * len(r) for r in rewards]
    returns = [[0.0] * len(r) for r in rewards]
    for b, (r, v, n) in enumerate(zip(rewards, values, lengths)):
        a = 0.0
        for t in reversed(range(n)):
            next_v = v[t + 1] if t + 1 < n else 0.0
            a = r[t] + gamma * next_v - v[t] + gamma * lam * a
            advantages[b][t], returns[b][t] = a, a + v[t]
    return advantages, returns


def test_gae_matches_double_loop():
    g = torch.Generator().manual_seed(0)
    B, L = 6, 9
    rewards, values = torch.randn(2, B, L, generator=g, dtype=torch.float64)
    lengths = [9, 1, 5, 3, 9, 7]
    mask = (torch.arange(L)[None, :] < torch.tensor(lengths)[:, None]).float()  # a float32 mask, float64 data
    advantages, returns = gae(rewards, values, mask, gamma=0.9, lam=0.8)
    ref_adv, ref_ret = reference_gae(rewards.tolist(), values.tolist(), lengths, 0.9, 0.8)
    torch.testing.assert_close(advantages, T(*ref_adv), atol=1e-12, rtol=0)
    torch.testing.assert_close(returns, T(*ref_ret), atol=1e-12, rtol=0)


def test_gae_takes_no_grad():
    values = torch.ones(1, 2, requires_grad=True)
    advantages, returns = gae(torch.ones(1, 2), values, torch.ones(1, 2), gamma=1.0, lam=1.0)
    assert not advantages.requires_grad and not returns.requires_grad


# ---- rewards ----
def test_kl_penalty_rewards_score_on_last_real_token():
    # kl_coef 0.1; kl = (logprobs - ref) * mask
    #   row 0 (3 real): [-1 + 1.5, -2 + 1, -0.5 + 0.5] = [0.5, -1.0, 0.0]
    #   row 1 (2 real): [-0.3 + 0.1, -1.2 + 1.0, padding] = [-0.2, -0.2, 0]   (-9 + 2 = -7 is masked)
    # rewards = -0.1 * kl, plus the score on the last real token (t=2 for row 0, t=1 for row 1):
    #   row 0: [-0.05, 0.1, 0 + 2.0] = [-0.05, 0.1, 2.0]
    #   row 1: [0.02, 0.02 - 1.0, 0] = [0.02, -0.98, 0.0]
    logprobs = T([-1.0, -2.0, -0.5], [-0.3, -1.2, -9.0])
    ref_logprobs = T([-1.5, -1.0, -0.5], [-0.1, -1.0, -2.0])
    mask = torch.tensor([[True, True, True], [True, True, False]])
    rewards, kl = kl_penalty_rewards(logprobs, ref_logprobs, T(2.0, -1.0), mask, kl_coef=0.1)
    torch.testing.assert_close(kl, T([0.5, -1.0, 0.0], [-0.2, -0.2, 0.0]), atol=1e-12, rtol=0)
    torch.testing.assert_close(rewards, T([-0.05, 0.1, 2.0], [0.02, -0.98, 0.0]), atol=1e-12, rtol=0)


def test_kl_penalty_rewards_rejects_empty_response():
    with pytest.raises(ValueError, match="at least one real token"):
        kl_penalty_rewards(torch.zeros(2, 3), torch.zeros(2, 3), torch.ones(2), T([1, 0, 0], [0, 0, 0]), 0.1)


# ---- losses ----
def test_policy_loss_by_hand():
    # clip 0.2 -> ratios are clamped to [0.8, 1.2]; per token max(-A r, -A clamp(r))
    #   t0: A = +1, r = 1.1 (inside)      -> max(-1.1, -1.1) = -1.1   not clipped
    #   t1: A = +2, r = 1.5 (> 1.2)       -> max(-3.0, -2.4) = -2.4   clipped
    #   t2: A = -1, r = 0.5 (< 0.8)       -> max( 0.5,  0.8) =  0.8   clipped
    #   t3: padding (A = 5, r = 10 would dominate if counted)
    # loss = (-1.1 - 2.4 + 0.8) / 3 = -0.9;  clipfrac = 2/3
    # approxkl = 0.5 * (ln(1.1)^2 + ln(1.5)^2 + ln(0.5)^2) / 3
    #          = 0.5 * (0.0090840 + 0.1644020 + 0.4804530) / 3 = 0.5 * 0.6539390 / 3 = 0.1089898
    old = T([-1.0, -1.0, -1.0, -1.0])
    logprobs = (old + torch.log(T([1.1, 1.5, 0.5, 10.0]))).requires_grad_()
    mask = T([1, 1, 1, 0])
    loss, metrics = policy_loss(logprobs, old, T([1.0, 2.0, -1.0, 5.0]), mask, clip=0.2)
    assert loss.item() == pytest.approx(-0.9, abs=1e-12)
    assert metrics == pytest.approx({"clipfrac": 2 / 3, "approxkl": 0.1089898330}, abs=1e-9)
    # only the unclipped token passes gradient: d(-A r / 3)/d logprob = -A r / 3 = -1.1 / 3
    loss.backward()
    torch.testing.assert_close(logprobs.grad, T([-1.1 / 3, 0.0, 0.0, 0.0]), atol=1e-12, rtol=0)


def test_value_loss_by_hand():
    # clip 0.2; clipped = old + clamp(v - old, -0.2, 0.2)
    #   t0: old 1.0, v 1.5, R 2.0 -> clipped 1.2; (1.5 - 2)^2 = 0.25, (1.2 - 2)^2 = 0.64 -> 0.64, clipped counts
    #   t1: old 1.0, v 1.1, R 0.0 -> clipped 1.1; both (1.1)^2 = 1.21                -> 1.21, not counted
    #   t2: old 1.0, v 0.5, R 0.0 -> clipped 0.8; (0.5)^2 = 0.25, (0.8)^2 = 0.64     -> 0.64, clipped counts
    #   t3: padding
    # loss = 0.5 * (0.64 + 1.21 + 0.64) / 3 = 0.5 * 2.49 / 3 = 0.415;  clipfrac = 2/3
    values = T(1.5, 1.1, 0.5, 10.0)
    loss, metrics = value_loss(values, T(1.0, 1.0, 1.0, 0.0), T(2.0, 0.0, 0.0, -10.0), T(1, 1, 1, 0), clip=0.2)
    assert loss.item() == pytest.approx(0.415, abs=1e-12)
    assert metrics == pytest.approx({"clipfrac": 2 / 3}, abs=1e-12)


# ---- masked statistics ----
def test_masked_whiten_by_hand():
    # real [1, 2, 3]: mean 2, unbiased var ((-1)^2 + 0 + 1^2) / (3 - 1) = 1 -> whitened [-1, 0, 1]
    x, mask = T(1.0, 2.0, 3.0, 100.0), T(1, 1, 1, 0)
    whitened = masked_whiten(x, mask)[:3]
    torch.testing.assert_close(whitened, T(-1.0, 0.0, 1.0), atol=1e-7, rtol=0)
    torch.testing.assert_close(masked_whiten(x, mask, shift_mean=False)[:3], T(1.0, 2.0, 3.0), atol=1e-7, rtol=0)


def test_masked_whiten_ignores_padding():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(4, 6, generator=g, dtype=torch.float64) * 3 + 7
    mask = torch.arange(6)[None, :] < torch.tensor([6, 2, 4, 5])[:, None]  # [4, 6] bool
    whitened = masked_whiten(x, mask)
    assert masked_mean(whitened, mask).item() == pytest.approx(0.0, abs=1e-9)
    assert masked_var(whitened, mask).item() == pytest.approx(1.0, abs=1e-6)
    # the statistics do not see padded values
    garbage = torch.where(mask, x, 1e6)
    torch.testing.assert_close(masked_whiten(garbage, mask)[mask], whitened[mask])
    # mean and var match plain torch on the real values alone
    real = x[mask]
    assert masked_mean(x, mask).item() == pytest.approx(real.mean().item())
    assert masked_var(x, mask).item() == pytest.approx(real.var().item())
    assert masked_var(x, mask, unbiased=False).item() == pytest.approx(real.var(unbiased=False).item())


def test_masked_mean_along_dim():
    # rows [1, 2, (9)] and [4, (9), (9)] -> per-row means 1.5 and 4
    x, mask = T([1, 2, 9], [4, 9, 9]), T([1, 1, 0], [1, 0, 0])
    torch.testing.assert_close(masked_mean(x, mask, dim=1), T(1.5, 4.0))


def test_masked_var_needs_two_values():
    with pytest.raises(ValueError, match="at least 2"):
        masked_var(T(1.0, 2.0), T(1, 0))


# ---- entropy ----
def test_entropy_from_logits():
    V = 7
    # uniform over V: H = log V, whatever the common offset
    torch.testing.assert_close(entropy_from_logits(torch.full((2, 3, V), 3.0)), torch.full((2, 3), math.log(V)))
    # p = softmax([0, ln 3]) = [1/4, 3/4]: H = -(0.25 ln 0.25 + 0.75 ln 0.75) = 0.5623351
    assert entropy_from_logits(torch.tensor([0.0, math.log(3.0)])).item() == pytest.approx(0.5623351446, abs=1e-6)
    # nearly one-hot: H ~ 3 * 100 * e^-100 ~ 0
    assert entropy_from_logits(torch.tensor([100.0, 0.0, 0.0, 0.0])).item() == pytest.approx(0.0, abs=1e-6)


# ---- KL controllers ----
def test_adaptive_kl_controller_by_hand():
    # target 6, horizon 10000, n_steps 1000 -> mult = 1 + clip(kl / 6 - 1, -0.2, 0.2) * 0.1
    ctl = AdaptiveKLController(0.1, target=6.0, horizon=10000)
    ctl.update(6.6, n_steps=1000)  # error 6.6/6 - 1 = 0.1            -> 0.1 * 1.01 = 0.101
    assert ctl.value == pytest.approx(0.101, abs=1e-12)
    ctl.update(12.0, n_steps=1000)  # error 12/6 - 1 = 1, clipped to 0.2 -> 0.101 * 1.02 = 0.10302
    assert ctl.value == pytest.approx(0.10302, abs=1e-12)
    ctl.update(torch.tensor(0.0), n_steps=1000)  # error -1, clipped to -0.2 -> 0.10302 * 0.98 = 0.1009596
    assert ctl.value == pytest.approx(0.1009596, abs=1e-12)

    restored = AdaptiveKLController(0.5, target=6.0, horizon=10000)
    restored.load_state_dict(json.loads(json.dumps(ctl.state_dict())))
    assert ctl.state_dict() == {"value": pytest.approx(0.1009596, abs=1e-12)}
    ctl.update(3.0, 500), restored.update(3.0, 500)
    assert restored.value == ctl.value


def test_fixed_kl_controller_and_factory():
    ctl = kl_controller(0.05, target=None, horizon=10000)
    assert type(ctl) is FixedKLController
    ctl.update(100.0, n_steps=1000)
    assert ctl.value == 0.05
    ctl.load_state_dict({"value": 0.2})
    assert ctl.state_dict() == {"value": 0.2}
    assert type(kl_controller(0.05, target=6.0, horizon=10000)) is AdaptiveKLController
    with pytest.raises(ValueError, match="target and horizon"):
        kl_controller(0.05, target=0.0, horizon=10000)


# ---- running reward moments ----
def test_running_moments_by_hand():
    # batches [1, 2] and [3, 4, 5] -> all of 1..5: mean 3, unbiased var (4 + 1 + 0 + 1 + 4) / 4 = 2.5
    rm = RunningMoments()
    rm.update(T(1, 2))
    rm.update(T(3, 4, 5))
    assert rm.mean == pytest.approx(3.0, abs=1e-12)
    assert rm.std == pytest.approx(math.sqrt(2.5), abs=1e-12)
    # normalize: (5 - 3) / sqrt(2.5) = 1.2649111
    assert rm.normalize(torch.tensor([5.0])).item() == pytest.approx(1.2649111, abs=1e-6)


def test_running_moments_match_concatenation_and_round_trip():
    g = torch.Generator().manual_seed(0)
    batches = [torch.randn(n, generator=g) * 4 + 10 for n in (3, 1, 8, 5, 2)]
    rm = RunningMoments()
    for b in batches[:3]:
        rm.update(b)
    restored = RunningMoments()
    restored.load_state_dict(json.loads(json.dumps(rm.state_dict())))
    for b in batches[3:]:
        rm.update(b)
        restored.update(b)
    everything = torch.cat(batches).double()
    assert rm.mean == pytest.approx(everything.mean().item(), abs=1e-9)
    assert rm.std == pytest.approx(everything.std().item(), abs=1e-9)
    assert rm.count == len(everything)
    assert restored.state_dict() == rm.state_dict()


def test_running_moments_needs_two_samples():
    rm = RunningMoments()
    rm.update(T(1.0))
    with pytest.raises(ValueError, match="at least 2"):
        rm.normalize(T(1.0))
