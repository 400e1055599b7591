"""What a model makes of a completion, as one vector: the features that the closed loop's preference ensembles
(align.stages.selection) learn on."""

from __future__ import annotations

import torch

from align.models.logprobs import decoder_and_head
from align.models.tokens import pad_sequences


@torch.no_grad()
def completion_features(model, pairs: list[tuple[list[int], list[int]]], pad_id: int, batch_size: int) -> torch.Tensor:
    """[N, H] the last hidden layer averaged over each completion's tokens, for encoded (prompt ids, completion ids)
    pairs, in float32 on the CPU (zeros for an empty completion)."""
    decoder = decoder_and_head(model)[0]
    out = []
    for start in range(0, len(pairs), batch_size):
        batch = {k: v.to(model.device) for k, v in pad_sequences(pairs[start : start + batch_size], pad_id).items()}
        hidden = decoder(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).last_hidden_state
        mask = batch["completion_mask"].unsqueeze(-1).to(hidden.dtype)  # [B, T, 1]
        sums = (hidden * mask).sum(dim=1).float()  # [B, H]
        out.append((sums / mask.sum(dim=1).float().clamp_min(1)).cpu())
    return torch.cat(out)
