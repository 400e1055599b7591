"""Per-sequence log-probabilities of completion tokens.

The vocabulary projection is applied only at positions that predict a completion token: for a
49k-token vocabulary it is a fifth of a small model's forward FLOPs and most of its activation memory,
and prompt positions never enter a loss.
"""

from __future__ import annotations

import torch

from align.models.tokens import pad_sequences


def decoder_and_head(model):
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return base.get_decoder(), base.get_output_embeddings()


def completion_logprobs(model, input_ids: torch.Tensor, attention_mask: torch.Tensor, completion_mask: torch.Tensor):
    """Return (sum of log p over completion tokens [B], completion token counts [B]).

    input_ids, attention_mask, completion_mask: [B, T]; completion_mask marks tokens to score.
    """
    decoder, head = decoder_and_head(model)
    hidden = decoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state  # [B, T, H]
    targets_mask = completion_mask[:, 1:].bool()  # [B, T-1]: position t predicts token t+1
    selected = hidden[:, :-1][targets_mask]  # [N, H]
    targets = input_ids[:, 1:][targets_mask]  # [N]
    logits = head(selected).float()  # [N, V]
    token_logps = logits.gather(-1, targets[:, None]).squeeze(-1) - logits.logsumexp(-1)  # [N]
    rows = torch.arange(input_ids.shape[0], device=input_ids.device)[:, None].expand_as(targets_mask)[targets_mask]
    sums = torch.zeros(input_ids.shape[0], device=token_logps.device, dtype=token_logps.dtype)
    sums = sums.index_add(0, rows, token_logps)  # [B]
    return sums, targets_mask.sum(-1)


def packed_token_logprobs(model, batch: dict, temperature: float = 1.0) -> torch.Tensor:
    """[N] the log-prob of every scored token of a `pack_groups` batch, in `score_source` order, under
    softmax(logits / temperature)."""
    decoder, head = decoder_and_head(model)
    input_ids = batch["input_ids"]  # [B, T]
    mask = batch["attention"][:, None]  # [B, 1, T, T]
    if decoder.config._attn_implementation != "sdpa":  # eager attention adds the mask to the scores
        dtype = decoder.get_input_embeddings().weight.dtype
        mask = torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill(~mask, torch.finfo(dtype).min)
    hidden = decoder(input_ids=input_ids, attention_mask=mask, position_ids=batch["position_ids"]).last_hidden_state
    selected = hidden.reshape(-1, hidden.shape[-1])[batch["score_source"]]  # [N, H]
    logits = head(selected).float()  # [N, V]
    if temperature != 1.0:
        logits = logits / temperature
    targets = batch["score_target"]
    return logits.gather(-1, targets[:, None]).squeeze(-1) - logits.logsumexp(-1)  # [N]


def packed_logprobs(model, batch: dict, slots: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed log-probs and token counts [B, slots] of every response in a `pack_groups` batch; 0 in the
    slots of groups with fewer responses."""
    token_logps = packed_token_logprobs(model, batch)  # [N]
    size = batch["input_ids"].shape[0] * slots
    sums = token_logps.new_zeros(size).index_add(0, batch["score_slot"], token_logps)
    counts = torch.bincount(batch["score_slot"], minlength=size)
    return sums.view(-1, slots), counts.view(-1, slots)  # [B, slots]


@torch.no_grad()
def encoded_logprobs(model, pairs: list[tuple[list[int], list[int]]], pad_id: int, batch_size: int):
    """`completion_logprobs` of encoded (prompt ids, completion ids) pairs, in batches of `batch_size`:
    (sums [N], token counts [N]) on the CPU, in float32."""
    sums, counts = [], []
    for start in range(0, len(pairs), batch_size):
        batch = {k: v.to(model.device) for k, v in pad_sequences(pairs[start : start + batch_size], pad_id).items()}
        s, c = completion_logprobs(model, batch["input_ids"], batch["attention_mask"], batch["completion_mask"])
        sums.append(s.float().cpu())
        counts.append(c.cpu())
    return torch.cat(sums), torch.cat(counts)
