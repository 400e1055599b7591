"""The real SmolLM2-135M-Instruct GGUF and real HH-RLHF pairs from ../shared (skipped when absent)."""

import json
import math

import pytest

from align.cli import main
from align.config import parse_recipe
from align.pipeline import run_recipe
from tests.conftest import SHARED

GGUF = SHARED / "models" / "smollm2-135m-instruct-q4_1" / "SmolLM2-135M-Instruct.Q4_1.gguf"
HH = SHARED / "data" / "preference" / "hh_rlhf_helpful_base_test_rows0-499.jsonl.gz"
pytestmark = pytest.mark.skipif(not (GGUF.is_file() and HH.is_file()), reason="../shared model or HH-RLHF data absent")


def test_data_inspect_renders_hh_rows_with_the_chatml_template(capsys):
    assert main(["data", "inspect", str(HH), "--model", str(GGUF), "--skip-bad-rows", "--row", "2"]) == 0
    err = capsys.readouterr().err
    assert "hh_rlhf" in err and "preference" in err
    assert "<|im_start|>assistant" in err  # the generation prompt is rendered, in the prompt part
    assert "row 112" in err  # the one malformed row (an empty rejected reply) is reported, not hidden
    assert "two BOS" not in err


def test_a_few_dpo_steps_on_hh_pairs_in_nf4(tmp_path):
    recipe = parse_recipe(f"""
name: hh
output_dir: {tmp_path}
model: {{base: {GGUF}, quantization: nf4, lora: {{r: 8, alpha: 16}}}}
stages:
  - name: dpo
    kind: dpo
    data: {{path: {HH}, skip_bad_rows: true, max_rows: 12}}
    loss: {{beta: 0.1}}
    train: {{max_steps: 3, batch_size: 2, lr: 1.0e-4, max_length: 64, max_prompt_length: 40}}
""")
    summary = run_recipe(recipe, quiet=True)
    metrics = summary["stages"]["dpo"]["metrics"]
    assert summary["stages"]["dpo"]["status"] == "done" and metrics["global_step"] == 3
    # a fresh adapter adds nothing (lora_B = 0) and the reference is the bare base: step 1's loss is log 2 exactly
    first_step = json.loads((tmp_path / "hh" / "dpo" / "metrics.jsonl").open().readline())
    assert first_step["step"] == 1 and first_step["loss"] == pytest.approx(math.log(2), abs=1e-4)
    assert "rewards/margins" in metrics


def test_rm_then_ppo_on_hh_in_nf4(tmp_path):
    """A few reward-model steps on HH pairs with held-out accuracy, then one PPO step on HH prompts
    scored by that reward model: the real model and data through the whole RM -> PPO path."""
    recipe = parse_recipe(f"""
name: hhppo
output_dir: {tmp_path}
model: {{base: {GGUF}, quantization: nf4, lora: {{r: 8, alpha: 16, dropout: 0.0}}}}
stages:
  - name: rm
    kind: rm
    data: {{path: {HH}, skip_bad_rows: true, max_rows: 8}}
    eval_data: {{path: {HH}, skip_bad_rows: true, max_rows: 16}}
    train: {{max_steps: 2, batch_size: 4, lr: 1.0e-4, max_length: 96, max_prompt_length: 64}}
  - name: ppo
    kind: ppo
    data: {{path: {HH}, skip_bad_rows: true, max_rows: 4}}
    rewards: [{{model: "${{rm.adapter}}"}}, {{rule: concise, weight: 0.5}}]
    ppo: {{rollout_batch_size: 4, minibatch_size: 2, ppo_epochs: 1, max_new_tokens: 8}}
    train: {{max_steps: 1, lr: 1.0e-5, max_length: 160, max_prompt_length: 128}}
""")
    summary = run_recipe(recipe, quiet=True)
    rm = summary["stages"]["rm"]["metrics"]
    assert (rm["eval_accuracy"] * 16).is_integer() and "eval_margin" in rm  # each of the 16 held-out pairs once
    assert (tmp_path / "hhppo" / "rm" / "adapter" / "head.safetensors").is_file()
    ppo = summary["stages"]["ppo"]["metrics"]
    assert ppo["global_step"] == 1 and "reward/model:rm" in ppo and "reward/rule:concise" in ppo


OASST = SHARED / "data" / "ranked" / "oasst_en_100_trees_0-59.jsonl.gz"


