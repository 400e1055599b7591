"""retention_nll and kl_to_reference on the tiny model: against full-logits hand computations, after
training, and across adapters (LoRA's lora_B starts at zero, so a fresh adapter is the bare base)."""

import copy
import math

import pytest
import torch
from peft import get_peft_model

from align.data import synthetic
from align.data.collate import encode
from align.eval.forgetting import retention_nll
from align.eval.kl import kl_to_reference
from align.models import adapters
from align.models.load import load_base, resolve_base
from align.models.logprobs import completion_logprobs
from align.models.tokens import encode_prompt, pad_sequences
from align.settings import LoraConfig, ModelConfig

LORA = adapters.lora_config(LoraConfig(r=4, alpha=8, dropout=0.0))
MAX_LENGTH, MAX_PROMPT, NEW_TOKENS = 96, 64, 6


def tiny_peft(*perturbed: str):
    """A PeftModel over a fresh tiny base: adapter `fresh` (the base itself) and the `perturbed` ones."""
    cfg = ModelConfig(base="builtin:tiny", quantization="none")
    base, tokenizer = load_base(cfg, resolve_base(cfg.base))
    model = get_peft_model(base, LORA, adapter_name="fresh")
    for seed, name in enumerate(perturbed):
        model.add_adapter(name, LORA)
        torch.manual_seed(seed)
        for param_name, param in model.named_parameters():
            if f"lora_B.{name}." in param_name:
                param.data.normal_(0, 0.5)
    model.set_adapter("fresh")
    return model, tokenizer


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """Matrices this small run fastest on one thread, and many times slower when several threads
    spin-wait for a CPU that another job keeps busy."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def tiny():
    return tiny_peft("moved", "other")


@pytest.fixture(scope="module")
def prompts():
    return [ex.prompt for ex in synthetic.load("heldout", "task", n=3)]


def test_retention_nll_is_the_token_weighted_nll_of_full_logits(tiny):
    model, tokenizer = tiny
    examples = synthetic.load("sft", "sft", n=4)
    with adapters.using(model, "moved"):
        # a padded batch and a lone one
        out = retention_nll(model, tokenizer, examples, MAX_LENGTH, MAX_PROMPT, batch_size=3)
        total, tokens, lengths = 0.0, 0, set()
        with torch.no_grad():
            for ex in examples:
                enc = encode(tokenizer, ex.prompt, ex.completion, MAX_LENGTH, MAX_PROMPT)
                ids = torch.tensor([enc.prompt_ids + enc.completion_ids])  # [1, T]
                logps = model(input_ids=ids).logits[0, :-1].float().log_softmax(-1)  # [T-1, V]
                picked = logps.gather(-1, ids[0, 1:, None])[len(enc.prompt_ids) - 1 :, 0]  # [completion tokens]
                total, tokens = total - float(picked.sum()), tokens + len(picked)
                lengths.add(len(picked))
    assert len(lengths) > 1  # unequal completions: a mean of per-example means would differ
    assert out["tokens"] == tokens
    assert out["nll"] == pytest.approx(total / tokens, abs=1e-4)
    assert out["perplexity"] == pytest.approx(math.exp(out["nll"]), rel=1e-9)


def test_retention_nll_falls_when_an_adapter_learns_the_examples():
    model, tokenizer = tiny_peft()
    examples = synthetic.load("sft", "sft", n=8)
    before = retention_nll(model, tokenizer, examples, MAX_LENGTH, MAX_PROMPT, batch_size=8)["nll"]
    batch = pad_sequences([(e.prompt_ids, e.completion_ids) for e in
                           (encode(tokenizer, ex.prompt, ex.completion, MAX_LENGTH, MAX_PROMPT) for ex in examples)],
                          tokenizer.pad_token_id)
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model.train()
    for _ in range(5):
        logps, counts = completion_logprobs(model, **batch)
        loss = -logps.sum() / counts.sum()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    after = retention_nll(model, tokenizer, examples, MAX_LENGTH, MAX_PROMPT, batch_size=3)["nll"]
    assert model.training  # put back in training mode
    assert after < before - 0.2  # 6.33 -> 5.96 measured


def test_kl_is_zero_against_itself_and_positive_against_a_perturbed_adapter(tiny, prompts):
    model, tokenizer = tiny
    for name in ("fresh", "moved"):
        same = kl_to_reference(model, tokenizer, prompts, name, name, NEW_TOKENS, batch_size=2)
        assert abs(same["kl"]) < 1e-6 and abs(same["kl_per_reply"]) < 1e-6
        assert same["tokens"] == NEW_TOKENS * len(prompts)  # the random model never says <|im_end|>
    model.train()
    out = kl_to_reference(model, tokenizer, prompts, "fresh", "moved", NEW_TOKENS, batch_size=2)
    assert model.training and model.active_adapter == "fresh"  # mode and adapter as they were
    assert out["kl"] > 0.01
    assert out["kl_per_reply"] * len(prompts) == pytest.approx(out["kl"] * out["tokens"], rel=1e-5)
    model.eval()


def test_kl_does_not_depend_on_the_batching(tiny, prompts):
    model, tokenizer = tiny
    alone = kl_to_reference(model, tokenizer, prompts, "moved", "other", NEW_TOKENS, batch_size=1)
    batched = kl_to_reference(model, tokenizer, prompts, "moved", "other", NEW_TOKENS, batch_size=3)  # left padding
    assert batched["tokens"] == alone["tokens"]
    assert batched["kl"] == pytest.approx(alone["kl"], rel=1e-4)


def brute_force_kl(model, tokenizer, prompt, policy, reference) -> torch.Tensor:
    """[R] KL(policy || reference) at each token of the policy's greedy reply, from full-sequence logits."""
    ids = torch.tensor([encode_prompt(tokenizer, prompt)])  # [1, P]
    with torch.no_grad():
        with adapters.using(model, policy):
            # an explicit mask: with pad != eos, generate would mask the prompt's <|im_end|> tokens as padding
            reply = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=NEW_TOKENS, do_sample=False,
                                   pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
            reply = reply[0, ids.shape[1]:].tolist()
            if tokenizer.eos_token_id in reply:
                reply = reply[: reply.index(tokenizer.eos_token_id) + 1]
            sequence = torch.tensor([ids[0].tolist() + reply])  # [1, P + R]
            p = model(input_ids=sequence).logits[0].float().log_softmax(-1)  # [P + R, V]
        with adapters.using(model, reference):
            q = model(input_ids=sequence).logits[0].float().log_softmax(-1)  # [P + R, V]
    at_reply = slice(ids.shape[1] - 1, sequence.shape[1] - 1)  # positions that predict a reply token
    return (p[at_reply].exp() * (p[at_reply] - q[at_reply])).sum(-1)


