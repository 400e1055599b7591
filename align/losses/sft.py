"""Supervised fine-tuning loss on completion tokens only (torch only).

The negative log-likelihood of the completion given the prompt, averaged over completion tokens of
the whole batch (each token weighs the same, as in TRL's SFTTrainer with `completion_only_loss`):

    L_SFT = - sum_i sum_{t in completion_i} log p(y_t | x_i, y_<t) / sum_i |completion_i|
"""

from __future__ import annotations

import torch


def sft_loss(completion_logps: torch.Tensor, completion_tokens: torch.Tensor) -> torch.Tensor:
    """completion_logps: [B] summed log-probs of each completion; completion_tokens: [B] their lengths."""
    return -completion_logps.sum() / completion_tokens.sum().clamp(min=1)
