"""GRPO (align.losses.grpo, align.stages.grpo): advantages against hand-worked numbers and TRL's formulas, the loss
against TRL 1.16's GRPOTrainer._compute_loss on identical inputs for each aggregation TRL has, clip-higher at work,
and the stage end to end on the tiny model (its metrics under TRL's names), and a SIGKILLed run resuming with each step
logged once."""

import dataclasses
import json
import zlib
from collections import defaultdict
from types import SimpleNamespace

import pytest
import torch
from trl import GRPOTrainer

from align.config import parse_recipe
from align.losses.grpo import ClippedGroupLoss, group_advantages
from align.models.tiny import tiny_model_and_tokenizer
from align.pipeline import run_recipe
from align.rewards import REWARD_SOURCES, Reward, RewardSource, register_source
from align.stages.grpo_rollout import Groups, grouped_logprobs, overlong_penalty
from align.stages.ppo_rollout import decode_mask, response_logprobs, sample
from tests.conftest import _tiny_head, kill_run_after, rerun


def test_group_advantages_by_hand():
    rewards = torch.tensor([1.0, 2.0, 4.0, 3.0, 3.0, 3.0])  # two prompts, G = 3
    std = (42 / 18) ** 0.5  # Bessel-corrected std of 1, 2, 4
    expected = torch.tensor([-4 / 3, -1 / 3, 5 / 3]) / (std + 1e-4)
    assert torch.allclose(group_advantages(rewards, 3, "group_norm")[:3], expected, atol=1e-6)
    assert group_advantages(rewards, 3, "group_norm")[3:].tolist() == [0.0, 0.0, 0.0]  # a tied group teaches nothing
    assert torch.allclose(group_advantages(rewards, 3, "group_mean")[:3], torch.tensor([-4 / 3, -1 / 3, 5 / 3]))
    # RLOO: rewards less 0.1 * summed KL (0.95, 2, 3.9), each against the mean of its two siblings
    kl = torch.tensor([0.5, 0.0, 1.0, 0.0, 0.0, 0.0])
    assert torch.allclose(group_advantages(rewards, 3, "rloo", kl, 0.1)[:3], torch.tensor([-2.0, -0.425, 2.425]))


def _trl_loss(loss_type, logps, old, ref, advantages, mask, beta, eps_low, eps_high, max_len):
    """TRL 1.16's GRPOTrainer._compute_loss, its own code, on our inputs (no model: log-probs given)."""
    metrics = {"train": defaultdict(list)}
    trainer = SimpleNamespace(
        _get_per_token_logps_and_entropies=lambda *a, **k: (logps, torch.zeros_like(logps), None),
        aux_loss_enabled=False, top_entropy_quantile=1.0, off_policy_mask_threshold=None,
        importance_sampling_level="token", beta=beta, loss_type=loss_type, epsilon_low=eps_low,
        epsilon_high=eps_high, use_vllm=False, model=SimpleNamespace(training=True),
        current_gradient_accumulation_steps=1, max_completion_length=max_len, _entropy_bonus_enabled=False,
        args=SimpleNamespace(use_bias_correction_kl=False, delta=None),
        accelerator=SimpleNamespace(reduce=lambda x, reduction: x, gather=lambda x: x, num_processes=1),
        _metrics=metrics)
    width = logps.shape[1]
    inputs = {"prompt_ids": torch.zeros(logps.shape[0], 2, dtype=torch.long),
              "prompt_mask": torch.ones(logps.shape[0], 2, dtype=torch.long),
              "completion_ids": torch.zeros(logps.shape[0], width, dtype=torch.long), "completion_mask": mask,
              "advantages": advantages, "old_per_token_logps": old, "ref_per_token_logps": ref}
    return GRPOTrainer._compute_loss(trainer, None, inputs), metrics["train"]


@pytest.mark.parametrize("aggregation,trl_type", [("sequence", "grpo"), ("token", "bnpo"), ("constant", "dr_grpo")])
def test_the_loss_is_trls_for_each_aggregation(aggregation, trl_type):
    torch.manual_seed(0)
    n, width = 6, 5
    old = -torch.rand(n, width) * 3
    logps = old + torch.randn(n, width) * 0.4  # ratios well outside the clip range on some tokens
    ref = old + torch.randn(n, width) * 0.2
    advantages = torch.randn(n)
    mask = torch.ones(n, width)
    mask[0, 3:] = 0
    mask[4, 1:] = 0
    ours, metrics = ClippedGroupLoss(0.2, 0.28, 0.04, aggregation, width)(logps, old, advantages, mask, ref)
    theirs, trl_metrics = _trl_loss(trl_type, logps, old, ref, advantages, mask, 0.04, 0.2, 0.28, width)
    assert ours.item() == pytest.approx(theirs.item(), abs=1e-6)
    for key in ("kl", "clip_ratio/low_mean", "clip_ratio/high_mean", "clip_ratio/region_mean"):
        assert metrics[key] == pytest.approx(trl_metrics[key][0], abs=1e-6), key
    assert metrics["clip_ratio/region_mean"] > 0  # the clip did bite on these inputs


