"""Token ids through the chat template (tiny ChatML tokenizer: bos=<|im_start|>, eos=<|im_end|>),
padding, and completion log-probs against the plain full-logits computation."""

import copy

import pytest
import torch
from tokenizers.processors import TemplateProcessing

from align.data.collate import encode, pack_groups
from align.errors import DataError
from align.models.logprobs import completion_logprobs, packed_logprobs
from align.models.tiny import tiny_model_and_tokenizer
from align.models.tokens import encode_prompt, left_pad, pad_sequences

PROMPT = [{"role": "user", "content": "What is 2 + 3? Reply with the number only."}]
ANSWER = "5"
COMPLETION = [{"role": "assistant", "content": ANSWER}]
BIG = 10**6

# ChatML, but the assistant's content is not closed by <|im_end|>: the template writes no EOS.
NO_EOS_TEMPLATE = (
    "{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\n' + m['content'] }}"
    "{% if m['role'] != 'assistant' %}{{ '<|im_end|>\n' }}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
# No special tokens at all: plain "role: content" lines.
PLAIN_TEMPLATE = (
    "{% for m in messages %}{{ m['role'] + ': ' + m['content'] + '\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ 'assistant: ' }}{% endif %}"
)


@pytest.fixture(scope="module")
def model_and_tok():
    model, tok = tiny_model_and_tokenizer()
    return model.eval(), tok


@pytest.fixture(scope="module")
def tok(model_and_tok):
    return model_and_tok[1]


def ids(tok, text):
    return tok(text, add_special_tokens=False).input_ids


def with_bos_added(tok):
    """A copy whose tokenizer prepends BOS to plain text, as Llama-style tokenizers do."""
    tok = copy.deepcopy(tok)
    tok._tokenizer.post_processor = TemplateProcessing(single="<|im_start|> $A",
                                                       special_tokens=[("<|im_start|>", tok.bos_token_id)])
    assert tok("a").input_ids[0] == tok.bos_token_id
    return tok


def test_tiny_tokenizer_is_chatml(tok):
    assert tok.convert_ids_to_tokens([tok.bos_token_id, tok.eos_token_id]) == ["<|im_start|>", "<|im_end|>"]


def test_prompt_ends_with_the_generation_prompt(tok):
    enc = encode(tok, PROMPT, COMPLETION, BIG, BIG)
    suffix = ids(tok, "<|im_start|>assistant\n")
    assert enc.prompt_ids[-len(suffix):] == suffix
    assert tok.decode(enc.prompt_ids) == tok.apply_chat_template(PROMPT, add_generation_prompt=True, tokenize=False)
    assert enc.truncated is False


def test_completion_holds_eos_once_after_the_answer(tok):
    enc = encode(tok, PROMPT, COMPLETION, BIG, BIG)
    assert enc.completion_ids.count(tok.eos_token_id) == 1
    text = tok.decode(enc.completion_ids)
    assert text.startswith(ANSWER + "<|im_end|>")
    # prompt + completion is the rendered conversation up to its end-of-turn token
    rendered = tok.apply_chat_template(PROMPT + COMPLETION, tokenize=False)
    assert (tok.decode(enc.prompt_ids + enc.completion_ids)
            == rendered[: rendered.rindex("<|im_end|>") + len("<|im_end|>")])


def test_completion_stops_at_eos(tok):
    enc = encode(tok, PROMPT, COMPLETION, BIG, BIG)
    assert tok.decode(enc.completion_ids) == ANSWER + "<|im_end|>"


def test_no_double_bos(tok):
    enc = encode(tok, PROMPT, COMPLETION, BIG, BIG)
    assert enc.prompt_ids[0] == tok.bos_token_id and enc.prompt_ids[1] != tok.bos_token_id
    assert encode_prompt(tok, PROMPT) == enc.prompt_ids


def test_no_double_bos_when_the_tokenizer_also_adds_one(tok):
    bos_tok = with_bos_added(tok)  # the ChatML template already starts with <|im_start|>
    enc = encode(bos_tok, PROMPT, COMPLETION, BIG, BIG)
    assert enc.prompt_ids == encode(tok, PROMPT, COMPLETION, BIG, BIG).prompt_ids
    assert enc.prompt_ids[:2].count(bos_tok.bos_token_id) == 1
    assert encode_prompt(bos_tok, PROMPT) == enc.prompt_ids


def test_bos_added_when_wanted_and_the_template_has_none(tok):
    bos_tok = with_bos_added(tok)
    bos_tok.chat_template = PLAIN_TEMPLATE
    enc = encode(bos_tok, PROMPT, COMPLETION, BIG, BIG)
    assert enc.prompt_ids[0] == bos_tok.bos_token_id and enc.prompt_ids[1] != bos_tok.bos_token_id
    assert enc.prompt_ids[1:] == ids(tok, "user: " + PROMPT[0]["content"] + "\nassistant: ")
    assert encode_prompt(bos_tok, PROMPT) == enc.prompt_ids


def test_no_bos_added_when_not_wanted(tok):
    plain = copy.deepcopy(tok)
    plain.chat_template = PLAIN_TEMPLATE
    enc = encode(plain, PROMPT, COMPLETION, BIG, BIG)
    assert tok.bos_token_id not in enc.prompt_ids
    assert enc.completion_ids == ids(tok, ANSWER + "\n") + [tok.eos_token_id]  # EOS appended too


def test_eos_appended_when_the_template_writes_none(tok):
    no_eos = copy.deepcopy(tok)
    no_eos.chat_template = NO_EOS_TEMPLATE
    enc = encode(no_eos, PROMPT, COMPLETION, BIG, BIG)
    assert enc.completion_ids == ids(tok, ANSWER) + [tok.eos_token_id]
    assert enc.completion_ids.count(tok.eos_token_id) == 1
    assert tok.decode(enc.completion_ids) == ANSWER + "<|im_end|>"


def test_template_that_rewrites_the_prompt_is_a_data_error(tok):
    odd = copy.deepcopy(tok)
    odd.chat_template = ("{% for m in messages %}{{ m['content'] }}{% endfor %}"
                         "{% if add_generation_prompt %}{{ ' =>' }}{% endif %}")
    with pytest.raises(DataError) as info:
        encode(odd, PROMPT, COMPLETION, BIG, BIG)
    assert info.value.field == "chat_template"


def test_prompt_truncation_keeps_the_end(tok):
    long_prompt = [{"role": "user", "content": "apple river stone cloud garden " * 10 + "What is 2 + 3?"}]
    full = encode(tok, long_prompt, COMPLETION, BIG, BIG)
    enc = encode(tok, long_prompt, COMPLETION, BIG, 12)
    assert len(full.prompt_ids) > 12
    assert enc.truncated is True
    assert enc.prompt_ids == full.prompt_ids[-12:]
    assert enc.completion_ids == full.completion_ids


def test_completion_truncation_respects_max_length(tok):
    long_answer = [{"role": "assistant", "content": "apple " * 20 + "apple"}]
    full = encode(tok, PROMPT, long_answer, BIG, BIG)
    max_length = len(full.prompt_ids) + 5
    enc = encode(tok, PROMPT, long_answer, max_length, BIG)
    assert enc.truncated is True
    assert enc.prompt_ids == full.prompt_ids
    assert enc.completion_ids == full.completion_ids[:5]
    assert len(enc.prompt_ids) + len(enc.completion_ids) == max_length


def test_both_truncations_together(tok):
    long_prompt = [{"role": "user", "content": "garden " * 30}]
    long_answer = [{"role": "assistant", "content": "river " * 30}]
    full = encode(tok, long_prompt, long_answer, BIG, BIG)
    enc = encode(tok, long_prompt, long_answer, 16, 10)
    assert enc.prompt_ids == full.prompt_ids[-10:]
    assert enc.completion_ids == full.completion_ids[:6]


def test_exact_fit_is_not_truncated(tok):
    full = encode(tok, PROMPT, COMPLETION, BIG, BIG)
    enc = encode(tok, PROMPT, COMPLETION, len(full.prompt_ids) + len(full.completion_ids), len(full.prompt_ids))
    assert (enc.prompt_ids, enc.completion_ids, enc.truncated) == (full.prompt_ids, full.completion_ids, False)


def test_pad_sequences_masks():
    batch = pad_sequences([([1, 2], [3]), ([4], [5, 6, 7])], pad_id=0)
    assert set(batch) == {"input_ids", "attention_mask", "completion_mask"}
    assert all(t.dtype == torch.long for t in batch.values())
    assert torch.equal(batch["input_ids"], torch.tensor([[1, 2, 3, 0], [4, 5, 6, 7]]))
    assert torch.equal(batch["attention_mask"], torch.tensor([[1, 1, 1, 0], [1, 1, 1, 1]]))
    assert torch.equal(batch["completion_mask"], torch.tensor([[0, 0, 1, 0], [0, 1, 1, 1]]))


def test_pad_sequences_uses_the_pad_id():
    batch = pad_sequences([([9], [8]), ([9, 9, 9], [8, 8])], pad_id=-3)
    assert batch["input_ids"][0].tolist() == [9, 8, -3, -3, -3]


def test_left_pad():
    batch = left_pad([[1, 2], [3, 4, 5], [6]], pad_id=0)
    assert torch.equal(batch["input_ids"], torch.tensor([[0, 1, 2], [3, 4, 5], [0, 0, 6]]))
    assert torch.equal(batch["attention_mask"], torch.tensor([[0, 1, 1], [1, 1, 1], [0, 0, 1]]))


def plain_completion_logprobs(model, input_ids, attention_mask, completion_mask):
    logps = model(input_ids=input_ids, attention_mask=attention_mask).logits.float().log_softmax(-1)  # [B, T, V]
    token_logps = logps[:, :-1].gather(-1, input_ids[:, 1:, None]).squeeze(-1)  # position t predicts t+1
    return (token_logps * completion_mask[:, 1:]).sum(-1), completion_mask[:, 1:].sum(-1)


def test_completion_logprobs_match_full_logits(model_and_tok):
    model, tok = model_and_tok
    rows = [
        encode(tok, PROMPT, COMPLETION, BIG, BIG),
        encode(tok, [{"role": "user", "content": "Repeat the word 'apple' 3 times, separated by spaces."}],
               [{"role": "assistant", "content": "apple apple apple"}], BIG, BIG),
    ]
    pairs = [(r.prompt_ids, r.completion_ids) for r in rows]
    batch = pad_sequences(pairs, tok.pad_token_id)
    with torch.no_grad():
        sums, counts = completion_logprobs(model, **batch)
        ref_sums, ref_counts = plain_completion_logprobs(model, **batch)
        alone = [completion_logprobs(model, **pad_sequences([pair], tok.pad_token_id))[0] for pair in pairs]
    assert counts.tolist() == [len(c) for _, c in pairs] == ref_counts.tolist()
    assert sums.shape == (2,) and bool((sums < 0).all())
    torch.testing.assert_close(sums, ref_sums, atol=1e-5, rtol=0)
    torch.testing.assert_close(sums, torch.cat(alone), atol=1e-5, rtol=0)  # right padding changes nothing


@pytest.mark.parametrize("attention", ["sdpa", "eager"])
def test_packed_groups_score_each_response_as_if_alone(attention):
    """The prompt encoded once for all its responses gives every response the log-probs it has on its own."""
    model, tok = tiny_model_and_tokenizer(hidden=64, layers=2)
    model.config._attn_implementation = attention
    g = torch.Generator().manual_seed(0)

    def tokens(n):
        return torch.randint(3, tok.vocab_size, (n,), generator=g).tolist()

    groups = [(tokens(7), [tokens(5), tokens(9)]), (tokens(12), [tokens(3), tokens(6), tokens(1), tokens(8)]),
              (tokens(2), [tokens(11)]), ([], [tokens(4), tokens(6)])]
    batch = pack_groups(groups, tok.pad_token_id)
    with torch.no_grad():
        sums, counts = packed_logprobs(model, batch, slots=4)
        for b, (prompt, responses) in enumerate(groups):
            alone_sums, alone_counts = completion_logprobs(model, **pad_sequences([(prompt, r) for r in responses],
                                                                                  tok.pad_token_id))
            k = len(responses)
            assert counts[b, :k].tolist() == alone_counts.tolist() and counts[b, k:].sum() == 0
            assert (sums[b, :k] - alone_sums).abs().max() < 1e-4 and sums[b, k:].abs().sum() == 0
    tokens_packed = batch["input_ids"].shape[1]
    assert tokens_packed == 12 + 3 + 6 + 1 + 8  # the longest group, its prompt once


def test_length_grouped_batches_pad_less_than_random_ones():
    """`train.group_by_length`: transformers' length-grouped sampler, fed the token counts of our rows."""
    from types import SimpleNamespace

    from align.stages.engine import AlignTrainer, row_tokens

    g = torch.Generator().manual_seed(0)
    sizes = torch.randint(4, 200, (96, 2), generator=g).tolist()
    rows = [{"prompt_ids": [1] * p, "responses": [[2] * r, [3] * (r // 2)], "scores": [1.0, 0.0]} for p, r in sizes]
    assert row_tokens(rows[0]) == sizes[0][0] + sizes[0][1] + sizes[0][1] // 2  # scores are not tokens

    def padded_tokens(order):
        lengths = [row_tokens(rows[i]) for i in order]
        return sum(max(lengths[i:i + 8]) * len(lengths[i:i + 8]) for i in range(0, len(lengths), 8))

    args = SimpleNamespace(train_sampling_strategy="group_by_length", train_batch_size=8, gradient_accumulation_steps=1)
    order = list(AlignTrainer._get_train_sampler(SimpleNamespace(args=args, train_dataset=rows)))
    assert sorted(order) == list(range(96))
    assert padded_tokens(order) < 0.8 * padded_tokens(torch.randperm(96, generator=g).tolist())
