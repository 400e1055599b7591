import math

import pytest
import torch

from align.losses.dpo import dpo_loss
from align.losses.rank import (
    RANK_LOSS_TYPES,
    _lambda_weights,
    lipo_lambda_loss,
    plackett_luce_loss,
    pro_loss,
    ranking_metrics,
    rrhf_loss,
)

T = lambda *rows: torch.tensor(rows, dtype=torch.float64)  # noqa: E731  [B, K] from rows
LN2, LN3, LN4 = math.log(2), math.log(3), math.log(4)


def run(loss_type, pi, ref, lengths, scores, mask):
    """Call one loss with fixed hyperparameters; the reference-free ones ignore ref, the others lengths."""
    if loss_type == "plackett_luce":
        return plackett_luce_loss(pi, ref, scores, mask, beta=0.3)
    if loss_type == "lipo":
        return lipo_lambda_loss(pi, ref, scores, mask, beta=0.3)
    if loss_type == "pro":
        return pro_loss(pi, lengths, scores, mask, sft_weight=0.5)
    return rrhf_loss(pi, lengths, scores, mask, sft_weight=0.5)


def all_real(scores):
    return torch.ones_like(scores, dtype=torch.bool)


# ---- Plackett-Luce ----
def test_plackett_luce_hand_worked():
    # r = beta*(pi - ref) = (0, ln3, ln2) with beta = 0.5; scores (1, 3, 2) order them y1 > y2 > y0, so
    #   k=1: ln3 - ln(1 + 3 + 2) = ln(1/2);  k=2: ln2 - ln(2 + 1) = ln(2/3)
    #   loss = -ln(1/2) - ln(2/3) = ln(2 * 3/2) = ln 3 = 1.0986123
    ref = T([-7.0, -3.0, -5.0])
    pi = ref + T([0.0, LN3, LN2]) / 0.5
    scores = T([1.0, 3.0, 2.0])
    out = plackett_luce_loss(pi, ref, scores, all_real(scores), beta=0.5)
    torch.testing.assert_close(out.losses, T(LN3), atol=1e-6, rtol=0)
    torch.testing.assert_close(out.rewards, T([0.0, LN3, LN2]), atol=1e-9, rtol=0)


@pytest.mark.parametrize(
    "r, scores, expected",
    [
        # best alone, worst two tied: only y0 is a pick, against everyone: ln3 - ln(3+2+1) -> loss ln 2
        ((LN3, LN2, 0.0), (2.0, 1.0, 1.0), LN2),
        # the same with the tied pair's rewards swapped: Breslow does not care how a tie is broken
        ((LN3, 0.0, LN2), (2.0, 1.0, 1.0), LN2),
        # best two tied: both pick from all three: ln(3/6) + ln(2/6) -> loss ln 2 + ln 3 = ln 6
        ((LN3, LN2, 0.0), (2.0, 2.0, 1.0), math.log(6)),
        # tie in the middle: ln(4/10) + ln(3/(3+2+1)) + ln(2/6), the worst adds nothing
        #   -> loss ln(10/4) + ln 2 + ln 3 = ln 15
        ((LN4, LN3, LN2, 0.0), (3.0, 2.0, 2.0, 1.0), math.log(15)),
    ],
)
def test_plackett_luce_breslow_ties(r, scores, expected):
    scores = T(scores)
    out = plackett_luce_loss(T(r), torch.zeros_like(scores), scores, all_real(scores), beta=1.0)
    torch.testing.assert_close(out.losses, T(expected), atol=1e-6, rtol=0)


@pytest.mark.parametrize("seed", range(4))
def test_plackett_luce_at_k2_is_dpo_sigmoid(seed):
    g = torch.Generator().manual_seed(seed)
    B, beta = 16, 0.1 + seed * 0.2
    pc, pr, rc, rr = (-torch.rand(B, generator=g, dtype=torch.float64) * 40 for _ in range(4))
    chosen_first = torch.rand(B, generator=g) < 0.5  # put the chosen response in either column
    col = lambda c, r: torch.stack([c.where(chosen_first, r), r.where(chosen_first, c)], -1)  # noqa: E731  [B, 2]
    scores = col(torch.ones(B, dtype=torch.float64), torch.zeros(B, dtype=torch.float64))
    out = plackett_luce_loss(col(pc, pr), col(rc, rr), scores, all_real(scores), beta=beta)
    dpo = dpo_loss(pc, pr, rc, rr, beta=beta)
    torch.testing.assert_close(out.losses, dpo.losses, atol=1e-6, rtol=0)
    torch.testing.assert_close(out.rewards, col(dpo.chosen_rewards, dpo.rejected_rewards), atol=1e-9, rtol=0)


