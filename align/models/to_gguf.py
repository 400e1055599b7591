"""A Llama-family transformers model as a GGUF file for llama.cpp and Ollama, written with the `gguf` package's
writer. The writer only writes; what a converter must get right is here:

- tensor names (`model.layers.3.self_attn.q_proj.weight` -> `blk.3.attn_q.weight`), and the Q and K projections
  permuted back from transformers' rotary layout (halves) to llama.cpp's (interleaved pairs), each by its own head
  count: SmolLM2 has 9 query heads and 3 key/value heads;
- the vocabulary, token types (special tokens are control tokens), BPE merges, special token ids and whether BOS is
  added, from the tokenizer the run trained with;
- the pre-tokenizer name, which llama.cpp reads to split text before BPE: a tokenizer gets its name from a table of
  known vocabularies (`PRE_TOKENIZERS`); an unknown one must be named by the caller, since a wrong or missing name
  makes llama.cpp split digits differently than training did;
- the run's chat template, as the tokenizer has it.
f16 keeps every 2-D weight in half precision; q8_0 quantizes them in blocks of 32 (norms stay f32 in both).
`ollama_modelfile` writes the matching Modelfile, whose TEMPLATE is a Go template, not Jinja.
"""

from __future__ import annotations

import hashlib
import re
from pathlib import Path

import numpy as np
import torch

from align.errors import AlignError
from align.models.tokens import wants_bos

# sha256 of the vocabulary (tokens in id order, joined by newlines) -> llama.cpp's pre-tokenizer name
PRE_TOKENIZERS = {"d1f2ce856b324081b621d9e2e8dbd228": "smollm"}  # SmolLM2's 49,152 tokens
LAYER_NAMES = {
    "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm",
    "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
}
TYPES = ("f16", "q8_0")


def vocabulary_key(tokenizer) -> str:
    tokens = tokenizer.convert_ids_to_tokens(list(range(len(tokenizer))))
    return hashlib.sha256("\n".join(tokens).encode()).hexdigest()[:32]


