"""Named LoRA adapters on one frozen base: `policy` (trained), `ref` (frozen reference), `value`
(PPO's critic, trained) and `reward` (frozen). The base weights exist once in memory whatever the number of roles.

The reference of a preference stage is the SFT adapter itself, loaded frozen under the name `ref`. The
base with adapters disabled is the pre-SFT model, which is the right reference only when no SFT stage
ran — the silent mistake that QLoRA DPO setups make when they disable adapters to get a reference.
"""

from __future__ import annotations

import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path

POLICY, REF, VALUE = "policy", "ref", "value"


def lora_config(lora_cfg):
    from peft import LoraConfig

    return LoraConfig(
        r=lora_cfg.r,
        lora_alpha=lora_cfg.alpha,
        lora_dropout=lora_cfg.dropout,
        target_modules=lora_cfg.target_modules,
        task_type="CAUSAL_LM",
    )


def with_policy(base, lora_cfg, init: str | None = None):
    """Wrap the base in a PeftModel whose trainable `policy` adapter is new, or a copy of `init`."""
    from peft import PeftModel, get_peft_model

    if init:
        return PeftModel.from_pretrained(base, init, adapter_name=POLICY, is_trainable=True)
    return get_peft_model(base, lora_config(lora_cfg), adapter_name=POLICY)


def with_frozen(base, folders: dict[str, str]):
    """`base` with each folder's adapter loaded frozen under its name (a PeftModel), or `base` itself for none."""
    if not folders:
        return base
    from peft import PeftModel

    (first, folder), *rest = folders.items()
    model = PeftModel.from_pretrained(base, folder, adapter_name=first)
    for name, folder in rest:
        model.load_adapter(folder, adapter_name=name)
    return model


def add_frozen(model, path: str, name: str = REF) -> None:
    model.load_adapter(path, adapter_name=name, is_trainable=False)
    model.set_requires_grad(name, requires_grad=False)


@contextmanager
def using(model, name: str | None):
    """Run the model as adapter `name` (None: adapters off, the bare base), then back to the policy."""
    active = model.active_adapter
    if name is None:
        with model.disable_adapter():
            yield model
        return
    model.set_adapter(name, inference_mode=True)
    try:
        yield model
    finally:
        model.set_adapter(active)
        if name != active:  # set_adapter(active) may leave `name` trainable; the reference stays frozen
            model.set_requires_grad(name, requires_grad=False)


def save(model, out_dir: str | Path, name: str = POLICY) -> Path:
    """Write adapter `name` as a plain PEFT folder at `out_dir` (PEFT itself nests non-default names)."""
    out_dir = Path(out_dir)
    with tempfile.TemporaryDirectory(dir=out_dir.parent) as tmp:
        model.save_pretrained(tmp, selected_adapters=[name])
        nested = Path(tmp) / name
        if out_dir.exists():
            shutil.rmtree(out_dir)
        shutil.move(str(nested if nested.is_dir() else Path(tmp)), out_dir)
    return out_dir


def restore(model, folder: str | Path, name: str = POLICY) -> None:
    """Give adapter `name` the weights saved in `folder` (a checkpoint's copy of it), in place."""
    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file

    set_peft_model_state_dict(model, load_file(str(Path(folder) / "adapter_model.safetensors")), adapter_name=name)
