"""PPO's experience making: sample responses from the policy, then score them with every role.

All four roles are adapters on one base, so "running the reference" means switching the active LoRA
adapter, not running another model. Tensors: P = prompt width (left-padded), R = response width;
`query_response` is [B, P+R] with padding after each response's EOS.

Implementation details of Huang et al. (2023 blog; 2024, arXiv 2403.17031) followed here:
- sampling with no logits processor (no top-k, top-p or repetition penalty from the model's defaults:
  align.models.decoding), so the log-probs we train on are those of the distribution we sampled from;
- the same temperature divides the logits of every log-prob (details "temperature" and "logits
  processing");
- tokens after the first EOS become padding, and a response with no EOS gets `missing_eos_penalty`
  (TRL's missing_eos_penalty; Huang et al. set such scores to a constant instead);
- the score is read at the last real token, the KL penalty is per token (k1), and scores are
  normalised (by running moments here, where Huang et al. fit a gain and bias once before training);
- values are the value head at the position before each response token; GAE with advantage whitening
  over the whole rollout batch.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

import torch

from align.losses.ppo import entropy_from_logits, gae, kl_penalty_rewards, masked_mean, masked_whiten
from align.models import adapters, heads
from align.models.decoding import decode
from align.models.tokens import left_pad


@dataclass
class Rollout:
    query_response: torch.Tensor  # [B, P+R]
    attention_mask: torch.Tensor  # [B, P+R]
    response_mask: torch.Tensor  # [B, R] float: 1 up to and including EOS
    logprobs: torch.Tensor  # [B, R] under the policy that sampled
    values: torch.Tensor  # [B, R]
    advantages: torch.Tensor  # [B, R]
    returns: torch.Tensor  # [B, R]
    prompt_width: int

    def select(self, idx: torch.Tensor) -> Rollout:
        return Rollout(**{f.name: getattr(self, f.name)[idx] for f in fields(self) if f.name != "prompt_width"},
                       prompt_width=self.prompt_width)


def response_logprobs(model, query_response, attention_mask, prompt_width: int, temperature: float):
    """([B, R] log-probs of the response tokens, [B, R] entropy of each next-token distribution).
    The vocabulary head runs only on the positions that predict response tokens."""
    hidden = heads.last_hidden(model, query_response, attention_mask)[:, prompt_width - 1 : -1]  # [B, R, H]
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    logits = base.get_output_embeddings()(hidden).float() / temperature  # [B, R, V]
    targets = query_response[:, prompt_width:]  # [B, R]
    logprobs = logits.gather(-1, targets[..., None]).squeeze(-1) - logits.logsumexp(-1)
    return logprobs, entropy_from_logits(logits.detach())


def response_values(model, head, query_response, attention_mask, prompt_width: int) -> torch.Tensor:
    """[B, R]: the value of the state before each response token."""
    return heads.token_values(model, head, query_response, attention_mask)[:, prompt_width - 1 : -1]


@torch.no_grad()
def sample(model, tokenizer, prompt_ids: list[list[int]], cfg, repeats: int = 1):
    """`repeats` responses of the active (policy) adapter to each prompt, each prompt's adjacent:
    (query_response, attention_mask, response_mask, P)."""
    batch = {k: v.to(model.device) for k, v in left_pad(prompt_ids, tokenizer.pad_token_id).items()}
    response = decode(model, batch["input_ids"], batch["attention_mask"], max_new_tokens=cfg.max_new_tokens,
                      eos_id=tokenizer.eos_token_id, pad_id=tokenizer.pad_token_id, do_sample=True,
                      temperature=cfg.temperature, repeats=repeats)  # [B * repeats, R], padding after EOS
    width = batch["input_ids"].shape[1]
    response_mask = decode_mask(response, tokenizer.eos_token_id)
    query_response = torch.cat([batch["input_ids"].repeat_interleave(repeats, 0), response], 1)
    attention_mask = torch.cat([batch["attention_mask"].repeat_interleave(repeats, 0), response_mask], 1)
    return query_response, attention_mask, response_mask.float(), width


def decode_mask(response: torch.Tensor, eos_id: int) -> torch.Tensor:
    """[B, R] long: 1 up to and including each response's first EOS."""
    is_eos = response == eos_id
    return ((is_eos.long().cumsum(1) - is_eos.long()) == 0).long()


@torch.no_grad()
def make_experience(model, roles, tokenizer, examples, prompt_ids, cfg, kl_coef: float, moments):
    """One rollout batch with its advantages, and the step's rollout metrics.

    `roles` has `value_head`, `rewards` [(reward, weight, label)] and `ref` (adapter name or None).
    """
    was_training = model.training
    model.eval()
    query_response, attention_mask, mask, width = sample(model, tokenizer, prompt_ids, cfg)
    logprobs, entropy = response_logprobs(model, query_response, attention_mask, width, cfg.temperature)
    with adapters.using(model, roles.ref):
        ref_logprobs, _ = response_logprobs(model, query_response, attention_mask, width, cfg.temperature)
    with adapters.using(model, adapters.VALUE):
        values = response_values(model, roles.value_head, query_response, attention_mask, width)
    model.train(was_training)

    texts = tokenizer.batch_decode(query_response[:, width:], skip_special_tokens=True)
    rules = [ex.rule for ex in examples]
    metrics = {}
    scores = torch.zeros(len(texts), device=query_response.device)
    for reward, weight, label in roles.rewards:
        part = reward.score_sampled([ex.prompt for ex in examples], texts, rules, query_response,
                                    attention_mask).to(scores.device)
        metrics[f"reward/{label}"] = float(part.mean())
        scores += weight * part
    ended = (query_response[:, width:] == tokenizer.eos_token_id).any(1)
    penalised = scores - cfg.missing_eos_penalty * (~ended).float()
    if cfg.normalize_rewards:
        moments.update(penalised.cpu())
        penalised = moments.normalize(penalised.cpu()).to(scores.device)
    rewards, kl = kl_penalty_rewards(logprobs, ref_logprobs, penalised, mask, kl_coef)
    advantages, returns = gae(rewards, values * mask, mask, cfg.gamma, cfg.lam)
    if cfg.whiten_advantages:
        advantages = masked_whiten(advantages, mask) * mask
    lengths = mask.sum(1)
    sequence_kl = kl.sum(1)
    metrics.update({
        "objective/kl": float(sequence_kl.mean()),
        "objective/entropy": float((-logprobs * mask).sum(1).mean()),
        "objective/non_score_reward": float((-kl_coef * sequence_kl).mean()),
        "objective/scores": float(scores.mean()),
        "objective/rlhf_reward": float((scores - kl_coef * sequence_kl).mean()),
        "policy/entropy": float(masked_mean(entropy, mask)),
        "val/mean": float(masked_mean(values, mask)),
        "response/length": float(lengths.mean()),
        "response/eos_rate": float(ended.float().mean()),
        "kl/coef": kl_coef,
    })
    rollout = Rollout(query_response, attention_mask, mask, logprobs, values, advantages, returns, width)
    return rollout, texts, metrics