def test_clip_higher_lets_positive_advantages_move_further_before_the_clip():
    """mu = 2: the second pass sees ratios the first pass moved; a wider upper clip flags fewer of them."""
    torch.manual_seed(1)
    old = -torch.rand(8, 6) * 2
    advantages = torch.tensor([1.0, -1.0] * 4)
    mask = torch.ones(8, 6)
    high = {}
    for clip_high in (0.05, 0.28):
        logps = old.clone().requires_grad_(True)
        loss_fn = ClippedGroupLoss(0.05, clip_high, 0.0, "token", 6)
        optimizer = torch.optim.SGD([logps], lr=5.0)  # moves each log-prob by about 0.1 per pass
        for _ in range(2):  # num_iterations = 2 on one rollout
            loss, metrics = loss_fn(logps, old, advantages, mask)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        high[clip_high] = metrics["clip_ratio/high_mean"]
    # the positive half's ratios near 1.1 in the second pass: past 1.05, short of 1.28
    assert high[0.05] == 0.5 and high[0.28] == 0.0


TRAIN = "lr: 5.0e-3, max_length: 96, max_prompt_length: 64"


def _recipe(output_dir, steps: int, save_steps: int = 50, advantage: str = "group_norm", kl_coef: float = 0.0,
            minibatch: int = 8, iterations: int = 2):
    return _tiny_head("tinygrpo", output_dir, "none", sft_steps=4) + f"""\
  - name: grpo
    kind: grpo
    init: ${{sft.adapter}}
    data: {{path: "synthetic:prompts", max_rows: 32}}
    rewards: [{{rule: synthetic_tasks}}]
    grpo: {{prompts_per_step: 4, num_generations: 4, max_new_tokens: 8, minibatch_size: {minibatch},
            num_iterations: {iterations},
            advantage: {advantage}, kl_coef: {kl_coef}}}
    train: {{max_steps: {steps}, save_steps: {save_steps}, {TRAIN}}}
"""


