import functools
import math
import types
from collections import defaultdict

import pytest
import torch
from trl import KTOTrainer
from trl.experimental.cpo import CPOTrainer
from trl.experimental.orpo import ORPOTrainer

from align.losses.dpo import dpo_loss, kto_kl_estimate, kto_loss, orpo_loss, simpo_loss

T = lambda *xs: torch.tensor(xs, dtype=torch.float64)  # noqa: E731
assert_close = functools.partial(torch.testing.assert_close, atol=1e-6, rtol=0)
identity = lambda t: t  # noqa: E731
# a one-process accelerator
CPU = types.SimpleNamespace(device="cpu", gather=identity, gather_for_metrics=identity)


def random_mean_logps(B=8, seed=0):
    """Length-averaged log-probs of chosen and rejected answers, spread over (-3, 0)."""
    g = torch.Generator().manual_seed(seed)
    return [-torch.rand(B, generator=g, dtype=torch.float64) * 3 for _ in range(2)]


# ---------------------------------------------------------------- SimPO


@pytest.mark.parametrize(
    "eps, expected",
    [
        # beta = 2, gamma = 0.5 * 2 = 1;  z = beta*(c - r) - gamma
        #   pair 0: c=-1,   r=-1.5 -> z = 2*0.5 - 1 = 0 -> -log sigma(0) = log 2 = 0.6931472
        #   pair 1: c=-0.5, r=-2   -> z = 2*1.5 - 1 = 2 -> log(1 + e^-2) = log(1.1353353) = 0.1269280
        (0.0, (0.6931471806, 0.1269280110)),
        # smoothing: -(1-eps) log s(z) - eps log s(-z) = -log s(z) + eps*z  ->  0.6931472 + 0;  0.1269280 + 0.2
        (0.1, (0.6931471806, 0.3269280110)),
    ],
)
def test_simpo_hand_worked(eps, expected):
    out = simpo_loss(T(-1, -0.5), T(-1.5, -2), beta=2.0, gamma_beta_ratio=0.5, label_smoothing=eps)
    assert_close(out.losses, T(*expected))
    assert_close(out.chosen_rewards, T(-2, -1))  # beta * c
    assert_close(out.rejected_rewards, T(-3, -4))  # beta * r


@pytest.mark.parametrize("eps", [0.0, 0.2])
def test_simpo_without_margin_is_dpo_with_zero_reference(eps):
    c, r = random_mean_logps()
    simpo = simpo_loss(c, r, beta=2.5, gamma_beta_ratio=0.0, label_smoothing=eps)
    dpo = dpo_loss(c, r, torch.zeros_like(c), torch.zeros_like(r), beta=2.5, label_smoothing=eps)
    for a, b in zip((simpo.losses, simpo.chosen_rewards, simpo.rejected_rewards),
                    (dpo.losses, dpo.chosen_rewards, dpo.rejected_rewards)):  # fmt: skip
        assert_close(a, b)


@pytest.mark.parametrize("eps", [0.0, 0.15])
def test_simpo_matches_trl_cpo_trainer(eps):
    c, r = random_mean_logps(seed=1)
    beta, ratio = 2.5, 0.4
    # TRL's `simpo_gamma` is the margin gamma itself (it divides by beta inside), not gamma / beta
    stand_in = types.SimpleNamespace(
        loss_type="simpo", alpha=0.0, beta=beta, simpo_gamma=ratio * beta, label_smoothing=eps, accelerator=CPU
    )
    trl_losses, trl_chosen, trl_rejected = CPOTrainer.cpo_loss(stand_in, c, r)
    out = simpo_loss(c, r, beta=beta, gamma_beta_ratio=ratio, label_smoothing=eps)
    assert_close(out.losses, trl_losses)
    assert_close(out.chosen_rewards, trl_chosen)
    assert_close(out.rejected_rewards, trl_rejected)


# ---------------------------------------------------------------- ORPO


def test_orpo_hand_worked():
    # odds = p / (1 - p).  beta = 0.1
    #   pair 0: p_c = 0.5 (odds 1), p_r = 0.2 (odds 0.25): odds ratio 4, sigma(log 4) = 4/5,
    #           L_OR = -log 0.8 = 0.2231436 -> beta * L_OR = 0.02231436
    #   pair 1: p_c = 0.75 (odds 3), p_r = 0.5 (odds 1): ratio 3, sigma(log 3) = 3/4, -log 0.75 = 0.2876821
    c, r = T(0.5, 0.75).log(), T(0.2, 0.5).log()
    out = orpo_loss(c, r, beta=0.1)
    assert_close(out.losses, T(0.02231435513, 0.02876820725))
    assert_close(out.chosen_rewards, T(-0.0693147181, -0.0287682072))  # beta * log p_c: 0.1*log 0.5, 0.1*log 0.75
    assert_close(out.rejected_rewards, T(-0.1609437912, -0.0693147181))  # 0.1*log 0.2, 0.1*log 0.5


