"""Forgetting metrics: exact against hand computation, and measured before and after every stage of a run."""

import json

import pytest
import torch
from peft import get_peft_model

from align.config import LoraConfig, parse_recipe
from align.data import synthetic
from align.data.collate import encode, encode_prompt
from align.eval.forgetting import kl_to_reference, retention_nll
from align.models import adapters
from align.models.load import load_base, resolve_base
from align.config import ModelConfig
from align.pipeline import run_recipe
from tests.conftest import tiny_ppo_recipe, tiny_recipe

FORGETTING = """
forgetting:
  retention: {path: "synthetic:heldout"}
  tasks: {path: "synthetic:heldout"}
  max_rows: 8
  max_new_tokens: 6
  batch_size: 4
"""


@pytest.fixture(scope="module")
def tiny():
    cfg = ModelConfig(base="builtin:tiny", quantization="none")
    base, tokenizer = load_base(cfg, resolve_base(cfg.base))
    model = get_peft_model(base, adapters.lora_config(LoraConfig(r=4, alpha=8, dropout=0.0)), adapter_name="still")
    model.add_adapter("moved", adapters.lora_config(LoraConfig(r=4, alpha=8, dropout=0.0)))
    torch.manual_seed(0)
    for name, param in model.named_parameters():
        if "lora_B.moved" in name:
            param.data.normal_(0, 0.5)  # `moved` moves the model; `still` (lora_B zero) is the base itself
    model.set_adapter("still")
    return model, tokenizer


def test_retention_nll_is_the_mean_nll_of_completion_tokens(tiny):
    model, tokenizer = tiny
    examples = synthetic.load("heldout", "sft", n=3)
    out = retention_nll(model, tokenizer, examples, max_length=96, max_prompt_length=64, batch_size=2)
    total, tokens = 0.0, 0
    with torch.no_grad():
        for ex in examples:
            enc = encode(tokenizer, ex.prompt, ex.completion, 96, 64)
            ids = torch.tensor([enc.prompt_ids + enc.completion_ids])
            logps = model(input_ids=ids).logits[0, :-1].float().log_softmax(-1)  # [T-1, V]
            targets = ids[0, 1:]
            picked = logps.gather(-1, targets[:, None])[:, 0][len(enc.prompt_ids) - 1 :]
            total, tokens = total - float(picked.sum()), tokens + len(picked)
    assert out["tokens"] == tokens
    assert out["nll"] == pytest.approx(total / tokens, abs=1e-4)
    assert out["perplexity"] == pytest.approx(torch.tensor(total / tokens).exp().item(), rel=1e-5)


def test_kl_is_zero_to_itself_and_matches_a_brute_force_sum(tiny):
    model, tokenizer = tiny
    prompts = [ex.prompt for ex in synthetic.load("heldout", "task", n=3)]
    assert kl_to_reference(model, tokenizer, prompts, "moved", "moved", 6, 2)["kl"] == pytest.approx(0.0, abs=1e-6)
    out = kl_to_reference(model, tokenizer, prompts, "moved", None, 6, 2)
    assert out["kl"] > 0.01
    assert kl_to_reference(model, tokenizer, prompts, "moved", "still", 6, 2)["kl"] == pytest.approx(out["kl"], rel=1e-4)
    total, tokens = 0.0, 0
    with torch.no_grad():
        for prompt in prompts:
            ids = torch.tensor([encode_prompt(tokenizer, prompt)])
            with adapters.using(model, "moved"):
                full = model.generate(ids, max_new_tokens=6, do_sample=False, pad_token_id=tokenizer.pad_token_id,
                                      eos_token_id=tokenizer.eos_token_id)
                reply = full[0, ids.shape[1]:].tolist()
                if tokenizer.eos_token_id in reply:
                    reply = reply[: reply.index(tokenizer.eos_token_id) + 1]
                seq = torch.tensor([ids[0].tolist() + reply])
                p = model(input_ids=seq).logits[0].float().log_softmax(-1)
            with adapters.using(model, None):
                q = model(input_ids=seq).logits[0].float().log_softmax(-1)
            positions = slice(ids.shape[1] - 1, seq.shape[1] - 1)  # those that predict a reply token
            kl = (p[positions].exp() * (p[positions] - q[positions])).sum(-1)
            total, tokens = total + float(kl.sum()), tokens + len(kl)
    assert out["tokens"] == tokens
    assert out["kl"] == pytest.approx(total / tokens, rel=1e-4)


def test_forgetting_is_measured_before_and_after_every_stage(tmp_path):
    summary = run_recipe(parse_recipe(tiny_recipe(tmp_path, dpo_steps=4) + FORGETTING), quiet=True)
    forgetting = summary["forgetting"]
    assert set(forgetting) == {"sft", "dpo"}
    for name, f in forgetting.items():
        state = json.loads((tmp_path / "tiny" / name / "stage.json").read_text())
        assert state["forgetting"]["after"] == f["after"]
        for side in ("before", "after"):
            assert set(f[side]) >= {"retention_nll", "retention_perplexity", "task_accuracy", "task_per_family"}
        assert f["kl_to_start"] > 0
    assert forgetting["sft"]["start"] == "base" and forgetting["dpo"]["start"].endswith("sft/adapter")
    assert forgetting["dpo"]["before"] == forgetting["sft"]["after"]  # the SFT policy, measured once
    # SFT on the task's answers makes held-out answers of the same task likelier
    assert forgetting["sft"]["after"]["retention_nll"] < forgetting["sft"]["before"]["retention_nll"] - 0.05
    assert forgetting["sft"]["change"]["retention_nll"] == pytest.approx(
        forgetting["sft"]["after"]["retention_nll"] - forgetting["sft"]["before"]["retention_nll"])


def test_every_kind_of_stage_reports_forgetting_and_a_reward_model_says_why_not(tmp_path):
    text = tiny_ppo_recipe(tmp_path, ppo_steps=1, ppo_eval=False) + FORGETTING
    summary = run_recipe(parse_recipe(text), quiet=True)
    assert set(summary["forgetting"]) == {"sft", "rm", "ppo"}
    assert "no policy changed" in summary["forgetting"]["rm"]["skipped"]
    assert summary["forgetting"]["ppo"]["kl_to_start"] > 0


def test_without_sets_nothing_is_measured_and_forgetting_can_be_turned_off(tmp_path):
    assert run_recipe(parse_recipe(tiny_recipe(tmp_path, dpo_steps=1)), quiet=True)["forgetting"] == {}
    off = tiny_recipe(tmp_path / "off", dpo_steps=1) + FORGETTING.replace("forgetting:\n", "forgetting:\n  enabled: false\n")
    assert run_recipe(parse_recipe(off), quiet=True)["forgetting"] == {}