# ---- LiPO-lambda ----
# beta = 0.1, pi - ref = (2, 5, -1) -> s = (0.2, 0.5, -0.1); scores (3, 1, 2) -> psi = (2, 0, 1), G = (3, 0, 1).
# Ranked by s: y1 first, y0 second, y2 third -> tau = (2, 1, 3), 1/D = 1/log2(1 + tau) = (0.6309298, 1, 0.5).
# Pairs with psi_i > psi_j and their weights |G_i - G_j| * |1/D_i - 1/D_j|:
#   (0,1): 3 * 0.3690702 = 1.1072107   (0,2): 2 * 0.1309298 = 0.2618595   (2,1): 1 * 0.5 = 0.5
LIPO_PI, LIPO_REF, LIPO_SCORES = T([-8.0, -5.0, -11.0]), T([-10.0, -10.0, -10.0]), T([3.0, 1.0, 2.0])


def test_lipo_lambda_weights_hand_worked():
    s = 0.1 * (LIPO_PI - LIPO_REF)
    weights = _lambda_weights(s, LIPO_SCORES, all_real(LIPO_SCORES))
    expected = T([[0.0, 1.1072107393, 0.2618595071], [0.0, 0.0, 0.0], [0.0, 0.5, 0.0]])
    torch.testing.assert_close(weights, expected, atol=1e-9, rtol=0)  # both [1, 3, 3]


@pytest.mark.parametrize("scores", [LIPO_SCORES, T([30.0, -10.0, 20.0])])  # only the order of scores counts
def test_lipo_hand_worked(scores):
    # -log sigma(x) = log(1 + e^-x): (0,1) x = 0.2 - 0.5 = -0.3 -> 0.8543552;  (0,2) x = 0.3 -> 0.5543552;
    #   (2,1) x = -0.6 -> 1.0374880
    # loss = 1.1072107*0.8543552 + 0.2618595*0.5543552 + 0.5*1.0374880 = 0.9459530 + 0.1451630 + 0.5187440
    out = lipo_lambda_loss(LIPO_PI, LIPO_REF, scores, all_real(scores), beta=0.1)
    torch.testing.assert_close(out.losses, T(1.6098584682), atol=1e-6, rtol=0)


def test_lipo_at_k2_is_scaled_dpo():
    # two responses: G = (1, 0), 1/D = (1, 1/log2 3) whatever the model's order -> Delta = 1 - 1/log2 3
    pc, pr, rc, rr = T(-3.0, -9.0), T(-5.0, -2.0), T(-4.0, -6.0), T(-4.0, -3.0)
    out = lipo_lambda_loss(torch.stack([pc, pr], -1), torch.stack([rc, rr], -1), T([1.0, 0.0], [1.0, 0.0]),
                           torch.ones(2, 2, dtype=torch.bool), beta=0.2)  # fmt: skip
    torch.testing.assert_close(out.losses, (1 - 1 / math.log2(3)) * dpo_loss(pc, pr, rc, rr, beta=0.2).losses)


# ---- PRO ----
@pytest.mark.parametrize(
    "logps, lengths, scores, expected",
    [
        # r = logps / lengths = (-2, -1, -3); order y1 > y0 > y2:
        #   k=1: -1 - ln(e^-1 + e^-2 + e^-3) = -ln(1 + e^-1 + e^-2) = -0.4076060
        #   k=2: -2 - ln(e^-2 + e^-3) = -ln(1 + e^-1) = -0.3132617
        #   L_rank = 0.7208677;  SFT on y1: -r_1 = 1, times sft_weight 0.5 -> total 1.2208677
        ((-8.0, -2.0, -3.0), (4, 2, 1), (2.0, 3.0, 1.0), 1.2208676520),
        # best two tied (Breslow): (-1 - ln(e^-1 + e^-2 + e^-3)) + (-2 - ln(same)) = -0.4076060 - 1.4076060;
        #   SFT on the first best, y0: 1 * 0.5 -> total 1.8152119 + 0.5 = 2.3152119
        ((-1.0, -2.0, -3.0), (1, 1, 1), (3.0, 3.0, 1.0), 2.3152119289),
    ],
)
def test_pro_hand_worked(logps, lengths, scores, expected):
    scores = T(scores)
    out = pro_loss(T(logps), torch.tensor([lengths]), scores, all_real(scores), sft_weight=0.5)
    torch.testing.assert_close(out.losses, T(expected), atol=1e-6, rtol=0)
    torch.testing.assert_close(out.rewards, T(logps) / torch.tensor([lengths]), atol=1e-9, rtol=0)


