"""Model resolution and tokenizer setup that need no pretrained weights."""

import json

import pytest
import torch

from align.errors import AlignError
from align.models.load import compute_dtype, fast_bf16_available, load_tokenizer, resolve_base
from align.models.tiny import tiny_tokenizer
from align.models.tokens import DEFAULT_CHAT_TEMPLATE


def test_a_tokenizer_without_chat_template_gets_the_documented_default(tmp_path):
    tok = tiny_tokenizer()
    tok.chat_template = None
    tok.save_pretrained(tmp_path)
    loaded = load_tokenizer(str(tmp_path))
    assert loaded.chat_template == DEFAULT_CHAT_TEMPLATE
    text = loaded.apply_chat_template([{"role": "user", "content": "hi"}], add_generation_prompt=True, tokenize=False)
    assert text == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"


def test_the_models_own_template_is_kept_and_a_recipe_template_overrides_it(tmp_path):
    tok = tiny_tokenizer()
    tok.chat_template = "{% for m in messages %}[{{ m['content'] }}]{% endfor %}"
    tok.save_pretrained(tmp_path)
    assert load_tokenizer(str(tmp_path)).chat_template == tok.chat_template
    override = tmp_path / "t.jinja"
    override.write_text("{% for m in messages %}<{{ m['content'] }}>{% endfor %}")
    assert load_tokenizer(str(tmp_path), str(override)).chat_template == override.read_text()


def test_resolution_of_bases(tmp_path):
    assert resolve_base(str(tmp_path)).path == str(tmp_path)  # a local folder
    assert resolve_base("HuggingFaceTB/SmolLM2-135M-Instruct").path == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert resolve_base("builtin:tiny").tiny
    with pytest.raises(AlignError, match="does not exist"):
        resolve_base(str(tmp_path / "missing.gguf"))
    with pytest.raises(AlignError, match="unknown builtin"):
        resolve_base("builtin:gpt5")


def test_precision_auto_picks_bf16_only_with_fast_bf16_hardware():
    assert compute_dtype("fp32") == torch.float32 and compute_dtype("bf16") == torch.bfloat16
    assert compute_dtype("auto") == (torch.bfloat16 if fast_bf16_available() else torch.float32)


def test_the_shipped_tiny_tokenizer_is_the_one_learned_from_the_embedded_task():
    # align.models cannot import align.data, so the tiny model's BPE ships as a file; it must not drift from the task
    from align.data.synthetic import corpus
    from align.models.tiny import TOKENIZER_FILE, train_bpe

    learned = train_bpe(corpus())
    assert json.loads(TOKENIZER_FILE.read_text()) == json.loads(learned.to_str()), (
        "the embedded task's text changed: rewrite the file with `python -c 'from align.models.tiny import *; "
        "from align.data.synthetic import corpus; train_bpe(corpus()).save(str(TOKENIZER_FILE))'`")
    texts = ["<|im_start|>user\nWhich is larger: 97 or 28?<|im_end|>", "héllo ✓"]
    assert [tiny_tokenizer()(text).input_ids for text in texts] == [e.ids for e in learned.encode_batch(texts)]
