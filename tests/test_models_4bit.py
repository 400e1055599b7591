"""The 4-bit base computes the same function, with gradients, whatever ran on it before (align.models.load)."""

import torch

from align.models import adapters
from align.models.load import load_base
from align.settings import ModelConfig


def _lora_gradients(base, tokenizer) -> dict[str, torch.Tensor]:
    torch.manual_seed(0)  # the same LoRA initialisation both times
    model = adapters.with_policy(base, ModelConfig(base="builtin:tiny").lora)
    model.train()
    ids = tokenizer("What is 2 plus 3? 5", return_tensors="pt")
    model(**ids, labels=ids["input_ids"]).loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.unload()
    return grads


def test_an_evaluation_before_training_changes_neither_outputs_nor_gradients():
    cfg = ModelConfig(base="builtin:tiny", quantization="nf4", precision="bf16")
    base, tokenizer = load_base(cfg)
    fresh = _lora_gradients(base, tokenizer)
    ids = tokenizer("Hello there", return_tensors="pt")
    with torch.no_grad():
        before = base(**ids).logits
        base.eval()(**ids)  # an eval-mode, no-grad forward: where bitsandbytes would repack its CPU layers
        assert torch.equal(base(**ids).logits, before)
    base.state_dict()  # a save: where bitsandbytes would pack them back with re-quantized scales
    with torch.no_grad():
        assert torch.equal(base(**ids).logits, before)
    after = _lora_gradients(base, tokenizer)
    assert fresh.keys() == after.keys() and len(fresh) > 0
    # every LoRA layer, the lowest included, gets the same gradient: it flows back through the 4-bit layers
    for name, grad in fresh.items():
        assert torch.equal(after[name], grad), name
