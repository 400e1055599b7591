"""`align export RUN/STAGE`: take a trained stage out of align, for tools that know nothing about it.

- `--merge OUT`: a plain transformers model folder (config, safetensors weights, tokenizer with its chat
  template, generation config) with the stage's LoRA adapter folded into the weights. It loads with
  `AutoModelForCausalLM.from_pretrained(OUT)`: no peft, no bitsandbytes, no align.
- `--adapter-only OUT`: the PEFT adapter (plus the reward head of an `rm` stage) and the tokenizer, with
  `base_model_name_or_path` pointing at a base that loads outside align. Small; needs the base beside it.
Both come with a model card, README.md (align.model_card): the Hub's front matter, a `model-index` with the run's
eval.json values, and how the stage was trained.

Why a merge goes into the dequantized nf4 weights: a QLoRA adapter was trained on top of the 4-bit base,
so the function it learned is `dequant(W_nf4) + BA`, not `W_original + BA`. Merging into the original
full-precision weights would change every layer by the quantization error the adapter compensated for;
merging into the 4-bit weights would re-quantize `W + BA` and lose most of the (small) update. So the
base is loaded exactly as the recipe loads it, dequantized to the recipe's compute dtype, and the
adapter is merged into that: the merged model computes what the adapter model computed.
"""

from __future__ import annotations

import json
import math
import shutil
import uuid
from pathlib import Path

from rich.markup import escape

import align
from align import model_card
from align.errors import AlignError
from align.models.heads import HEAD_FILE
from align.models.load import cache_dir, compute_dtype, load_base, load_tokenizer, resolve_base
from align.runs import open_stage
from align.stages.kind import kind_of
from align.ui import console

EXPORT_FILE = "align_export.json"
CARD_FILE = "README.md"  # the model card (align.model_card), where the Hub and people look first
ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors", HEAD_FILE)


def export_stage(spec: str, out: str, merge: bool, format: str = "transformers", gguf_type: str = "f16",
                 pre: str | None = None) -> Path:
    """Export RUN/STAGE: merge=True writes a merged model folder (`format` transformers, or gguf: a GGUF file of
    `gguf_type` and an Ollama Modelfile), merge=False the PEFT adapter (adapter-only). Returns OUT."""
    out = Path(out)
    run, stage = open_stage(spec)
    adapter = run.adapter(stage)
    kind = run.stage(stage).kind if adapter else "base"
    if out.exists() and not (out.is_dir() and not any(out.iterdir())):
        raise AlignError(f"{out}: already exists and is not empty; export into a new or empty folder")
    if merge and adapter and not kind_of(run.stage(stage)).policy:
        raise AlignError(f"{spec}: a {kind} stage is a reward model (a LoRA adapter plus a score head), not a "
                         "causal LM, so it cannot be merged; use --adapter-only")
    if not merge and adapter is None:
        raise AlignError(f"{spec}: the base has no adapter to export; use --merge to export the (dequantized) base")
    if format == "gguf" and not merge:
        raise AlignError("a GGUF file holds a whole model: use --merge OUT --format gguf")

    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = out.with_name(f".{out.name}.partial-{uuid.uuid4().hex[:8]}")
        tmp.mkdir()  # not tempfile.mkdtemp: its 0700 mode would stay on the user's folder
    except OSError as err:
        raise AlignError(f"{out}: cannot write the export there: {err}") from err
    try:
        model_cfg = run.recipe.model
        resolved = resolve_base(model_cfg.base)
        gguf = {"type": gguf_type, "pre": pre, "name": f"{run.recipe.name}-{stage}"} if format == "gguf" else None
        params = (_merged(model_cfg, resolved, adapter, tmp, gguf) if merge
                  else _adapter_only(model_cfg, resolved, adapter, tmp))
        info = {
            "run": str(run.dir),
            "stage": stage,
            "kind": kind,
            "base": {"recipe": model_cfg.base, "resolved": resolved.description},
            "trained_on_quantization": model_cfg.quantization,
            "export": ("gguf" if format == "gguf" else "merged") if merge else "adapter",
            "align_version": align.__version__,
            "config_hash": run.state(stage).get("config_hash"),
        }
        (tmp / EXPORT_FILE).write_text(json.dumps(info, indent=2))
        (tmp / CARD_FILE).write_text(model_card.render(run, stage, resolved, info["export"]), encoding="utf-8")
        if out.exists():
            out.rmdir()  # checked empty above
        tmp.rename(out)  # all or nothing: a failed export leaves no folder that looks finished
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    size = sum(f.stat().st_size for f in out.rglob("*") if f.is_file())
    console.print(f"[green]exported[/] {escape(str(spec))} ({info['export']}) to {escape(str(out))}: {_human(size)}, "
                  f"{params:,} parameters")
    return out


