"""Token ids for a model: the chat template a base without one gets, the BOS rule, and padding into batches.

Training (`align.data.collate`) and generation (`align.models.generation`) both encode through these, so a prompt
is the same ids in both.
"""

from __future__ import annotations

import torch

# The documented default for base models that ship no chat template: ChatML, the format most open
# chat models use. The collator appends EOS to a completion when the template does not emit it.
DEFAULT_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def wants_bos(tokenizer) -> bool:
    """Whether the tokenizer puts BOS first by itself: then align adds it where a chat template did not."""
    bos = tokenizer.bos_token_id
    return bos is not None and tokenizer("a").input_ids[:1] == [bos]


def encode_prompt(tokenizer, prompt: list[dict]) -> list[int]:
    """Prompt ids for generation, with the same BOS rule as training."""
    ids = tokenizer(tokenizer.apply_chat_template(prompt, add_generation_prompt=True, tokenize=False),
                    add_special_tokens=False).input_ids
    if wants_bos(tokenizer) and ids[:1] != [tokenizer.bos_token_id]:
        ids = [tokenizer.bos_token_id] + ids
    return ids


def pad_sequences(pairs: list[tuple[list[int], list[int]]], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad (prompt, completion) pairs into `input_ids`, `attention_mask`, `completion_mask` [B, T]."""
    width = max(len(p) + len(c) for p, c in pairs)
    input_ids = torch.full((len(pairs), width), pad_id, dtype=torch.long)
    attention = torch.zeros((len(pairs), width), dtype=torch.long)
    completion = torch.zeros((len(pairs), width), dtype=torch.long)
    for i, (p, c) in enumerate(pairs):
        n = len(p) + len(c)
        input_ids[i, :n] = torch.tensor(p + c)
        attention[i, :n] = 1
        completion[i, len(p) : n] = 1
    return {"input_ids": input_ids, "attention_mask": attention, "completion_mask": completion}


def left_pad(prompts: list[list[int]], pad_id: int) -> dict[str, torch.Tensor]:
    """Left-pad prompts for batched generation [B, T]."""
    width = max(map(len, prompts))
    input_ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    attention = torch.zeros((len(prompts), width), dtype=torch.long)
    for i, p in enumerate(prompts):
        input_ids[i, width - len(p) :] = torch.tensor(p)
        attention[i, width - len(p) :] = 1
    return {"input_ids": input_ids, "attention_mask": attention}
