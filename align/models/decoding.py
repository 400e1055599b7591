"""The KV-cached decoding loop behind every rollout, evaluation and collection: faster than `model.generate` and,
greedy, token for token the same (scripts/bench_rollout.py measures both).

Where `generate`'s time goes on a CPU, and what this loop does instead:
- its first step takes the vocabulary logits of a strided slice of the prompt's hidden states, and torch multiplies
  that by one copy of the vocabulary matrix per sequence (B x H x V: 1.8 GB for 32 SmolLM2 sequences), once per
  call; here the vocabulary head sees the last position only, contiguous;
- sampling draws one exponential number per vocabulary entry and sequence (`torch.multinomial`); here one uniform
  number per sequence picks the token from the cumulative distribution (inverse CDF: the same distribution);
- a prompt sampled G times (GRPO's groups, `collect generate --samples`) is run through the model once and its KV
  cache repeated G times;
- `DynamicCache` concatenates each new token's keys and values onto the whole cache, copying it at every token of
  every layer (on a CPU as long as the model's own matmuls for 32 sequences); here each layer's cache is one buffer
  sized for the whole reply that every token is written into;
- with `model.dequantized_generation`, each 4-bit weight is dequantized once per call instead of once per token.
  That copy costs 2 (bf16) or 4 (fp32) bytes per quantized parameter for as long as the call runs, so it is off by
  default: the one 4-bit base stays the only copy of the weights.
No logits processors run (no top-k, repetition penalty or minimum length from the model's generation config), so a
reply depends on the base, the adapter and the sampling settings only, and sampled log-probs are those of the
distribution the tokens came from.
"""

from __future__ import annotations

from contextlib import contextmanager, nullcontext

import torch
import torch.nn.functional as F
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer

DEQUANTIZED = "align_dequantized_generation"  # the attribute on the base that `model.dequantized_generation` sets


def want_dequantized(base, on: bool) -> None:
    """Record on a loaded base whether its generation dequantizes the 4-bit weights once per call."""
    setattr(base, DEQUANTIZED, on)


@contextmanager
def dequantized_weights(model):
    """Every 4-bit linear layer computes with a dequantized copy of its weight until the block ends: the numbers
    bitsandbytes would compute (it dequantizes to the input's dtype, then `F.linear`), without redoing it each call."""
    import bitsandbytes as bnb

    swapped, size = [], 0
    for module in model.modules():
        if isinstance(module, bnb.nn.Linear4bit):
            state = module.weight.quant_state
            weight = bnb.functional.dequantize_4bit(module.weight, state).to(module.compute_dtype or state.dtype)
            module.forward = _dense_forward(weight, module.bias)  # an instance attribute shadows the class's
            swapped.append(module)
            size += weight.numel() * weight.element_size()
    try:
        yield size
    finally:
        for module in swapped:
            del module.forward


def _dense_forward(weight: torch.Tensor, bias: torch.Tensor | None):
    bias = None if bias is None else bias.to(weight.dtype)  # cast once, not at every token

    def forward(x: torch.Tensor) -> torch.Tensor:
        return F.linear(x.to(weight.dtype), weight, bias).to(x.dtype)

    return forward


class _BufferLayer(DynamicLayer):
    """A `DynamicLayer` whose keys and values are the first `length` positions of a buffer of `capacity`: the same
    tensors attention reads from a `DynamicLayer`, without a copy of the whole cache per token."""

    def __init__(self, capacity: int):
        super().__init__()
        self.capacity, self.length = capacity, 0

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        if not self.is_initialized:  # [B, heads, capacity, head_dim]
            shape = (*key_states.shape[:2], self.capacity, key_states.shape[3])
            self.key_buffer, self.value_buffer = key_states.new_empty(shape), value_states.new_empty(shape)
            self.dtype, self.device, self.is_initialized = key_states.dtype, key_states.device, True
        end = self.length + key_states.shape[-2]
        self.key_buffer[:, :, self.length : end] = key_states
        self.value_buffer[:, :, self.length : end] = value_states
        self.length = end
        self.keys, self.values = self.key_buffer[:, :, :end], self.value_buffer[:, :, :end]
        return self.keys, self.values

    def batch_repeat_interleave(self, repeats: int) -> None:
        self.key_buffer = self.key_buffer.repeat_interleave(repeats, dim=0)
        self.value_buffer = self.value_buffer.repeat_interleave(repeats, dim=0)
        self.keys, self.values = self.key_buffer[:, :, : self.length], self.value_buffer[:, :, : self.length]