@pytest.mark.skipif(not OASST.is_file(), reason="../shared OpenAssistant trees absent")
def test_a_few_rank_steps_on_oasst_groups_in_nf4(tmp_path):
    recipe = parse_recipe(f"""
name: oasst
output_dir: {tmp_path}
model: {{base: {GGUF}, quantization: nf4, lora: {{r: 8, alpha: 16}}}}
stages:
  - name: rank
    kind: rank
    data: {{path: {OASST}, max_rows: 3}}
    loss: {{type: plackett_luce, beta: 0.1}}
    train: {{max_steps: 2, batch_size: 2, lr: 1.0e-4, max_length: 96, max_prompt_length: 48}}
""")
    summary = run_recipe(recipe, quiet=True)
    state = summary["stages"]["rank"]
    assert state["status"] == "done" and state["metrics"]["global_step"] == 2
    assert {"rank/kendall_tau", "rank/accuracy", "rewards/rank_0", "rewards/rank_2"} <= state["metrics"].keys()


VICUNA = SHARED / "data" / "eval" / "vicuna_bench_question.jsonl"
ALPACA = SHARED / "data" / "sft" / "alpaca_sample_rows0-2999.jsonl.gz"


@pytest.mark.skipif(not (VICUNA.is_file() and ALPACA.is_file()), reason="../shared Vicuna-Bench or Alpaca data absent")
def test_eval_compares_base_and_a_trained_adapter_on_vicuna_bench(tmp_path):
    """A few SFT steps on Alpaca and a few reward-model steps on HH pairs, then `align eval`: the base
    against the SFT adapter on four Vicuna-Bench questions, short greedy replies, judged by the reward model."""
    (tmp_path / "r.yaml").write_text(f"""
name: vicuna
output_dir: {tmp_path}
model: {{base: {GGUF}, quantization: nf4, lora: {{r: 8, alpha: 16, dropout: 0.0}}}}
forgetting: {{enabled: false}}
stages:
  - name: sft
    kind: sft
    data: {{path: {ALPACA}, max_rows: 16}}
    train: {{max_steps: 3, batch_size: 4, lr: 2.0e-4, max_length: 128, max_prompt_length: 96}}
  - name: rm
    kind: rm
    data: {{path: {HH}, skip_bad_rows: true, max_rows: 12}}
    eval_data: {{path: {HH}, skip_bad_rows: true, max_rows: 12}}
    train: {{max_steps: 3, batch_size: 4, lr: 1.0e-4, max_length: 128, max_prompt_length: 96}}
""")
    assert main(["run", str(tmp_path / "r.yaml"), "--quiet"]) == 0
    run = tmp_path / "vicuna"
    assert main(["eval", str(run), "--prompts", str(VICUNA), "--max-prompts", "4", "--max-new-tokens", "16",
                 "--reference", "base", "--stages", "sft", "--quiet"]) == 0
    result = json.loads((run / "eval" / "eval.json").read_text())
    assert list(result["stages"]) == ["base", "sft"]
    assert result["judge"]["name"] == "rm" and result["judge"]["kind"] == "learned"  # the run's rm stage by default
    rm_accuracy = json.loads((run / "rm" / "stage.json").read_text())["metrics"]["eval_accuracy"]
    assert result["judge"]["pairs"] == 12 and result["judge"]["accuracy"] == rm_accuracy  # the rm stage's eval pairs
    sft = result["stages"]["sft"]
    assert sft["win_rate"]["n"] == 4 and sft["kl_to_reference"] > 0 and len(sft["rewards"]) == 4
    assert all(0 < n <= 16 for n in sft["lengths"]) and all(s["responses"]["base"]["text"] for s in result["samples"])
    assert result["samples"][0]["prompt"] == "How can I improve my time management skills?"
    assert (run / "eval" / "report.html").stat().st_size > 10_000


GSM8K = SHARED / "data" / "verifiable" / "gsm8k_train_rows0-999.jsonl.gz"


@pytest.mark.skipif(not GSM8K.is_file(), reason="../shared GSM8K slice absent")
def test_a_grpo_step_on_gsm8k_with_the_math_reward_in_nf4(tmp_path):
    """Plumbing only: a 135M model solves almost no GSM8K problem, so the reward is near zero; the step must run."""
    summary = run_recipe(parse_recipe(f"""
name: gsm8k_grpo
output_dir: {tmp_path}
model: {{base: {GGUF}, quantization: nf4, lora: {{r: 8, alpha: 16, dropout: 0.0}}}}
stages:
  - name: grpo
    kind: grpo
    data: {{path: {GSM8K}, max_rows: 8}}
    rewards: [{{rule: math_answer}}, {{rule: answer_format, weight: 0.2}}]
    grpo: {{prompts_per_step: 2, num_generations: 2, max_new_tokens: 16, minibatch_size: 4, kl_coef: 0.04}}
    train: {{max_steps: 1, lr: 1.0e-5, max_length: 320, max_prompt_length: 256}}
"""), quiet=True)
    grpo = summary["stages"]["grpo"]
    assert grpo["status"] == "done" and grpo["metrics"]["global_step"] == 1
    for key in ("rewards/rule:math_answer/mean", "rewards/rule:answer_format/mean", "kl", "reward_std"):
        assert math.isfinite(grpo["metrics"][key]), key
