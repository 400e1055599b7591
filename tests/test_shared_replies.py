"""A stage's replies are a function of the resolved base, its adapter and the decoding settings only: the evaluation at
the end of `align run`, after training and forgetting measurements in the same process, gives the same token ids as
`align eval` in a fresh process. On the real SmolLM2 GGUF from ../shared (skipped when absent), in the dtype that
`precision: auto` picks here: in bf16, generation without the KV cache that training had switched off gave other
greedy tokens."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from align.config import parse_recipe
from align.pipeline import run_recipe
from tests.conftest import SHARED

GGUF = SHARED / "models" / "smollm2-135m-instruct-q4_1" / "SmolLM2-135M-Instruct.Q4_1.gguf"
TRAIN = "lr: 1.0e-3, batch_size: 8, max_length: 96, max_prompt_length: 64"


@pytest.mark.slow  # a real 135M model trained, then evaluated twice: ~70 s on 2 cores
@pytest.mark.skipif(not GGUF.is_file(), reason="../shared SmolLM2 GGUF absent")
def test_in_run_replies_equal_a_fresh_process_token_by_token(tmp_path):
    run_recipe(parse_recipe(f"""
name: replies
output_dir: {tmp_path}
model: {{base: {GGUF}, quantization: nf4, lora: {{r: 8, alpha: 16, dropout: 0.0}}}}
stages:
  - name: sft
    kind: sft
    data: {{path: "synthetic:sft", max_rows: 64}}
    train: {{max_steps: 1, {TRAIN}}}
  - name: dpo
    kind: dpo
    init: ${{sft.adapter}}
    data: {{path: "synthetic:preference", max_rows: 16}}
    loss: {{beta: 0.1, rpo_alpha: 1.0}}
    train: {{max_steps: 1, {TRAIN}}}
forgetting: {{enabled: false}}  # the reference precompute is the evaluation-mode forward that DPO trains after
eval:
  tasks: {{path: "synthetic:heldout", max_rows: 14}}
  stages: [base, sft, dpo]
  max_new_tokens: 12
  batch_size: 7
"""), quiet=True)
    run_dir = tmp_path / "replies"
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    command = [sys.executable, "-m", "align.cli", "eval", str(run_dir), "--out", str(tmp_path / "fresh"), "--quiet"]
    subprocess.run(command, env=env, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    in_run = json.loads((run_dir / "eval" / "cache" / "replies.json").read_text())
    fresh = json.loads((tmp_path / "fresh" / "cache" / "replies.json").read_text())
    assert in_run.keys() == fresh.keys() and len(in_run) == 3  # base, sft, dpo on the same prompts and settings
    for key, replies in in_run.items():
        assert [r["ids"] for r in replies] == [r["ids"] for r in fresh[key]]
    in_run_eval = json.loads((run_dir / "eval" / "eval.json").read_text())
    fresh_eval = json.loads((tmp_path / "fresh" / "eval.json").read_text())
    for stage in ("base", "sft", "dpo"):
        assert in_run_eval["stages"][stage]["task_accuracy"] == fresh_eval["stages"][stage]["task_accuracy"]