def _merged(model_cfg, resolved, adapter: str | None, tmp: Path, gguf: dict | None = None) -> int:
    with console.status(f"loading the base ({escape(resolved.description)}, {model_cfg.quantization})"):
        model, tokenizer = load_base(model_cfg, resolved)
    dtype = compute_dtype(model_cfg.precision)
    if model_cfg.quantization == "nf4":
        with console.status("dequantizing the nf4 weights"):
            model = model.dequantize()
    model = model.to(dtype)
    if adapter:
        from peft import PeftModel

        with console.status("merging the adapter"):
            model = PeftModel.from_pretrained(model, adapter).merge_and_unload()
    if gguf:
        from align.models.to_gguf import ollama_modelfile, write_gguf

        file = f"{gguf['name']}-{gguf['type']}.gguf"
        with console.status(f"writing {escape(file)}"):
            write_gguf(model, tokenizer, tmp / file, gguf["type"], gguf["name"], gguf["pre"])
        try:
            (tmp / "Modelfile").write_text(ollama_modelfile(file, tokenizer.chat_template, tokenizer.eos_token))
        except AlignError as err:
            console.print(f"[yellow]no Ollama Modelfile:[/] {escape(str(err))}")
        return model.num_parameters()
    with console.status(f"saving to {escape(str(tmp))}"):
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
    return model.num_parameters()


def _adapter_only(model_cfg, resolved, adapter: str, tmp: Path) -> int:
    from safetensors import safe_open

    with console.status("copying the adapter"):
        for name in ADAPTER_FILES:
            if (Path(adapter) / name).is_file():
                shutil.copy2(Path(adapter) / name, tmp / name)
        config_file = tmp / "adapter_config.json"
        config = json.loads(config_file.read_text())
        config["base_model_name_or_path"] = _base_for_peft(model_cfg, resolved)
        config_file.write_text(json.dumps(config, indent=2))
        _tokenizer(model_cfg, resolved).save_pretrained(tmp)
    params = 0
    for weights in tmp.glob("*.safetensors"):
        with safe_open(str(weights), "pt") as f:
            params += sum(math.prod(f.get_slice(k).get_shape()) for k in f.keys())
    return params


def _base_for_peft(model_cfg, resolved) -> str:
    """A base that `from_pretrained` finds outside align: the hub id as the recipe wrote it, else a local folder."""
    if resolved.tiny:
        # builtin:tiny is built in memory; load_base writes it to the cache only for nf4, so make sure it is there
        folder = cache_dir() / "tiny"
        if not (folder / "config.json").is_file():
            from align.models.tiny import tiny_model_and_tokenizer

            model, tokenizer = tiny_model_and_tokenizer()
            model.save_pretrained(folder)
            tokenizer.save_pretrained(folder)
        return str(folder.resolve())
    if resolved.path == model_cfg.base and not Path(model_cfg.base).is_dir():
        return model_cfg.base  # a hub id
    return str(Path(resolved.path).resolve())


def _tokenizer(model_cfg, resolved):
    if resolved.tiny:
        from align.models.tiny import tiny_tokenizer

        return tiny_tokenizer()
    return load_tokenizer(resolved.path, model_cfg.chat_template)


def _human(size: int) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if size < 1024 or unit == "GB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
