"""Scalar heads on the decoder's last hidden state: the reward model's score head and PPO's value head.

A head is a `Linear(hidden, 1)` that lives beside a LoRA adapter and is saved inside the adapter's
folder (`head.safetensors`), so whoever loads the adapter gets the head back. Reward models trained as
PEFT adapters elsewhere often save only the LoRA weights and reload with a freshly initialised head,
which scores at random without any error; `load_head` refuses a folder that has none.
"""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from align.errors import AlignError

HEAD_FILE = "head.safetensors"


def new_head(hidden_size: int) -> torch.nn.Linear:
    head = torch.nn.Linear(hidden_size, 1)
    # Stiennon et al. 2020 initialise the reward head with std 1/sqrt(d+1) so initial scores are O(1).
    torch.nn.init.normal_(head.weight, std=1 / (hidden_size + 1) ** 0.5)
    torch.nn.init.zeros_(head.bias)
    return head


def save_head(head: torch.nn.Linear, folder: str | Path) -> None:
    save_file({k: v.detach().cpu().contiguous() for k, v in head.state_dict().items()}, str(Path(folder) / HEAD_FILE))


def load_head(folder: str | Path) -> torch.nn.Linear:
    path = Path(folder) / HEAD_FILE
    if not path.is_file():
        raise AlignError(f"{folder}: no {HEAD_FILE} beside the adapter; a reward model must come from an `rm` stage")
    state = load_file(str(path))
    head = torch.nn.Linear(state["weight"].shape[1], 1)
    head.load_state_dict(state)
    return head


def hidden_size(model) -> int:
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return base.config.hidden_size


def position_ids(attention_mask: torch.Tensor) -> torch.Tensor:
    """Positions that count real tokens only, so a left-padded row sees the positions it had in generation."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


def last_hidden(model, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """[B, T, H] under whichever adapter is active (the LoRA layers sit inside the base's modules)."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    out = base.get_decoder()(input_ids=input_ids, attention_mask=attention_mask,
                             position_ids=position_ids(attention_mask))
    return out.last_hidden_state


def last_token_index(attention_mask: torch.Tensor) -> torch.Tensor:
    """[B] index of each row's last real token, whether the padding is on the left or the right."""
    positions = torch.arange(attention_mask.shape[1], device=attention_mask.device)
    return (attention_mask.long() * (positions + 1)).argmax(-1)


def sequence_scores(model, head: torch.nn.Linear, input_ids: torch.Tensor,
                    attention_mask: torch.Tensor) -> torch.Tensor:
    """[B] the head read at each sequence's last real token (for a chat reply: its end-of-turn token)."""
    hidden = last_hidden(model, input_ids, attention_mask)  # [B, T, H]
    last = hidden[torch.arange(hidden.shape[0], device=hidden.device), last_token_index(attention_mask)]  # [B, H]
    return head(last.to(head.weight.dtype)).squeeze(-1)


def token_values(model, head: torch.nn.Linear, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """[B, T] the head at every position."""
    hidden = last_hidden(model, input_ids, attention_mask)
    return head(hidden.to(head.weight.dtype)).squeeze(-1)
