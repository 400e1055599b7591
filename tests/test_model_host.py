"""The model host (align.models.host): one base load per `align run` and per `align eval`, whatever the stages,
forgetting measurements and evaluation borrow, and the base handed back bare even when a borrower fails."""

import pytest
from transformers import AutoModelForCausalLM

from align.cli import main
from align.config import parse_recipe
from align.models.host import ModelHost
from tests.conftest import tiny_recipe

EVAL = """
forgetting: {tasks: {path: "synthetic:heldout"}, max_rows: 6, max_new_tokens: 4, batch_size: 6}
eval: {tasks: {path: "synthetic:heldout", max_rows: 6}, stages: [base, sft, dpo], max_new_tokens: 4, batch_size: 6}
"""


@pytest.fixture
def loads(monkeypatch) -> list:
    """Every model load from disk (the nf4 tiny base is written to the cache and read back, like any base)."""
    seen, original = [], AutoModelForCausalLM.from_pretrained.__func__

    def counting(cls, *args, **kwargs):
        seen.append(args[0] if args else kwargs)
        return original(cls, *args, **kwargs)

    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", classmethod(counting))
    return seen


def test_one_base_load_per_align_run_and_per_align_eval(tmp_path, loads):
    recipe = tmp_path / "tiny.yaml"
    recipe.write_text(tiny_recipe(tmp_path / "runs", quantization="nf4", dpo_steps=2) + EVAL)
    assert main(["run", str(recipe), "--quiet"]) == 0
    assert len(loads) == 1, loads  # two stages, forgetting of each, and the evaluation of three policies
    run_dir = tmp_path / "runs" / "tiny"
    assert (run_dir / "eval" / "eval.json").is_file() and (run_dir / "dpo" / "stage.json").is_file()

    loads.clear()
    assert main(["eval", str(run_dir), "--max-new-tokens", "5", "--out", str(tmp_path / "again"), "--quiet"]) == 0
    assert len(loads) == 1, loads
    assert (tmp_path / "again" / "eval.json").is_file()


def test_a_borrower_that_fails_still_hands_the_base_back_bare(tmp_path):
    host = ModelHost(parse_recipe(tiny_recipe(tmp_path)).model)
    with pytest.raises(RuntimeError), host.policy() as model:
        model.config.use_cache = False
        model.train()
        raise RuntimeError("a stage failed mid-training")
    with host.bare() as base:
        assert not any("lora" in name for name, _ in base.named_modules())
        assert (base.config.use_cache, base.training) == (True, False)
    with host.policy() as model:  # the next borrower gets a fresh policy adapter on the same base
        assert set(model.peft_config) == {"policy"}