# ---- RRHF ----
def test_rrhf_correct_order_has_zero_ranking_loss():
    # p = logps / lengths = (-4/4, -3/1, -10/5) = (-1, -3, -2); scores (3, 1, 2) rank y0 > y2 > y1, as p does:
    #   every hinge max(0, p_worse - p_better) is 0; L_ft = -logps of y0 = 4 (summed over its tokens)
    logps, lengths, scores = T([-4.0, -3.0, -10.0]).requires_grad_(), torch.tensor([[4, 1, 5]]), T([3.0, 1.0, 2.0])
    out = rrhf_loss(logps, lengths, scores, all_real(scores), sft_weight=0.0)
    out.losses.sum().backward()
    assert out.losses.item() == 0.0 and (logps.grad == 0).all()
    out = rrhf_loss(logps, lengths, scores, all_real(scores))
    torch.testing.assert_close(out.losses, T(4.0))


def test_rrhf_hand_worked():
    # p = (-1, -3, -2) as above, but scores (1, 3, 2) now rank y1 > y2 > y0, against p's order:
    #   (y0 below y1): max(0, -1 + 3) = 2;  (y0 below y2): max(0, -1 + 2) = 1;  (y2 below y1): max(0, -2 + 3) = 1
    #   L_rank = 4;  L_ft = -logps of y1 = 3;  total = 4 + 0.5 * 3 = 5.5
    logps, lengths, scores = T([-4.0, -3.0, -10.0]), torch.tensor([[4, 1, 5]]), T([1.0, 3.0, 2.0])
    out = rrhf_loss(logps, lengths, scores, all_real(scores), sft_weight=0.5)
    torch.testing.assert_close(out.losses, T(5.5))
    torch.testing.assert_close(out.rewards, T([-1.0, -3.0, -2.0]))


