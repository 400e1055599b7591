"""KL(policy || reference) per token, exact over the whole vocabulary, along given or greedy replies.

Both models are adapters of one PeftModel (None = the bare base). The KL at a reply position is
Σ_v π(v|context) (log π(v|context) − log π_ref(v|context)), summed over the vocabulary instead of the
one-sample estimate log π(y) − log π_ref(y) that PPO uses, so a handful of prompts give a stable number.
"""

from __future__ import annotations

import torch

from align.models import adapters
from align.models.generation import Decoding, evaluating, generate
from align.models.logprobs import decoder_and_head
from align.models.tokens import encode_prompt, pad_sequences


def _reply_distributions(model, batch: dict) -> torch.Tensor:
    """[N, V] log-probs of the next token at every position that predicts a reply token."""
    decoder, head = decoder_and_head(model)
    hidden = decoder(input_ids=batch["input_ids"],
                     attention_mask=batch["attention_mask"]).last_hidden_state  # [B, T, H]
    return head(hidden[:, :-1][batch["completion_mask"][:, 1:].bool()]).float().log_softmax(-1)  # [N, V]


@torch.no_grad()
def kl_along(model, tokenizer, prompts, replies: list[list[int]], policy: str | None, reference: str | None,
             batch_size: int) -> dict:
    """{"kl": per token, "kl_per_reply": mean over replies, "tokens", "per_reply": [...]} along `replies`
    (token ids) to `prompts`. An empty reply adds nothing."""
    per_reply, total, tokens = [], 0.0, 0
    with evaluating(model):
        for start in range(0, len(prompts), batch_size):
            chunk = replies[start : start + batch_size]
            pairs = [(encode_prompt(tokenizer, p), r) for p, r in zip(prompts[start : start + batch_size], chunk)]
            batch = {k: v.to(model.device) for k, v in pad_sequences(pairs, tokenizer.pad_token_id).items()}
            with adapters.using(model, policy):
                policy_logps = _reply_distributions(model, batch)  # [N, V]
            with adapters.using(model, reference):
                reference_logps = _reply_distributions(model, batch)  # [N, V]
            kl = (policy_logps.exp() * (policy_logps - reference_logps)).sum(-1)  # [N]
            per_reply += [float(part.sum()) for part in kl.split([len(r) for r in chunk])]
            total, tokens = total + float(kl.sum()), tokens + kl.numel()
    return {"kl": total / max(tokens, 1), "kl_per_reply": sum(per_reply) / max(len(per_reply), 1), "tokens": tokens,
            "per_reply": per_reply}


def kl_to_reference(model, tokenizer, prompts, policy: str | None, reference: str | None, max_new_tokens: int,
                    batch_size: int) -> dict:
    """`kl_along` the policy's greedy replies to `prompts`. A reply ends with its EOS token when it produces one."""
    with adapters.using(model, policy):
        replies = generate(model, tokenizer, prompts, Decoding(max_new_tokens), batch_size)
    return kl_along(model, tokenizer, prompts, [r.ids for r in replies], policy, reference, batch_size)
