import types
from collections import defaultdict

import pytest
import torch
from trl import DPOTrainer

from align.losses.dpo import LOSS_TYPES, dpo_loss, dpo_metrics, uses_mean_logps

T = lambda *xs: torch.tensor(xs, dtype=torch.float64)  # noqa: E731

# Two pairs, beta = 0.1.  h = (pc - rc) - (pr - rr)
#   pair 0: pc=-1, pr=-3,  rc=-2, rr=-2 -> h = (-1+2) - (-3+2) = 1 - (-1) = 2,  beta*h = 0.2
#   pair 1: pc=-1, pr=-13, rc=-1, rr=-1 -> h = 0 - (-12)       = 12,           beta*h = 1.2
PC, PR, RC, RR = T(-1, -1), T(-3, -13), T(-2, -1), T(-2, -1)


@pytest.mark.parametrize(
    "loss_type, eps, expected",
    [
        # -log sigma(x) = log(1 + e^-x): log(1 + 0.8187308) = 0.5981389, log(1 + e^-1.2) = 0.2632825
        ("sigmoid", 0.0, (0.5981388694, 0.2632824673)),
        # cDPO: -(1-eps) log s(x) - eps log s(-x), and -log s(-x) = x - log s(x), so loss = -log s(x) + eps*x
        #   0.5981389 + 0.1*0.2 = 0.6181389;  0.2632825 + 0.1*1.2 = 0.3832825
        ("sigmoid", 0.1, (0.6181388694, 0.3832824673)),
        # IPO: (h - 1/(2 beta))^2 = (2 - 5)^2 = 9;  (12 - 5)^2 = 49
        ("ipo", 0.0, (9.0, 49.0)),
        # hinge: relu(1 - beta*h) = relu(0.8) = 0.8;  relu(1 - 1.2) = 0
        ("hinge", 0.0, (0.8, 0.0)),
    ],
)
def test_hand_worked(loss_type, eps, expected):
    out = dpo_loss(PC, PR, RC, RR, beta=0.1, loss_type=loss_type, label_smoothing=eps)
    torch.testing.assert_close(out.losses, T(*expected), atol=1e-6, rtol=0)
    # rewards: beta*(pc - rc) = 0.1*1 = 0.1, 0.1*0 = 0;  beta*(pr - rr) = 0.1*(-1) = -0.1, 0.1*(-12) = -1.2
    torch.testing.assert_close(out.chosen_rewards, T(0.1, 0.0), atol=1e-6, rtol=0)
    torch.testing.assert_close(out.rejected_rewards, T(-0.1, -1.2), atol=1e-6, rtol=0)


def test_bad_arguments():
    with pytest.raises(ValueError, match="sigmoid, ipo, hinge"):
        dpo_loss(PC, PR, RC, RR, beta=0.1, loss_type="kto")
    with pytest.raises(ValueError, match="label_smoothing"):
        dpo_loss(PC, PR, RC, RR, beta=0.1, loss_type="ipo", label_smoothing=0.1)
    assert [uses_mean_logps(t) for t in LOSS_TYPES] == [False, True, False]


# ---- against TRL 1.16: DPOTrainer._compute_loss (the real method, called unbound on a stand-in) ----
def trl_compute_loss(loss_type, beta, eps, pc, pr, rc, rr, n_c, n_r):
    """Run TRL's DPOTrainer._compute_loss on [B] summed log-probs; returns (mean loss, logged metrics).

    The stand-in model returns what TRL's fused LM head returns: per-token log-probs, zero outside the
    completion. Completion i has n tokens after a one-token prompt; its logp is spread evenly over them.
    Reference log-probs go in precomputed, as TRL's `precompute_ref_log_probs` path does.
    """
    logps, lens = torch.cat([pc, pr]), torch.cat([n_c, n_r])  # [2B], TRL's batch is [chosen; rejected]
    L = 1 + int(lens.max())
    completion_mask = (torch.arange(L)[None, :] >= 1) & (torch.arange(L)[None, :] <= lens[:, None])  # [2B, L]
    shift_mask = completion_mask[:, 1:].double()  # [2B, L-1]
    zeros = torch.zeros_like(shift_mask)
    outputs = types.SimpleNamespace(
        log_probs=shift_mask * (logps / lens)[:, None], entropy=zeros, mean_logits=zeros, is_top1=zeros.bool()
    )
    identity = lambda t: t  # noqa: E731
    stand_in = types.SimpleNamespace(
        model=types.SimpleNamespace(training=True), ref_model=None, precompute_ref_logps=True,
        accelerator=types.SimpleNamespace(device="cpu", gather=identity, gather_for_metrics=identity),
        aux_loss_enabled=False, ld_alpha=None, f_divergence_type="reverse_kl", use_weighting=False,
        loss_types=[loss_type], loss_weights=[1.0], beta=beta, label_smoothing=eps,
        _metrics={"train": defaultdict(list)}, _total_train_tokens=0, _tp_size=1,
    )  # fmt: skip
    inputs = {
        "input_ids": torch.zeros(len(logps), L, dtype=torch.long), "attention_mask": torch.ones(len(logps), L),
        "completion_mask": completion_mask.long(), "ref_chosen_logps": rc, "ref_rejected_logps": rr,
    }  # fmt: skip
    loss = DPOTrainer._compute_loss(stand_in, lambda **kw: outputs, inputs, return_outputs=False)
    return loss, {k: v[0] for k, v in stand_in._metrics["train"].items()}