# ---- all losses: padding, gradients ----
def random_groups(B=4, K=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    pi = -torch.rand(B, K, generator=g, dtype=torch.float64) * 40
    ref = -torch.rand(B, K, generator=g, dtype=torch.float64) * 40
    lengths = torch.randint(1, 30, (B, K), generator=g)
    scores = T([2.0, 0.0, 1.0], [1.0, 1.0, 0.0], [0.0, 3.0, 3.0], [5.0, 2.0, 7.0])  # with ties
    mask = all_real(scores).clone()
    mask[0, 1] = False  # group 0 holds two responses
    return pi, ref, lengths, scores, mask


@pytest.mark.parametrize("loss_type", RANK_LOSS_TYPES)
@pytest.mark.parametrize("pad_score", [100.0, -100.0])  # padding scored above, then below, every real response
def test_padding_changes_nothing(loss_type, pad_score):
    pi, ref, lengths, scores, mask = random_groups()
    pi.requires_grad_()
    narrow = run(loss_type, pi, ref, lengths, scores, mask)
    narrow.losses.sum().backward()

    # widen to K=5: real responses at columns 0, 2, 4; columns 1, 3 padding with hostile values
    # (extreme scores, huge log-probs, zero lengths) that would change the loss if any of it leaked in
    cols, B = [0, 2, 4], len(pi)
    wide = lambda x, fill: torch.full((B, 5), fill, dtype=x.dtype).index_copy(1, torch.tensor(cols), x)  # noqa: E731
    wide_pi = wide(pi.detach(), 500.0).requires_grad_()
    out = run(loss_type, wide_pi, wide(ref, -900.0), wide(lengths, 0), wide(scores, pad_score), wide(mask, False))
    out.losses.sum().backward()

    torch.testing.assert_close(out.losses, narrow.losses, atol=1e-9, rtol=0)
    torch.testing.assert_close(out.rewards[:, cols], narrow.rewards, atol=1e-9, rtol=0)
    torch.testing.assert_close(wide_pi.grad[:, cols], pi.grad, atol=1e-9, rtol=0)
    assert (wide_pi.grad[:, [1, 3]] == 0).all()


@pytest.mark.parametrize("loss_type", RANK_LOSS_TYPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("scale", [1.0, 10.0])  # x10: log-probs down to -400, softmaxes saturate
def test_gradients_are_finite_and_reach_every_real_response(loss_type, dtype, scale):
    pi, ref, lengths, scores, mask = random_groups(seed=3)
    pi = (pi * scale).to(dtype).requires_grad_()
    ref[~mask] = float("-1e30")  # padding may hold any finite value
    out = run(loss_type, pi, ref.to(dtype), lengths, scores.to(dtype), mask)
    out.losses.mean().backward()
    assert torch.isfinite(out.losses).all() and torch.isfinite(pi.grad).all()
    assert (pi.grad[~mask] == 0).all()
    if scale == 1.0 and loss_type != "rrhf":  # RRHF's hinge is flat on correctly ordered pairs
        assert (pi.grad[mask] != 0).all()


def test_beta_must_be_positive():
    pi, ref, _, scores, mask = random_groups()
    for loss in (plackett_luce_loss, lipo_lambda_loss):
        with pytest.raises(ValueError, match="beta"):
            loss(pi, ref, scores, mask, beta=0.0)


# ---- metrics ----
def test_ranking_metrics_hand_worked():
    scores = T([1.0, 3.0, 2.0, 9.0], [1.0, 2.0, 1.0, 5.0], [5.0, 7.0, 0.0, 0.0])
    rewards = T([0.2, 0.3, 0.1, 8.0], [0.0, 0.5, 0.5, 9.0], [1.0, 1.0, -3.0, 4.0])
    mask = torch.tensor([[True, True, True, False], [True, True, True, False], [True, True, False, False]])
    # group 0: order y1 > y2 > y0, rewards 0.3, 0.1, 0.2: pairs (1,2) ok, (1,0) ok, (2,0) wrong -> 2/3;
    #   tau-b: 2 concordant, 1 discordant, no ties -> (2 - 1) / 3 = 1/3
    # group 1: order y1 > y0 = y2 (stable: y1, y0, y2), rewards 0.5, 0.0, 0.5: pairs (1,0) ok, (1,2) reward tie
    #   -> wrong: 1/2; tau-b: n_c - n_d = 1 (pair 0,1), 3 pairs with 1 score tie and 1 reward tie
    #   -> 1 / sqrt((3 - 1) * (3 - 1)) = 0.5
    # group 2: order y1 > y0, rewards tied -> 0/1; rewards have no variance -> tau 0
    # accuracy = (2 + 1 + 0) / (3 + 2 + 1) = 0.5;  tau = (1/3 + 1/2 + 0) / 3 = 0.2777778
    # rank_0 = (0.3 + 0.5 + 1.0) / 3 = 0.6;  rank_1 = (0.1 + 0.0 + 1.0) / 3 = 0.3666667;
    # rank_2 = (0.2 + 0.5) / 2 = 0.35 (group 2 has no third response; padding is never ranked)
    metrics = ranking_metrics(rewards, scores, mask)
    expected = {"rank/accuracy": 0.5, "rank/kendall_tau": 5 / 18,
                "rewards/rank_0": 0.6, "rewards/rank_1": 1.1 / 3, "rewards/rank_2": 0.35}  # fmt: skip
    assert metrics.keys() == expected.keys()
    for k, v in expected.items():
        assert isinstance(metrics[k], float) and metrics[k] == pytest.approx(v, abs=1e-9), k


def kendall_tau_b(x, y):
    """Reference tau-b over one group's lists: scipy's if installed, else counted pair by pair."""
    try:
        from scipy.stats import kendalltau
    except ImportError:
        pairs = [(i, j) for i in range(len(x)) for j in range(i + 1, len(x))]
        sign = lambda v: (v > 0) - (v < 0)  # noqa: E731
        dx, dy = [sign(x[i] - x[j]) for i, j in pairs], [sign(y[i] - y[j]) for i, j in pairs]
        untied = sum(a != 0 for a in dx) * sum(b != 0 for b in dy)
        return sum(a * b for a, b in zip(dx, dy)) / math.sqrt(untied) if untied else 0.0
    tau = kendalltau(x, y).statistic
    return 0.0 if math.isnan(tau) else tau


def test_kendall_tau_matches_reference_with_ties():
    g = torch.Generator().manual_seed(0)
    B, K = 32, 6
    scores = torch.randint(0, 4, (B, K), generator=g).double()  # many ties
    rewards = torch.randint(0, 3, (B, K), generator=g).double()
    rewards[0] = 1.0  # a group with no reward variance
    mask = torch.rand(B, K, generator=g) < 0.8
    mask[:, :2] = True
    scores[:, 0], scores[:, 1] = 5.0, -1.0  # >= 2 real responses with different scores
    expected = sum(kendall_tau_b(scores[b][mask[b]].tolist(), rewards[b][mask[b]].tolist()) for b in range(B)) / B
    assert ranking_metrics(rewards, scores, mask)["rank/kendall_tau"] == pytest.approx(expected, abs=1e-9)
