"""PPO updates run with dropout off (Huang et al.), set explicitly: not left to whichever adapter load called eval()."""

import torch
from peft.tuners.lora import LoraLayer

from align.config import parse_recipe
from align.pipeline import run_recipe
from align.stages import ppo


def test_updates_run_without_dropout_even_when_no_frozen_adapter_is_loaded(tmp_path, monkeypatch):
    # no init and no reference: nothing loads a frozen adapter (whose load would switch the model to eval mode)
    recipe = f"""
name: modes
output_dir: {tmp_path}
model: {{base: builtin:tiny, quantization: none, lora: {{r: 4, alpha: 8, dropout: 0.5}}}}
stages:
  - name: ppo
    kind: ppo
    data: {{path: "synthetic:prompts", max_rows: 8}}
    rewards: [{{rule: synthetic_tasks, weight: 1.0}}]
    ppo: {{rollout_batch_size: 4, minibatch_size: 2, ppo_epochs: 1, max_new_tokens: 4, kl_coef: 0.0}}
    train: {{max_steps: 1, lr: 1.0e-3, max_length: 64, max_prompt_length: 48}}
"""
    dropout_on = []
    scored = ppo.response_logprobs

    def spy(model, *args, **kwargs):
        if torch.is_grad_enabled():  # an update, not the rollout's own scoring
            lora_dropouts = [d for m in model.modules() if isinstance(m, LoraLayer) for d in m.lora_dropout.values()]
            assert lora_dropouts
            dropout_on.append(any(d.training for d in lora_dropouts))
        return scored(model, *args, **kwargs)

    monkeypatch.setattr(ppo, "response_logprobs", spy)
    run_recipe(parse_recipe(recipe), quiet=True)
    assert dropout_on == [False, False]  # two minibatches, both without dropout