def random_batch(B=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    logps = [-torch.rand(B, generator=g, dtype=torch.float64) * 40 for _ in range(4)]  # pc, pr, rc, rr
    lens = [torch.randint(1, 20, (B,), generator=g) for _ in range(2)]  # n_c, n_r
    return logps, lens


@pytest.mark.parametrize(
    "ours, trl, eps",
    # TRL 1.16's "sigmoid" ignores label_smoothing; the cDPO formula lives only in its "aot" branch,
    # which sorts the batch's log-ratios first -- a no-op for one pair, so we compare pair by pair.
    [("sigmoid", "sigmoid", 0.0), ("ipo", "ipo", 0.0), ("hinge", "hinge", 0.0), ("sigmoid", "aot", 0.2)],
)
def test_matches_trl_per_pair(ours, trl, eps):
    (pc, pr, rc, rr), (n_c, n_r) = random_batch()
    if uses_mean_logps(ours):  # TRL divides the summed log-ratios by completion length
        out = dpo_loss(pc / n_c, pr / n_r, rc / n_c, rr / n_r, beta=0.3, loss_type=ours, label_smoothing=eps)
    else:
        out = dpo_loss(pc, pr, rc, rr, beta=0.3, loss_type=ours, label_smoothing=eps)
    for i in range(len(pc)):
        s = slice(i, i + 1)
        trl_loss, _ = trl_compute_loss(trl, 0.3, eps, pc[s], pr[s], rc[s], rr[s], n_c[s], n_r[s])
        torch.testing.assert_close(out.losses[i], trl_loss, atol=1e-6, rtol=0)


def test_trl_sigmoid_ignores_label_smoothing():  # guards the note above if TRL changes
    (pc, pr, rc, rr), (n_c, n_r) = random_batch()
    smoothed, _ = trl_compute_loss("sigmoid", 0.3, 0.2, pc, pr, rc, rr, n_c, n_r)
    plain = dpo_loss(pc, pr, rc, rr, beta=0.3).losses.mean()
    torch.testing.assert_close(smoothed, plain, atol=1e-6, rtol=0)


def test_metrics_match_trl():
    (pc, pr, rc, rr), (n_c, n_r) = random_batch(B=8)
    rc[0], pc[0], pr[0], rr[0] = -5.0, -5.0, -7.0, -7.0  # a tie: equal rewards count as not accurate
    n_c[0] = n_r[0] = 1  # one token each, so the stand-in's per-token spread keeps the tie exact
    trl_loss, trl_metrics = trl_compute_loss("sigmoid", 0.1, 0.0, pc, pr, rc, rr, n_c, n_r)
    out = dpo_loss(pc, pr, rc, rr, beta=0.1)
    ours = dpo_metrics(out, pc, pr)
    torch.testing.assert_close(out.losses.mean(), trl_loss, atol=1e-6, rtol=0)
    assert set(ours) <= set(trl_metrics)
    for k, v in ours.items():
        assert v == pytest.approx(trl_metrics[k], abs=1e-6), k
    assert ours["rewards/accuracies"] == pytest.approx((out.chosen_rewards[1:] > out.rejected_rewards[1:]).sum() / 8)


def test_sigmoid_gradient_pushes_chosen_up_rejected_down():
    pc, pr = T(-1, -1).requires_grad_(), T(-3, -13).requires_grad_()
    dpo_loss(pc, pr, RC, RR, beta=0.1).losses.sum().backward()
    assert (pc.grad < 0).all() and (pr.grad > 0).all()  # gradient descent raises pc, lowers pr
    # dL/dpc = -beta * sigma(-beta*h) = -0.1 * sigma(-0.2) = -0.1 * 0.450166 = -0.0450166
    assert pc.grad[0].item() == pytest.approx(-0.0450166003, abs=1e-6)
    torch.testing.assert_close(pr.grad, -pc.grad)
