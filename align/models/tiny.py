"""A tiny random Llama and a tokenizer trained on the embedded task's text: for tests and as the
last-resort fallback when no pretrained model can be had offline. Nothing is downloaded."""

from __future__ import annotations

import string
from collections.abc import Iterable
from pathlib import Path

import torch

from align.models.tokens import DEFAULT_CHAT_TEMPLATE

SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
TOKENIZER_FILE = Path(__file__).with_name("tiny_tokenizer.json")  # train_bpe(align.data.synthetic.corpus()), shipped


def train_bpe(texts: Iterable[str], vocab_size: int = 600):
    """A byte-level BPE with ChatML specials learned from `texts`: the same ids every time for the same texts."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet() + list(string.printable),
        show_progress=False,
    )
    bpe.train_from_iterator(texts, trainer=trainer)
    return bpe


def tiny_tokenizer():
    """The BPE learned from the embedded task's text (shipped as a file, so models need not know the task)."""
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer.from_file(str(TOKENIZER_FILE)), bos_token="<|im_start|>", eos_token="<|im_end|>",
        pad_token="<|im_end|>")
    tokenizer.chat_template = DEFAULT_CHAT_TEMPLATE
    return tokenizer


def tiny_model_and_tokenizer(hidden: int = 64, layers: int = 2, seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM

    tokenizer = tiny_tokenizer()
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden,
        intermediate_size=hidden * 2,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=True,
    )
    torch.manual_seed(seed)
    return LlamaForCausalLM(config), tokenizer
