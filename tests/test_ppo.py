"""End-to-end SFT -> RM -> PPO on the tiny model: outputs and metrics, heads that survive a reload, one
base for all four roles, and resume (exact in-process, and after SIGKILL)."""

import json
from pathlib import Path

import pytest
import torch

from align.config import parse_recipe
from align.pipeline import Pipeline, run_recipe
from tests.conftest import kill_run_after, rerun, tiny_ppo_recipe


def _run(text):
    return run_recipe(parse_recipe(text), quiet=True)


def test_sft_rm_ppo_run_writes_adapters_heads_and_metrics(tmp_path):
    summary = _run(tiny_ppo_recipe(tmp_path, ppo_steps=2))
    run_dir = tmp_path / "tinyppo"
    assert (run_dir / "rm" / "adapter" / "head.safetensors").is_file()
    assert (run_dir / "ppo" / "adapter" / "adapter_config.json").is_file()
    assert (run_dir / "ppo" / "value_adapter" / "head.safetensors").is_file()
    metrics = summary["stages"]["ppo"]["metrics"]
    for name in ("objective/kl", "objective/scores", "objective/rlhf_reward", "policy/clipfrac", "val/clipfrac",
                 "policy/entropy", "loss/policy", "loss/value", "response/length", "response/eos_rate", "kl/coef",
                 "reward/rule:synthetic_tasks", "reward/model:rm", "eval_init_objective/scores",
                 "eval_objective/scores"):
        assert name in metrics, name
    assert metrics["global_step"] == 2
    steps = [json.loads(line)["step"] for line in (run_dir / "ppo" / "metrics.jsonl").open()]
    assert steps == [1, 2]
    rm = summary["stages"]["rm"]["metrics"]
    assert {"eval_accuracy", "eval_margin", "accuracy", "margin"} <= set(rm)
    assert json.loads((run_dir / "ppo" / "stage.json").read_text())["parents"] == ["rm", "sft"]
    # The trained value head is what was saved beside the value adapter (it started at zero).
    from align.models.heads import load_head

    saved = load_head(run_dir / "ppo" / "value_adapter")
    state = torch.load(run_dir / "ppo" / "checkpoints" / "step-2" / "state.pt", weights_only=False)
    assert torch.equal(saved.weight, state["value_head"]["weight"]) and saved.weight.abs().sum() > 0


def test_reward_head_survives_save_and_reload(tmp_path):
    """Scores from a fresh process-like reload (base + adapter folder) reproduce the stage's own held-out
    metrics; a reward model reloaded with a new random head would not."""
    from align.data import synthetic
    from align.models.tiny import tiny_model_and_tokenizer
    from align.rewards import load_reward

    summary = _run(tiny_ppo_recipe(tmp_path, ppo_steps=1))
    rm = summary["stages"]["rm"]["metrics"]
    base, tokenizer = tiny_model_and_tokenizer()
    from peft import get_peft_model

    from align.models.adapters import lora_config
    from align.settings import LoraConfig

    model = get_peft_model(base, lora_config(LoraConfig(r=8)), adapter_name="scratch")
    reward = load_reward(str(tmp_path / "tinyppo" / "rm" / "adapter"), model, tokenizer)
    reward.max_length = 96
    pairs = synthetic.load("preference_heldout", "preference", n=16)
    chosen = reward.score([p.prompt for p in pairs], [p.chosen[0]["content"] for p in pairs])
    rejected = reward.score([p.prompt for p in pairs], [p.rejected[0]["content"] for p in pairs])
    assert float((chosen - rejected).mean()) == pytest.approx(rm["eval_margin"], abs=1e-4)
    assert float((chosen > rejected).float().mean()) == pytest.approx(rm["eval_accuracy"])


def test_reward_head_reads_the_last_real_token_with_left_or_right_padding():
    from align.models import heads
    from align.models.tiny import tiny_model_and_tokenizer

    model, _ = tiny_model_and_tokenizer()
    head = heads.new_head(heads.hidden_size(model))
    ids = torch.tensor([[5, 6, 7, 8], [9, 10, 0, 0], [0, 0, 9, 10]])
    mask = torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0], [0, 0, 1, 1]])
    assert heads.last_token_index(mask).tolist() == [3, 1, 3]
    with torch.no_grad():
        scores = heads.sequence_scores(model, head, ids, mask)
        alone = heads.sequence_scores(model, head, torch.tensor([[9, 10]]), torch.tensor([[1, 1]]))
    assert scores[1].item() == pytest.approx(alone.item(), abs=1e-5)
    assert scores[2].item() == pytest.approx(alone.item(), abs=1e-5)


