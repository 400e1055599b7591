"""The real SmolLM2-135M-Instruct GGUF and real HH-RLHF pairs from ../shared (skipped when absent)."""

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
    assert "rewards/margins" in metrics and metrics["train_loss"] > 0
