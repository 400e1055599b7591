"""Which model a run is really on: the identity that every stage's config hash and every run-folder cache
(eval replies, forgetting measurements, reference log-probs and replay buffers in a stage folder) keys on.

A recipe's `model.base` is a name, and what a name resolves to can change under it: `builtin:smollm2-135m-instruct`
falls back to a tiny random model until its package is installed, a file is replaced in place, a hub repository
gets a new revision, `precision: auto` picks bf16 on one CPU and fp32 on another. So the identity is what was
resolved and how it computes: the weights' content digest (or the hub revision), the quantization, the compute
dtype and the chat template actually used. Digests are cached by path, size and modification time, so hashing a
model's files happens once per file version.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
from functools import lru_cache
from pathlib import Path

import torch

from align.errors import AlignError
from align.models.load import ResolvedBase, cache_dir, compute_dtype, load_tokenizer, resolve_base
from align.models.tokens import DEFAULT_CHAT_TEMPLATE


def base_identity(model_cfg, resolved: ResolvedBase | None = None) -> dict:
    """What `model_cfg` (a recipe's `model` section) resolves to on this machine (`resolved`, where the caller has
    it): weights, quantization, compute dtype and chat template. Equal identities compute the same function;
    anything else must not share results."""
    resolved = resolved or resolve_base(model_cfg.base)
    return {
        "weights": weights_identity(resolved),
        "quantization": model_cfg.quantization,
        "dtype": dtype_name(compute_dtype(model_cfg.precision)),
        "chat_template": _digest_text(_chat_template(resolved, model_cfg.chat_template)),
    }


def identity_key(identity: dict) -> str:
    """A short stable key of an identity, for cache keys and file names."""
    return hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:16]


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def machine() -> str:
    """The processor that computed a result, with the features that decide `precision: auto` and its numbers."""
    name = platform.processor() or platform.machine()
    flags: set[str] = set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "model name":
                name = value.strip()
            elif key.strip() == "flags":
                flags = set(value.split())
    except OSError:
        pass
    features = [f for f in ("avx2", "avx512f", "avx512_bf16", "amx_bf16") if f in flags]
    gpu = f", {torch.cuda.get_device_name()}" if torch.cuda.is_available() else ""
    return f"{name} ({' '.join(features) or 'no avx2'}){gpu}"


def weights_identity(resolved: ResolvedBase) -> str:
    if resolved.tiny:
        return "builtin:tiny"  # built from a fixed config and seed in align.models.tiny
    if resolved.revision:
        return f"{resolved.source}@{resolved.revision}"
    if Path(resolved.source).exists():
        return f"sha256:{content_digest(Path(resolved.source))}"
    return f"{resolved.source}@{_hub_revision(resolved.source)}"


def _hub_revision(hub_id: str) -> str:
    """The commit that from_pretrained will fetch for a hub model not in the local cache."""
    from huggingface_hub import HfApi

    try:
        return HfApi().model_info(hub_id).sha
    except Exception as err:  # noqa: BLE001 - offline, unknown or private: one message for all
        raise AlignError(f"model.base: '{hub_id}' is not in the local Hugging Face cache and the hub cannot be asked "
                         f"for it ({type(err).__name__}); download it first, or give a local folder or .gguf") from err


def content_digest(path: Path) -> str:
    """sha256 over a file's bytes, or over a folder's files (relative names and their digests, sorted)."""
    if path.is_file():
        return _file_digest(str(path.resolve()))
    digest = hashlib.sha256()
    for file in sorted(p for p in path.rglob("*") if p.is_file()):
        digest.update(f"{file.relative_to(path).as_posix()}\0{_file_digest(str(file.resolve()))}\n".encode())
    return digest.hexdigest()


def _file_digest(path: str) -> str:
    stat = os.stat(path)
    key = f"{path}:{stat.st_size}:{stat.st_mtime_ns}"
    store = cache_dir() / "digests.json"
    known = json.loads(store.read_text()) if store.is_file() else {}
    if key not in known:
        digest = hashlib.sha256()
        with open(path, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 22), b""):
                digest.update(chunk)
        known = {k: v for k, v in known.items() if not k.startswith(f"{path}:")}  # older versions of this file
        known[key] = digest.hexdigest()
        store.parent.mkdir(parents=True, exist_ok=True)
        tmp = store.with_name(f"{store.name}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps(known))
        tmp.replace(store)
    return known[key]


@lru_cache(maxsize=8)
def _chat_template(resolved: ResolvedBase, chat_template: str | None) -> str:
    """The template the stages will render with: the recipe's own, the tokenizer's, or align's default."""
    if resolved.tiny:
        return DEFAULT_CHAT_TEMPLATE  # the tiny model's tokenizer always has it (align.models.tiny)
    return load_tokenizer(resolved.path, chat_template).chat_template


def _digest_text(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()[:16]
