import os
from pathlib import Path

import pytest

SHARED = Path(__file__).resolve().parents[1].parent / "shared"


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path_factory, monkeypatch):
    # The tiny nf4 model is written to the cache; keep tests off the user's ~/.cache.
    monkeypatch.setenv("ALIGN_CACHE", os.environ.get("ALIGN_TEST_CACHE") or str(tmp_path_factory.getbasetemp() / "cache"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


def tiny_recipe(output_dir, quantization: str = "none", dpo_steps: int = 12, save_steps: int = 50, extra_dpo: str = "") -> str:
    """A two-stage SFT -> DPO recipe on the tiny random model and the embedded synthetic task."""
    return f"""
name: tiny
output_dir: {output_dir}
model:
  base: builtin:tiny
  quantization: {quantization}
  lora: {{r: 8, alpha: 16, dropout: 0.0}}
stages:
  - name: sft
    kind: sft
    data: {{path: "synthetic:sft", max_rows: 64}}
    train: {{max_steps: 8, lr: 3.0e-3, batch_size: 8, max_length: 96, max_prompt_length: 64}}
  - name: dpo
    kind: dpo
    init: ${{sft.adapter}}
    data: {{path: "synthetic:preference", max_rows: 96}}
    eval_data: {{path: "synthetic:preference_heldout", max_rows: 32}}
    loss: {{type: sigmoid, beta: 0.1}}
    train: {{max_steps: {dpo_steps}, lr: 3.0e-3, batch_size: 8, max_length: 96, max_prompt_length: 64, save_steps: {save_steps}}}
{extra_dpo}
"""
