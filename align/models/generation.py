"""Batched generation of chat replies from the model as it is (whichever adapter is active): align.models.decoding."""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass

import torch
from transformers.generation.streamers import BaseStreamer

from align.models.decoding import decode
from align.models.tokens import encode_prompt, left_pad


@contextmanager
def evaluating(model):
    """Dropout off for a measurement, and the model's training mode back afterwards, whatever happens."""
    was_training = model.training
    model.eval()
    try:
        yield model
    finally:
        model.train(was_training)


@dataclass
class Reply:
    text: str  # decoded without special tokens
    ids: list[int]  # the generated tokens, up to and including the first EOS where there is one


@dataclass(frozen=True)
class Decoding:
    max_new_tokens: int = 32
    do_sample: bool = False  # False: greedy
    temperature: float = 1.0
    top_p: float = 1.0
    seed: int = 0  # sampling is repeatable: the same seed gives the same replies

    def kwargs(self) -> dict:
        """The same settings for `model.generate` (align chat streams its replies through it)."""
        sampling = {"do_sample": True, "temperature": self.temperature, "top_p": self.top_p} if self.do_sample else {
            "do_sample": False, "temperature": None, "top_p": None, "top_k": None}
        # use_cache whatever the model's config says (the Trainer turns it off): in bf16 replies computed without the
        # KV cache differ from those with it
        return {"max_new_tokens": self.max_new_tokens, "use_cache": True, **sampling}


@torch.no_grad()
def generate(model, tokenizer, prompts: list[list[dict]], decoding: Decoding, batch_size: int,
             on_batch=None) -> list[Reply]:
    """Replies to chat prompts, in order, batched with left padding; `on_batch(n)` after each batch."""
    eos, pad = tokenizer.eos_token_id, tokenizer.pad_token_id
    encoded = [encode_prompt(tokenizer, p) for p in prompts]
    order = sorted(range(len(encoded)), key=lambda i: len(encoded[i]))  # similar lengths pad less
    replies: dict[int, Reply] = {}
    if decoding.do_sample:
        torch.manual_seed(decoding.seed)
    with evaluating(model):
        for start in range(0, len(order), batch_size):
            idx = order[start : start + batch_size]
            batch = {k: v.to(model.device) for k, v in left_pad([encoded[i] for i in idx], pad).items()}
            out = decode(model, batch["input_ids"], batch["attention_mask"], max_new_tokens=decoding.max_new_tokens,
                         eos_id=eos, pad_id=pad, do_sample=decoding.do_sample, temperature=decoding.temperature,
                         top_p=decoding.top_p)
            for i, ids in zip(idx, out.tolist()):
                ids = ids[: ids.index(eos) + 1] if eos in ids else ids
                replies[i] = Reply(tokenizer.decode(ids, skip_special_tokens=True), ids)
            if on_batch:
                on_batch(len(idx))
    return [replies[i] for i in range(len(prompts))]


class TextStream(BaseStreamer):
    """Hands each newly decoded piece of the reply to `on_text` as generate produces tokens (`align chat`, the
    streamed replies of `align serve`); `ids` are the reply's tokens, its EOS included."""

    def __init__(self, tokenizer, on_text):
        self.tokenizer, self.on_text = tokenizer, on_text
        self.ids: list[int] = []
        self.text = ""
        self.prompt_seen = False

    def put(self, value):
        if not self.prompt_seen:  # generate's first put is the prompt
            self.prompt_seen = True
            return
        self.ids.extend(value.reshape(-1).tolist())
        self._emit(final=False)

    def end(self):
        self._emit(final=True)

    def _emit(self, final: bool):
        # Decoding the whole reply, not token by token, keeps multi-byte characters split across tokens intact.
        text = self.tokenizer.decode(self.ids, skip_special_tokens=True)
        if text.endswith("\ufffd") and not final:  # half a character so far; wait for the rest
            return
        piece, self.text = text[len(self.text) :], text
        if piece:
            self.on_text(piece)