def test_all_four_roles_are_adapters_on_one_base(tmp_path, monkeypatch):
    """The base is loaded once for the whole run, and PPO's model holds policy, ref, value and the
    reward as LoRA adapters of the same 4-bit layers: no second copy of any base weight."""
    import bitsandbytes as bnb
    from transformers import AutoModelForCausalLM

    from align.stages import ppo

    loads = []
    original = AutoModelForCausalLM.from_pretrained.__func__

    def counting(cls, *args, **kwargs):
        loads.append(args[0] if args else kwargs)
        return original(cls, *args, **kwargs)

    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", classmethod(counting))
    seen = {}
    build_roles = ppo.build_roles

    def spy(model, stage, ctx):
        base_weights = {id(m.weight) for m in model.get_base_model().modules() if isinstance(m, bnb.nn.Linear4bit)}
        model, roles = build_roles(model, stage, ctx)
        seen["base"] = base_weights
        seen["weights"] = {id(m.weight) for m in model.modules() if isinstance(m, bnb.nn.Linear4bit)}
        # Recorded now: the stage takes its adapters out of the base when it ends.
        seen["adapters"] = [set(m.lora_A) for m in model.modules() if hasattr(m, "lora_A")]
        return model, roles

    monkeypatch.setattr(ppo, "build_roles", spy)
    pipeline = Pipeline(parse_recipe(tiny_ppo_recipe(tmp_path, quantization="nf4", ppo_steps=1)), quiet=True)
    pipeline.run()
    assert len(loads) == 1, f"the base was loaded {len(loads)} times: {loads}"
    assert seen["adapters"] and all(names == {"policy", "ref", "value", "reward1"} for names in seen["adapters"])
    assert seen["weights"] == seen["base"]  # the very same 4-bit weights, no copy