def test_orpo_matches_trl_odds_ratio_loss():
    c, r = random_mean_logps(seed=2)
    c[0], r[1] = -1e-4, -5e-3  # include the log(-expm1) side of the log1mexp switch (x > -log 2)
    stand_in = types.SimpleNamespace(beta=0.2, accelerator=CPU)
    # TRL returns +beta*log sigma(log odds ratio) and trains on nll - mean(that): the sign is flipped, and it
    # computes in float32
    trl_losses, trl_chosen, trl_rejected, _, _ = ORPOTrainer.odds_ratio_loss(stand_in, c, r)
    out = orpo_loss(c, r, beta=0.2)
    assert_close(out.losses, -trl_losses.double())
    assert_close(out.chosen_rewards, trl_chosen.double())
    assert_close(out.rejected_rewards, trl_rejected.double())


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_orpo_gradients_finite_when_p_near_one(dtype):
    # Mean log-probs at and just below 0 (p ~ 1): TRL's log1mexp gives NaN gradients here in float32, because
    # torch.where still backpropagates log1p(-exp(x)) -> log1p(-1) through its unused branch.
    c = torch.tensor([-1e-3, -1e-6, -1e-9, -1e-20, 0.0, -0.5], dtype=dtype, requires_grad=True)
    r = torch.tensor([-1.0, -2.0, -1e-9, -0.5, 0.0, -1e-12], dtype=dtype, requires_grad=True)
    out = orpo_loss(c, r, beta=0.1)
    out.losses.sum().backward()
    assert torch.isfinite(out.losses).all()
    assert torch.isfinite(c.grad).all() and torch.isfinite(r.grad).all()
    assert c.grad[0] < 0 and r.grad[0] > 0  # gradient descent raises the chosen, lowers the rejected
    # and the value stays accurate there: at c = -1e-6 the log odds are about -log(1e-6) = 13.8
    log_odds = lambda x: x - math.log(-math.expm1(x))  # noqa: E731  (float64 reference)
    exact = math.log1p(math.exp(-(log_odds(-1e-6) - log_odds(-1.0))))  # -log sigma(z) = log(1 + e^-z)
    got = orpo_loss(torch.tensor([-1e-6], dtype=dtype), torch.tensor([-1.0], dtype=dtype), beta=1.0).losses
    assert got.item() == pytest.approx(exact, rel=1e-4)


# ---------------------------------------------------------------- KTO


def test_kto_hand_worked():
    # beta = 0.5, w_D = 1, w_U = 2, r = pi - ref = [1, -1, 0], desirable = [T, F, F], z0 = 1
    #   ex 0 (D): 1 - sigma(0.5*(1 - 1))  = 1 - 0.5               = 0.5
    #   ex 1 (U): 2 * (1 - sigma(0.5*(1 + 1))) = 2 * (1 - 0.7310586) = 0.5378828
    #   ex 2 (U): 2 * (1 - sigma(0.5*(1 - 0))) = 2 * (1 - 0.6224593) = 0.7550813
    pi, ref, d = T(-3, -5, -4), T(-4, -4, -4), torch.tensor([True, False, False])
    out = kto_loss(pi, ref, d, T(1.0)[0], beta=0.5, undesirable_weight=2.0)
    assert_close(out.losses, T(0.5, 0.5378828428, 0.7550813376))
    assert_close(out.rewards, T(0.5, -0.5, 0.0))  # beta * r
    # a negative KL estimate counts as 0:
    #   ex 0: 1 - sigma(0.5) = 0.3775407;  ex 1: 2*(1 - sigma(0.5)) = 0.7550813;  ex 2: 2*(1 - sigma(0)) = 1
    out = kto_loss(pi, ref, d, T(-0.3)[0], beta=0.5, undesirable_weight=2.0)
    assert_close(out.losses, T(0.3775406688, 0.7550813376, 1.0))
    assert out.kl.item() == 0.0


def test_kto_kl_estimate():
    # mean(pi - ref) over mismatched pairs: mean(1, 0) = 0.5;  mean(-1, 0) = -0.5 -> clamped to 0
    assert kto_kl_estimate(T(-3, -6), T(-4, -6)).item() == pytest.approx(0.5)
    assert kto_kl_estimate(T(-5, -6), T(-4, -6)).item() == 0.0
    pi = T(-3, -6).requires_grad_()
    assert not kto_kl_estimate(pi, T(-4, -6)).requires_grad  # z0 is a baseline, not trained through