def next_tokens(logits: torch.Tensor, do_sample: bool, temperature: float, top_p: float) -> torch.Tensor:
    """[B] tokens from [B, V] logits: the argmax, or a draw from softmax(logits / temperature) cut to its top-p
    nucleus (the smallest set of most likely tokens whose probability reaches `top_p`, as transformers' TopPLogitsWarper
    keeps), by inverse CDF with the global torch RNG."""
    if not do_sample:
        return logits.argmax(-1)
    probs = (logits.float() / temperature).softmax(-1)  # [B, V]
    if top_p < 1.0:
        sorted_probs, order = probs.sort(-1, descending=True)
        outside = sorted_probs.cumsum(-1) - sorted_probs > top_p  # mass before the token already reaches top_p
        probs = torch.zeros_like(probs).scatter_(-1, order, sorted_probs.masked_fill(outside, 0.0))
    cdf = probs.cumsum(-1)  # [B, V]
    draw = torch.rand(probs.shape[0], 1, device=probs.device) * cdf[:, -1:]  # [B, 1]
    token = torch.searchsorted(cdf, draw, right=True).squeeze(1)  # the first token whose cdf exceeds the draw
    return token.clamp(max=probs.shape[1] - 1)  # a draw that rounds onto the total


@torch.no_grad()
def decode(model, input_ids: torch.Tensor, attention_mask: torch.Tensor, *, max_new_tokens: int, eos_id: int,
           pad_id: int, do_sample: bool = False, temperature: float = 1.0, top_p: float = 1.0,
           repeats: int = 1) -> torch.Tensor:
    """[B * repeats, R] tokens that follow each left-padded prompt of `input_ids` [B, P], each prompt's `repeats`
    replies adjacent; after a reply's EOS come `pad_id`s, and R <= max_new_tokens ends where every reply has ended."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    decoder, head = base.get_decoder(), base.get_output_embeddings()
    weights = dequantized_weights(base) if getattr(base, DEQUANTIZED, False) else nullcontext()
    with weights:
        cache = DynamicCache(config=base.config)
        if all(type(layer) is DynamicLayer for layer in cache.layers):  # sliding-window layers keep their own
            cache.layers = [_BufferLayer(input_ids.shape[1] + max_new_tokens) for _ in cache.layers]
        positions = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)  # [B, P] as generate counts them
        hidden = decoder(input_ids=input_ids, attention_mask=attention_mask, position_ids=positions,
                         past_key_values=cache, use_cache=True).last_hidden_state[:, -1]  # [B, H]
        if repeats > 1:
            cache.batch_repeat_interleave(repeats)
            hidden = hidden.repeat_interleave(repeats, 0)
            attention_mask = attention_mask.repeat_interleave(repeats, 0)
            positions = positions.repeat_interleave(repeats, 0)
        position = positions[:, -1:]  # [N, 1]
        ended = torch.zeros(hidden.shape[0], dtype=torch.bool, device=hidden.device)  # [N]
        tokens = []
        for _ in range(max_new_tokens):
            token = next_tokens(head(hidden.contiguous()), do_sample, temperature, top_p).masked_fill(ended, pad_id)
            tokens.append(token)
            ended |= token == eos_id
            if ended.all() or len(tokens) == max_new_tokens:
                break
            attention_mask = torch.cat([attention_mask, attention_mask.new_ones(attention_mask.shape[0], 1)], 1)
            position = position + 1
            hidden = decoder(input_ids=token[:, None], attention_mask=attention_mask, position_ids=position,
                             past_key_values=cache, use_cache=True).last_hidden_state[:, -1]
    return torch.stack(tokens, 1)