def _adapter_weights(folder: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(str(folder / "adapter_model.safetensors"))


def test_interrupted_ppo_resumes_to_the_same_weights(tmp_path, monkeypatch):
    """Interrupted right after its step-2 checkpoint, a PPO run resumes to exactly the weights of an
    uninterrupted run: policy, value, optimizer, KL controller, reward statistics and RNG all restored."""
    from align.stages import online

    text = tiny_ppo_recipe(tmp_path / "straight", ppo_steps=4, save_steps=2, ppo_eval=False).replace(
        "kl_coef: 0.05", "kl_coef: 0.05, kl_target: 0.01, kl_horizon: 50")
    _run(text)

    save = online.save_checkpoint

    def save_then_die(stage_dir, step, *args, **kwargs):
        save(stage_dir, step, *args, **kwargs)
        if step == 2:
            raise KeyboardInterrupt

    resumed_text = text.replace(str(tmp_path / "straight"), str(tmp_path / "resumed"))
    monkeypatch.setattr(online, "save_checkpoint", save_then_die)
    with pytest.raises(KeyboardInterrupt):
        _run(resumed_text)
    monkeypatch.setattr(online, "save_checkpoint", save)
    summary = _run(resumed_text)
    assert summary["stages"]["ppo"]["resumed_from"].endswith("step-2")
    for folder in ("adapter", "value_adapter"):
        straight = _adapter_weights(tmp_path / "straight" / "tinyppo" / "ppo" / folder)
        resumed = _adapter_weights(tmp_path / "resumed" / "tinyppo" / "ppo" / folder)
        assert straight.keys() == resumed.keys()
        for key in straight:
            assert torch.allclose(straight[key], resumed[key], atol=1e-6), key
    lines = [json.loads(line) for line in (tmp_path / "resumed" / "tinyppo" / "ppo" / "metrics.jsonl").open()]
    assert [line["step"] for line in lines] == [1, 2, 3, 4]
    straight_lines = [json.loads(line) for line in (tmp_path / "straight" / "tinyppo" / "ppo" / "metrics.jsonl").open()]
    assert lines[3]["kl/coef"] == pytest.approx(straight_lines[3]["kl/coef"])  # the adaptive controller resumed too
    assert lines[3]["kl/coef"] != 0.05


def test_sigkill_during_ppo_resumes_from_checkpoint(tmp_path):
    recipe = tmp_path / "tinyppo.yaml"
    recipe.write_text(tiny_ppo_recipe(tmp_path / "runs", ppo_steps=16, save_steps=2, ppo_eval=False))
    stage_dir = tmp_path / "runs" / "tinyppo" / "ppo"
    # Killed a second after its first checkpoint, so steps after that checkpoint must be redone.
    cmd = kill_run_after(recipe, lambda: list((stage_dir / "checkpoints").glob("step-*/state.pt")), linger=1.0)
    assert json.loads((stage_dir / "stage.json").read_text())["status"] == "running"

    rerun(cmd)
    state = json.loads((stage_dir / "stage.json").read_text())
    assert state["status"] == "done" and "step-" in state["resumed_from"]
    assert state["metrics"]["global_step"] == 16
    steps = [json.loads(line)["step"] for line in (stage_dir / "metrics.jsonl").open()]
    assert steps == list(range(1, 17))  # every step logged once, none lost, none twice


def test_a_ppo_update_moves_the_policy_towards_high_advantage_responses(tmp_path):
    """One rollout, several clipped updates: the responses with positive advantage gain log-probability
    and those with negative advantage lose it (the surrogate objective rises), and the value loss falls."""
    from align.losses.ppo import RunningMoments, value_loss
    from align.refs import resolve_all_refs
    from align.stages import ppo
    from align.stages.engine import StageContext
    from align.stages.ppo_rollout import make_experience, response_logprobs, response_values

    rule = tmp_path / "has_digit.yaml"  # about half of the tiny model's random replies contain a digit
    rule.write_text("name: has_digit\nchecks:\n  - {kind: regex, pattern: '\\d', reward: 1.0, penalty: -1.0}\n")
    recipe = parse_recipe(tiny_ppo_recipe(tmp_path, rewards=f"[{{rule: {rule}}}]")
                          .replace("ppo_epochs: 2", "ppo_epochs: 4"))
    pipeline = Pipeline(recipe, quiet=True)
    pipeline.run_stage(recipe.stage("sft"))
    stage = resolve_all_refs(recipe.stage("ppo"), pipeline.outputs)
    ctx = StageContext(pipeline.host, tmp_path / "ppo", recipe.seed, torch.float32, True)
    with ctx.host.policy(init=stage.init) as policy:
        model, roles = ppo.build_roles(policy, stage, ctx)
        torch.manual_seed(0)
        examples = pipeline.load_data(stage)["train"].examples[:8]
        prompts = [ppo.encode_prompt(ctx.tokenizer, ex.prompt) for ex in examples]
        cfg = stage.ppo
        rollout, _, _ = make_experience(model, roles, ctx.tokenizer, examples, prompts, cfg, 0.05, RunningMoments())
        assert rollout.advantages.abs().sum() > 0
        groups = [ppo.role_parameters(model, "policy"),
                  ppo.role_parameters(model, "value") + list(roles.value_head.parameters())]
        optimizer = torch.optim.AdamW([{"params": g} for g in groups], lr=1e-2, eps=1e-5)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda _: 1.0)
        args = (rollout.query_response, rollout.attention_mask)
        values_before, _ = value_loss(rollout.values, rollout.values, rollout.returns, rollout.response_mask, 1e9)
        ppo.ppo_update(model, roles, rollout, optimizer, scheduler, cfg, groups)
        with torch.no_grad():
            new, _ = response_logprobs(model, *args, rollout.prompt_width, cfg.temperature)
            model.set_adapter("value")
            values_after, _ = value_loss(response_values(model, roles.value_head, *args, rollout.prompt_width),
                                         rollout.values, rollout.returns, rollout.response_mask, 1e9)
        mask = rollout.response_mask
        surrogate_gain = ((new - rollout.logprobs) * rollout.advantages * mask).sum()
        assert surrogate_gain > 0
        assert values_after < values_before