def test_kl_matches_a_brute_force_sum_over_the_vocabulary(tiny, prompts):
    model, tokenizer = tiny
    kl = brute_force_kl(model, tokenizer, prompts[0], "moved", "other")
    out = kl_to_reference(model, tokenizer, prompts[:1], "moved", "other", NEW_TOKENS, batch_size=1)
    assert out["tokens"] == len(kl) == NEW_TOKENS  # the random model never says <|im_end|>
    assert out["kl"] == pytest.approx(float(kl.mean()), rel=1e-4)
    assert out["kl_per_reply"] == pytest.approx(float(kl.sum()), rel=1e-4)


def test_a_reply_ends_with_its_eos_token(tiny, prompts):
    model, tokenizer = tiny
    ids = torch.tensor([encode_prompt(tokenizer, prompts[0])])  # [1, P]
    with torch.no_grad(), adapters.using(model, "moved"):
        second = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=2, do_sample=False,
                                pad_token_id=tokenizer.pad_token_id)[0, -1]
    stopping = copy.deepcopy(tokenizer)
    stopping.eos_token = tokenizer.convert_ids_to_tokens(int(second))  # the first reply now stops at its 2nd token
    kls = [brute_force_kl(model, stopping, prompt, "moved", "fresh") for prompt in prompts]
    assert len(kls[0]) == 2 and max(map(len, kls)) == NEW_TOKENS  # another goes on, in the same batch
    out = kl_to_reference(model, stopping, prompts, "moved", "fresh", NEW_TOKENS, batch_size=3)
    assert out["tokens"] == sum(map(len, kls))
    assert out["kl"] == pytest.approx(float(torch.cat(kls).mean()), rel=1e-4)
    assert out["kl_per_reply"] == pytest.approx(sum(float(kl.sum()) for kl in kls) / len(kls), rel=1e-4)


def test_none_is_the_bare_base(tiny, prompts):
    model, tokenizer = tiny
    to_base = kl_to_reference(model, tokenizer, prompts, "moved", None, NEW_TOKENS, batch_size=2)
    to_fresh = kl_to_reference(model, tokenizer, prompts, "moved", "fresh", NEW_TOKENS, batch_size=2)
    assert to_base["kl"] > 0.01 and to_base["kl"] == pytest.approx(to_fresh["kl"], rel=1e-4)
    assert abs(kl_to_reference(model, tokenizer, prompts, None, "fresh", NEW_TOKENS, batch_size=2)["kl"]) < 1e-6
    assert kl_to_reference(model, tokenizer, prompts, None, "moved", NEW_TOKENS, batch_size=2)["kl"] > 0.01
    assert model.active_adapter == "fresh"
