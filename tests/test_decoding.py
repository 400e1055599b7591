"""align's decoding loop (align.models.decoding): greedy replies token for token those of `model.generate`, sampling
from exactly the distribution it claims, prompts run once for repeated samples, and dequantized weights that change
no number."""

import pytest
import torch
from transformers import GenerationConfig
from transformers.generation.logits_process import TopPLogitsWarper

from align.models import adapters
from align.models.decoding import decode, dequantized_weights, next_tokens, want_dequantized
from align.models.load import load_base
from align.models.tokens import encode_prompt, left_pad
from align.settings import ModelConfig

QUESTIONS = ["What is 2 plus 3?", "Name a colour.", "Repeat the word apple three times, please, slowly.",
             "Which is larger, 12 or 7?", "Sort these: pear, fig, kiwi.", "Hi"]


def _policy(cfg: ModelConfig):
    """The tiny base with a policy adapter whose LoRA changes the function (a new adapter's B is zero)."""
    base, tokenizer = load_base(cfg)
    torch.manual_seed(0)
    model = adapters.with_policy(base, cfg.lora)
    for name, param in model.named_parameters():
        if "lora_B" in name:
            param.data.normal_(0, 0.5)
    return base, model.eval(), tokenizer


def _batch(tokenizer):
    return left_pad([encode_prompt(tokenizer, [{"role": "user", "content": q}]) for q in QUESTIONS],
                    tokenizer.pad_token_id)


def _generate(model, tokenizer, batch, max_new_tokens: int) -> torch.Tensor:
    config = GenerationConfig(do_sample=False, max_new_tokens=max_new_tokens, pad_token_id=tokenizer.pad_token_id,
                              eos_token_id=tokenizer.eos_token_id, use_cache=True)
    out = model.generate(**batch, generation_config=config)[:, batch["input_ids"].shape[1]:]
    is_eos = out == tokenizer.eos_token_id
    return out.masked_fill((is_eos.long().cumsum(1) - is_eos.long()) > 0, tokenizer.pad_token_id)


@pytest.mark.parametrize("quantization,dequantized", [("none", False), ("nf4", False), ("nf4", True)])
def test_greedy_replies_are_generates_token_for_token(quantization, dequantized):
    base, model, tokenizer = _policy(ModelConfig(base="builtin:tiny", quantization=quantization, precision="fp32",
                                                 dequantized_generation=dequantized))
    batch = _batch(tokenizer)
    expected = _generate(model, tokenizer, batch, 20)
    want_dequantized(base, dequantized)
    got = decode(model, batch["input_ids"], batch["attention_mask"], max_new_tokens=20,
                 eos_id=tokenizer.eos_token_id, pad_id=tokenizer.pad_token_id)
    assert len(set(map(tuple, got.tolist()))) > 1  # the replies differ: the comparison can fail
    assert torch.equal(got, expected[:, : got.shape[1]])
    assert (expected[:, got.shape[1]:] == tokenizer.pad_token_id).all()  # it stopped where every reply had ended


def test_dequantized_weights_compute_what_bitsandbytes_computes_and_are_given_back():
    base, _ = load_base(ModelConfig(base="builtin:tiny", quantization="nf4", precision="fp32"))
    ids = torch.arange(3, 19)[None]
    with torch.no_grad():
        expected = base(input_ids=ids).logits
        with dequantized_weights(base) as size:
            assert torch.equal(base(input_ids=ids).logits, expected)
        quantized = sum(m.in_features * m.out_features for m in base.modules()
                        if type(m).__name__ == "Linear4bit")
        assert size == 4 * quantized  # fp32: four bytes a parameter, while the block runs
        assert not any("forward" in vars(m) for m in base.modules())  # every layer's own forward is back
        assert torch.equal(base(input_ids=ids).logits, expected)


def test_repeated_samples_run_their_prompt_once_and_match_the_repeated_prompts():
    _, model, tokenizer = _policy(ModelConfig(base="builtin:tiny", quantization="none", precision="fp32"))
    batch = _batch(tokenizer)
    calls = []
    hook = model.get_base_model().get_decoder().register_forward_pre_hook(
        lambda _, args, kwargs: calls.append(kwargs["input_ids"].shape), with_kwargs=True)
    shared = decode(model, batch["input_ids"], batch["attention_mask"], max_new_tokens=6,
                    eos_id=tokenizer.eos_token_id, pad_id=tokenizer.pad_token_id, repeats=3)
    hook.remove()
    assert calls[0] == batch["input_ids"].shape  # the prompts went through the model once, not three times
    assert calls[1][0] == 3 * len(QUESTIONS)
    repeated = decode(model, batch["input_ids"].repeat_interleave(3, 0), batch["attention_mask"].repeat_interleave(
        3, 0), max_new_tokens=6, eos_id=tokenizer.eos_token_id, pad_id=tokenizer.pad_token_id)
    assert torch.equal(shared, repeated)


@pytest.mark.parametrize("temperature,top_p", [(1.0, 1.0), (0.7, 1.0), (1.0, 0.8)])
def test_sampled_tokens_follow_the_tempered_nucleus_distribution(temperature, top_p):
    logits = torch.tensor([2.0, 1.5, 1.0, 0.2, -1.0, -3.0])
    expected = TopPLogitsWarper(top_p)(None, logits[None] / temperature).softmax(-1)[0]  # transformers' nucleus
    torch.manual_seed(0)
    draws = next_tokens(logits.expand(40_000, -1), True, temperature, top_p)
    frequency = torch.bincount(draws, minlength=len(logits)).float() / len(draws)
    assert torch.equal(frequency > 0, expected > 0)  # outside the nucleus: never
    assert torch.allclose(frequency, expected, atol=0.01)  # binomial sd <= 0.0025 at 40k draws
