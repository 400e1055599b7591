"""Learned rewards: an `rm` stage's adapter and score head, frozen on the shared base."""

from __future__ import annotations

from pathlib import Path

import torch

from align.data.collate import encode
from align.models import adapters, heads
from align.models.tokens import pad_sequences
from align.rewards.base import Reward


def stage_name(folder: str | Path) -> str:
    """The rm stage that wrote `folder`: runs/<recipe>/<stage>/adapter is called by its stage's name."""
    folder = Path(folder)
    return folder.parent.name if folder.name == "adapter" else folder.name


class LearnedReward(Reward):
    """The reward adapter in `folder`, loaded as the frozen adapter `adapter` with its score head onto `model`,
    a PeftModel over the shared base. Sampled responses are scored on their token ids (`score_sampled`), exactly as
    they were sampled."""

    kind = "learned"
    needs_rules = False

    def __init__(self, model, tokenizer, folder: str | Path, adapter: str, max_length: int = 512,
                 max_prompt_length: int = 256):
        self.model, self.tokenizer, self.adapter, self.name = model, tokenizer, adapter, stage_name(folder)
        self.max_length, self.max_prompt_length = max_length, max_prompt_length  # score texts as the rm stage trained
        if adapter not in model.peft_config:  # a caller that loads all its adapters at once may have loaded it
            adapters.add_frozen(model, str(folder), adapter)
        self.head = heads.load_head(folder).to(model.device).requires_grad_(False)

    @torch.no_grad()
    def score_ids(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """[B] scores of token sequences (prompt + response, padded on either side)."""
        with adapters.using(self.model, self.adapter):
            return heads.sequence_scores(self.model, self.head, input_ids, attention_mask).float()

    def score_sampled(self, prompts, responses, rules, input_ids: torch.Tensor,
                      attention_mask: torch.Tensor) -> torch.Tensor:
        return self.score_ids(input_ids, attention_mask)

    def score(self, prompts, responses: list[str], rules: list[dict] | None = None,
              batch_size: int = 16) -> torch.Tensor:
        out = []
        for i in range(0, len(responses), batch_size):
            pairs = []
            for prompt, response in zip(prompts[i : i + batch_size], responses[i : i + batch_size]):
                enc = encode(self.tokenizer, prompt, [{"role": "assistant", "content": response}],
                             self.max_length, self.max_prompt_length)
                pairs.append((enc.prompt_ids, enc.completion_ids))
            batch = pad_sequences(pairs, self.tokenizer.pad_token_id)
            out.append(self.score_ids(batch["input_ids"].to(self.model.device),
                                      batch["attention_mask"].to(self.model.device)))
        return torch.cat(out).cpu()