@pytest.mark.parametrize("advantage,kl_coef", [("group_norm", 0.0), ("rloo", 0.05)])
def test_a_grpo_stage_trains_logs_trls_metrics_and_loads_a_reference_only_with_kl(tmp_path, advantage, kl_coef):
    summary = run_recipe(parse_recipe(_recipe(tmp_path, steps=3, advantage=advantage, kl_coef=kl_coef)), quiet=True)
    assert summary["stages"]["grpo"]["status"] == "done"
    records = [json.loads(line) for line in (tmp_path / "tinygrpo" / "grpo" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2, 3]
    for key in ("reward", "reward_std", "frac_reward_zero_std", "completions/mean_length", "completions/clipped_ratio",
                "rewards/rule:synthetic_tasks/mean", "rewards/rule:synthetic_tasks/std", "clip_ratio/region_mean"):
        assert key in records[-1], key
    assert ("kl" in records[-1]) == (kl_coef > 0 and advantage != "rloo")  # rloo puts its KL in the reward
    assert all(r["completions/mean_length"] <= 8 for r in records)


def test_one_update_per_rollout_takes_the_old_log_probs_from_the_update_itself(tmp_path, monkeypatch):
    from align.stages import grpo

    forwards = []  # whether each log-prob forward had gradients: the update's have, a separate old-policy pass not

    def counted(*args, **kwargs):
        forwards.append(torch.is_grad_enabled())
        return grouped_logprobs(*args, **kwargs)

    monkeypatch.setattr(grpo, "grouped_logprobs", counted)
    run_recipe(parse_recipe(_recipe(tmp_path, steps=2, minibatch=16, iterations=1)), quiet=True)
    assert forwards == [True, True]  # one per step: the update's
    records = [json.loads(line) for line in (tmp_path / "tinygrpo" / "grpo" / "metrics.jsonl").read_text().splitlines()]
    assert all(r["clip_ratio/region_mean"] == 0.0 for r in records)  # ratio exactly 1: nothing clipped


def test_sigkill_during_grpo_resumes_to_every_step_once(tmp_path):
    recipe = tmp_path / "tinygrpo.yaml"
    recipe.write_text(_recipe(tmp_path / "runs", steps=12, save_steps=2))
    stage_dir = tmp_path / "runs" / "tinygrpo" / "grpo"

    def logged_past_a_checkpoint() -> bool:  # killed with a step to redo
        log = stage_dir / "metrics.jsonl"
        return bool(list((stage_dir / "checkpoints").glob("step-*/state.pt"))) and log.is_file() and \
            log.read_text().count("\n") % 2 == 1

    cmd = kill_run_after(recipe, logged_past_a_checkpoint)
    assert json.loads((stage_dir / "stage.json").read_text())["status"] == "running"
    rerun(cmd)
    state = json.loads((stage_dir / "stage.json").read_text())
    assert state["status"] == "done" and "step-" in state["resumed_from"]
    steps = [json.loads(line)["step"] for line in (stage_dir / "metrics.jsonl").read_text().splitlines()]
    assert steps == list(range(1, 13))


def test_the_overlong_penalty_by_hand():
    lengths = torch.tensor([3, 6, 7, 8, 10])
    assert overlong_penalty(lengths, max_new_tokens=10, buffer=4).tolist() == [0.0, 0.0, -0.25, -0.5, -1.0]


class HalfThePromptsVary(Reward):
    """Tied (0) on about half the prompts, whatever the completion; on the others, a score that differs per text."""

    name, kind, needs_rules = "half", "toy", False

    def score(self, prompts, responses, rules=None):
        return torch.tensor([float(zlib.crc32(r.encode()) % 7) if zlib.crc32(p[-1]["content"].encode()) % 2 else 0.0
                             for p, r in zip(prompts, responses)])


@dataclasses.dataclass(kw_only=True)
class HalfSource(RewardSource):
    half: bool = True

    def load(self, model=None, tokenizer=None, adapter="reward", lengths=(512, 256)):
        return HalfThePromptsVary()


@pytest.fixture
def half_reward():
    register_source("half")(HalfSource)
    yield
    del REWARD_SOURCES["half"]


def test_dynamic_sampling_fills_the_batch_with_groups_whose_rewards_differ(tmp_path, half_reward):
    def zero_std(dynamic: bool) -> list[dict]:
        text = _recipe(tmp_path / str(dynamic), steps=3).replace("rewards: [{rule: synthetic_tasks}]",
                                                                 "rewards: [{half: true}]")
        text = text.replace("num_iterations: 2,", f"num_iterations: 1, dynamic_sampling: {str(dynamic).lower()}, "
                                                  "max_resample_rounds: 6, overlong_buffer: 2,")
        run_recipe(parse_recipe(text), quiet=True)
        log = (tmp_path / str(dynamic) / "tinygrpo" / "grpo" / "metrics.jsonl").read_text().splitlines()
        return [json.loads(line) for line in log]

    plain, dynamic = zero_std(False), zero_std(True)
    assert sum(r["frac_reward_zero_std"] for r in plain) > 0  # tied groups reach the update without it
    assert [r["frac_reward_zero_std"] for r in dynamic] == [0.0, 0.0, 0.0]
    assert any(r["dynamic_sampling/rounds"] > 0 for r in dynamic)
    assert all("rewards/overlong/mean" in r and r["rewards/overlong/mean"] <= 0 for r in dynamic)


def test_packed_completions_have_the_log_probs_and_gradients_of_each_completion_alone():
    """The update runs each prompt once for its completions in the minibatch (grouped_logprobs): the log-probs and
    their gradients are those of the padded rows that `response_logprobs` scores one by one."""
    model, tok = tiny_model_and_tokenizer(hidden=64, layers=2)
    torch.manual_seed(0)
    prompts = [[1, 40, 41, 42, 43, 2], [1, 50, 51, 2], [1, 60, 61, 62, 2]]  # different lengths: left padding
    cfg = SimpleNamespace(max_new_tokens=12, temperature=0.7)
    qr, am, _, width = sample(model.eval(), tok, prompts, cfg, repeats=3)
    for row, end in enumerate([3, 11, 0, 5, 7, 11, 2, 9, 4]):  # a random model rarely samples EOS: end them here
        qr[row, width + end] = tok.eos_token_id
        qr[row, width + end + 1 :] = tok.pad_token_id
    mask = decode_mask(qr[:, width:], tok.eos_token_id).float()
    am = torch.cat([am[:, :width], mask.long()], 1)
    groups = Groups(qr, am, mask, width, [0, 1, 2], {}, torch.zeros(9))
    rows = torch.tensor([7, 0, 2, 8, 4])  # shuffled, groups split across the minibatch
    packed = grouped_logprobs(model, groups, rows, tok.pad_token_id, cfg.temperature)  # [5, R]
    alone, _ = response_logprobs(model, qr[rows], am[rows], width, cfg.temperature)
    torch.testing.assert_close(packed, alone * mask[rows], atol=1e-5, rtol=0)
    weight = model.get_input_embeddings().weight
    packed_grad, = torch.autograd.grad(packed.sum(), weight)
    alone_grad, = torch.autograd.grad((alone * mask[rows]).sum(), weight)
    torch.testing.assert_close(packed_grad, alone_grad, atol=1e-5, rtol=1e-4)