def test_kto_gradient_only_through_policy_logps():
    pi, kl_pi = T(-3, -5).requires_grad_(), T(-2, -2).requires_grad_()
    kl = kto_kl_estimate(kl_pi, T(-3, -3))
    kto_loss(pi, T(-4, -4), torch.tensor([True, False]), kl, beta=0.5).losses.sum().backward()
    assert kl_pi.grad is None
    assert pi.grad[0] < 0 and pi.grad[1] > 0  # raise the desirable answer, lower the undesirable one


def trl_kto_compute_loss(beta, w_d, w_u, logps, ref_logps, labels, kl_logps, ref_kl_logps, lens, kl_lens):
    """Run TRL 1.16's KTOTrainer._compute_loss (loss_type="kto") on [B] summed log-probs; returns
    (mean loss, logged metrics).

    As in tests/test_losses_dpo.py the stand-in model returns per-token log-probs spread evenly over each
    completion (one-token prompt, zeros elsewhere); it tells the KL batch from the main one by its input_ids.
    Reference log-probs go in precomputed, TRL's `precompute_ref_log_probs` path.
    """

    def seqs(lps, n):  # -> input_ids, completion_mask [B, L], outputs
        L = 1 + int(n.max())
        pos = torch.arange(L)[None, :]
        completion_mask = (pos >= 1) & (pos <= n[:, None])  # [B, L]
        shift_mask = completion_mask[:, 1:].double()  # [B, L-1]
        zeros = torch.zeros_like(shift_mask)
        log_probs = shift_mask * (lps / n)[:, None]  # [B, L-1]
        outputs = types.SimpleNamespace(log_probs=log_probs, entropy=zeros, mean_logits=zeros)
        return torch.zeros(len(n), L, dtype=torch.long), completion_mask.long(), outputs

    ids, mask, outputs = seqs(logps, lens)
    kl_ids, kl_mask, kl_outputs = seqs(kl_logps, kl_lens)
    model = lambda input_ids, **kw: kl_outputs if input_ids is kl_ids else outputs  # noqa: E731
    stand_in = types.SimpleNamespace(
        model=types.SimpleNamespace(training=True), accelerator=CPU, precompute_ref_logps=True, calculate_KL=True,
        aux_loss_enabled=False, loss_type="kto", beta=beta, desirable_weight=w_d, undesirable_weight=w_u,
        _metrics={"train": defaultdict(list)}, _total_train_tokens=0, _tp_size=1,
    )  # fmt: skip
    stand_in._compute_kl_logps = functools.partial(KTOTrainer._compute_kl_logps, stand_in)
    inputs = {
        "input_ids": ids, "attention_mask": torch.ones_like(ids), "completion_mask": mask, "label": labels,
        "ref_logps": ref_logps, "ref_KL_logps": ref_kl_logps,
        "KL_input_ids": kl_ids, "KL_attention_mask": torch.ones_like(kl_ids), "KL_completion_mask": kl_mask,
    }  # fmt: skip
    loss = KTOTrainer._compute_loss(stand_in, model, inputs, return_outputs=False)
    return loss, {k: v[0] for k, v in stand_in._metrics["train"].items()}


@pytest.mark.parametrize("kl_shift", [2.0, -2.0])  # KL estimate positive, and negative (clamped to 0)
def test_kto_matches_trl(kl_shift):
    B, g = 8, torch.Generator().manual_seed(3)
    logps, ref_logps, ref_kl = (-torch.rand(B, generator=g, dtype=torch.float64) * 30 for _ in range(3))
    kl_logps = ref_kl + kl_shift + torch.randn(B, generator=g, dtype=torch.float64)  # [B] pi(y_{i-1} | x_i)
    labels = torch.tensor([True, False, False, True, True, False, True, True])
    lens = torch.randint(1, 15, (B,), generator=g)
    kl_lens = lens.roll(1)  # TRL's KL completion for example i is example i-1's completion

    beta, w_d, w_u = 0.3, 1.0, 1.33
    trl_loss, m = trl_kto_compute_loss(beta, w_d, w_u, logps, ref_logps, labels, kl_logps, ref_kl, lens, kl_lens)
    kl = kto_kl_estimate(kl_logps, ref_kl)
    assert (kl.item() > 0) == (kl_shift > 0)
    out = kto_loss(logps, ref_logps, labels, kl, beta=beta, desirable_weight=w_d, undesirable_weight=w_u)
    assert_close(out.losses.mean(), trl_loss)
    assert m["kl"] == pytest.approx(kl.item(), abs=1e-6)
    assert m["rewards/chosen"] == pytest.approx(out.rewards[labels].mean().item(), abs=1e-6)
    assert m["rewards/rejected"] == pytest.approx(out.rewards[~labels].mean().item(), abs=1e-6)
    assert m["logps/chosen"] == pytest.approx(logps[labels].mean().item(), abs=1e-6)
