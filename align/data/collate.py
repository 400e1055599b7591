"""Turn schema examples into token ids through the model's chat template, and pad them into batches.

The prompt is rendered with the generation prompt (`<|im_start|>assistant\\n` in ChatML) and the
completion is whatever the full conversation adds after it, so the loss covers exactly the tokens the
model must produce at inference, its end-of-turn token included. Rendered text is tokenized without
the tokenizer's own special tokens (templates already write BOS where the model wants one, and a second
BOS is a classic silent bug); BOS is added only where the tokenizer normally adds one and the template
did not. EOS is appended to a completion that does not contain it, so generation learns to stop.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from align.errors import DataError
from align.models.tokens import wants_bos


@dataclass
class Encoded:
    prompt_ids: list[int]
    completion_ids: list[int]
    truncated: bool = False
    eos_appended: bool = False  # the template does not end the turn with EOS; align added it


def encode(tokenizer, prompt: list[dict], completion: list[dict], max_length: int, max_prompt_length: int) -> Encoded:
    prompt_text = tokenizer.apply_chat_template(prompt, add_generation_prompt=True, tokenize=False)
    full_text = tokenizer.apply_chat_template(prompt + completion, tokenize=False)
    if not full_text.startswith(prompt_text):
        raise DataError(
            "the chat template renders the prompt differently once the answer is appended, so the "
            "completion cannot be located; set model.chat_template to a template whose output grows by "
            "appending",
            field="chat_template",
        )
    prompt_ids = tokenizer(prompt_text, add_special_tokens=False).input_ids
    completion_ids = tokenizer(full_text[len(prompt_text) :], add_special_tokens=False).input_ids
    if wants_bos(tokenizer) and prompt_ids[:1] != [tokenizer.bos_token_id]:
        prompt_ids = [tokenizer.bos_token_id] + prompt_ids
    eos = tokenizer.eos_token_id
    eos_appended = eos is not None and eos not in completion_ids
    if eos_appended:
        completion_ids = completion_ids + [eos]
    elif eos is not None:
        # Generation stops at EOS, so what a template writes after it (ChatML's "\n") is never produced.
        completion_ids = completion_ids[: completion_ids.index(eos) + 1]
    truncated = False
    if len(prompt_ids) > max_prompt_length:  # keep the end of the prompt: the question is usually last
        prompt_ids, truncated = prompt_ids[-max_prompt_length:], True
    room = max_length - len(prompt_ids)
    if len(completion_ids) > room:
        completion_ids, truncated = completion_ids[:room], True
    return Encoded(prompt_ids, completion_ids, truncated, eos_appended)


def pack_groups(groups: list[tuple[list[int], list[list[int]]]], pad_id: int) -> dict[str, torch.Tensor]:
    """Pack each (prompt, K responses) group into one row, the prompt encoded once for all its responses.

    Row b is `prompt + response_0 + ... + response_{K-1}`, right-padded to the longest row (T tokens).
    Each response sees the whole prompt and itself, never another response, and its positions continue
    from the prompt's, so every response's log-probs equal those of `prompt + response` on its own; a
    group of K responses costs P + sum(R_k) tokens instead of K*P + sum(R_k).

    Returns `input_ids`, `position_ids` [B, T]; `attention` [B, T, T] (bool, key allowed for query);
    and for each scored token (every response token) `score_source` (the flat index b*T + t of the
    position whose hidden state predicts it), `score_target` (its id) and `score_slot` (b*K + k, K the
    largest group of the batch), each [N].
    """
    width = max(len(p) + sum(map(len, rs)) for p, rs in groups)
    slots = max(len(rs) for _, rs in groups)
    input_ids = torch.full((len(groups), width), pad_id, dtype=torch.long)
    positions = torch.zeros((len(groups), width), dtype=torch.long)
    attention = torch.eye(width, dtype=torch.bool).repeat(len(groups), 1, 1)  # padding sees itself: no empty row
    source, target, slot = [], [], []
    for b, (prompt, responses) in enumerate(groups):
        n = len(prompt)
        input_ids[b, :n] = torch.tensor(prompt, dtype=torch.long)
        positions[b, :n] = torch.arange(n)
        attention[b, :n, :n] = torch.ones(n, n, dtype=torch.bool).tril()
        start = n
        for k, response in enumerate(responses):
            r = len(response)
            span = slice(start, start + r)
            input_ids[b, span] = torch.tensor(response, dtype=torch.long)
            positions[b, span] = torch.arange(n, n + r)
            attention[b, span, :n] = True
            attention[b, span, span] = torch.ones(r, r, dtype=torch.bool).tril()
            # token j of the response is predicted at the position before it: the prompt's last for j = 0
            # (with no prompt the first token has nothing before it, as at the start of any sequence)
            predictors = ([n - 1] if n else [None]) + list(range(start, start + r - 1))
            scored = [(t, token) for t, token in zip(predictors, response) if t is not None]
            source += [b * width + t for t, _ in scored]
            target += [token for _, token in scored]
            slot += [b * slots + k] * len(scored)
            start += r
    return {"input_ids": input_ids, "position_ids": positions, "attention": attention,
            **{f"score_{name}": torch.tensor(values, dtype=torch.long)
               for name, values in (("source", source), ("target", target), ("slot", slot))}}