def _rotary_to_interleaved(weight: torch.Tensor, heads: int) -> torch.Tensor:
    """[heads x head_dim, in]: each head's rows reordered from (first half, second half) to (pairs)."""
    rows = weight.shape[0]
    return weight.reshape(heads, 2, rows // heads // 2, *weight.shape[1:]).swapaxes(1, 2).reshape(weight.shape)


def gguf_tensors(model) -> list[tuple[str, torch.Tensor]]:
    """(GGUF name, tensor) of every weight of a Llama-family model; AlignError for anything else."""
    config = model.config
    if config.model_type not in ("llama",) or getattr(config, "attention_bias", False):
        raise AlignError(f"GGUF export handles Llama-family bases (SmolLM2, Llama); this one is "
                         f"'{config.model_type}'")
    out = []
    for name, tensor in model.state_dict().items():
        tensor = tensor.detach().float()
        if name == "model.embed_tokens.weight":
            out.append(("token_embd.weight", tensor))
        elif name == "model.norm.weight":
            out.append(("output_norm.weight", tensor))
        elif name == "lm_head.weight":
            if not config.tie_word_embeddings:
                out.append(("output.weight", tensor))
        elif match := re.fullmatch(r"model\.layers\.(\d+)\.(.+)\.weight", name):
            layer, part = match.groups()
            if part not in LAYER_NAMES:
                raise AlignError(f"GGUF export: no GGUF name for {name}")
            if part == "self_attn.q_proj":
                tensor = _rotary_to_interleaved(tensor, config.num_attention_heads)
            elif part == "self_attn.k_proj":
                tensor = _rotary_to_interleaved(tensor, config.num_key_value_heads)
            out.append((f"blk.{layer}.{LAYER_NAMES[part]}.weight", tensor))
        else:
            raise AlignError(f"GGUF export: no GGUF name for {name}")
    return out


def _token_types(tokenizer) -> list[int]:
    from gguf import TokenType

    added = tokenizer.added_tokens_decoder  # id -> AddedToken
    return [int(TokenType.CONTROL if i in added and added[i].special else
                TokenType.USER_DEFINED if i in added else TokenType.NORMAL) for i in range(len(tokenizer))]


def _merges(tokenizer) -> list[str]:
    import json

    model = json.loads(tokenizer.backend_tokenizer.to_str())["model"]
    if model.get("type") != "BPE":
        raise AlignError(f"GGUF export handles byte-level BPE tokenizers; this one is {model.get('type')}")
    return [m if isinstance(m, str) else " ".join(m) for m in model["merges"]]


def write_gguf(model, tokenizer, path: Path, type: str, name: str, pre: str | None = None,
               license: str | None = None) -> Path:
    """Write `model` (a transformers Llama, weights as they are) and `tokenizer` to the GGUF file `path`."""
    import gguf

    if type not in TYPES:
        raise AlignError(f"--type {type}: choose from {', '.join(TYPES)}")
    pre = pre or PRE_TOKENIZERS.get(vocabulary_key(tokenizer))
    if pre is None:
        raise AlignError("GGUF export: align does not know this tokenizer's pre-tokenizer, and llama.cpp splits text "
                         "differently without the right one; give its llama.cpp name with --pre")
    config = model.config
    tensors = gguf_tensors(model)
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_type("model")
    writer.add_name(name)
    if license:
        writer.add_license(license)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads)
    writer.add_rope_freq_base((getattr(config, "rope_parameters", None) or {}).get("rope_theta", 10000.0))
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    file_type = gguf.LlamaFileType.MOSTLY_F16 if type == "f16" else gguf.LlamaFileType.MOSTLY_Q8_0
    writer.add_file_type(file_type)
    writer.add_vocab_size(len(tokenizer))
    writer.add_rope_dimension_count(getattr(config, "head_dim", config.hidden_size // config.num_attention_heads))
    writer.add_bool(gguf.Keys.Tokenizer.ADD_PREFIX, False)
    writer.add_add_bos_token(wants_bos(tokenizer))
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(pre)
    writer.add_token_list(tokenizer.convert_ids_to_tokens(list(range(len(tokenizer)))))
    writer.add_token_types(_token_types(tokenizer))
    writer.add_token_merges(_merges(tokenizer))
    for add, token_id in ((writer.add_bos_token_id, tokenizer.bos_token_id),
                          (writer.add_eos_token_id, tokenizer.eos_token_id),
                          (writer.add_unk_token_id, tokenizer.unk_token_id),
                          (writer.add_pad_token_id, tokenizer.pad_token_id)):
        if token_id is not None:
            add(token_id)
    if tokenizer.chat_template:
        writer.add_chat_template(tokenizer.chat_template)
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    for tensor_name, tensor in tensors:
        data = tensor.numpy()
        if data.ndim == 1:
            writer.add_tensor(tensor_name, data.astype(np.float32))
        elif type == "f16" or data.shape[-1] % 32:
            writer.add_tensor(tensor_name, data.astype(np.float16))
        else:
            quantized = gguf.quants.quantize(data.astype(np.float32), gguf.GGMLQuantizationType.Q8_0)
            writer.add_tensor(tensor_name, quantized, raw_dtype=gguf.GGMLQuantizationType.Q8_0)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def ollama_modelfile(gguf_name: str, chat_template: str | None, eos_token: str) -> str:
    """An Ollama Modelfile for a ChatML-family template (SmolLM2's, Qwen's): its TEMPLATE in Go template syntax, with
    the default system message the Jinja template adds when a conversation has none."""
    if not chat_template or "<|im_start|>" not in chat_template:
        raise AlignError("an Ollama Modelfile is written for ChatML-style chat templates (<|im_start|>); this model's "
                         "template is not one: use the GGUF alone, whose metadata carries the template")
    default = re.search(r"<\|im_start\|>system(?:\\n|\n)(.+?)<\|im_end\|>", chat_template, re.S)
    system = default.group(1).strip() if default else None
    go = ("{{- if and .Messages (ne (index .Messages 0).Role \"system\") }}<|im_start|>system\n"
          f"{system}<|im_end|>\n{{{{ end }}}}" if system else "")
    go += ("{{- range .Messages }}<|im_start|>{{ .Role }}\n{{ .Content }}<|im_end|>\n{{ end }}"
           "<|im_start|>assistant\n")
    return f'FROM ./{gguf_name}\nTEMPLATE """{go}"""\nPARAMETER stop "{eos_token}"\nPARAMETER stop "<|im_start|>"\n'
