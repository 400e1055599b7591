"""`align export`: a merged folder that plain transformers loads and that generates what the adapter model
generates, an adapter-only folder that peft loads onto its base, and clear errors before anything loads."""

import json

import pytest
import torch
from safetensors import safe_open

from align import export
from align.config import parse_recipe
from align.errors import AlignError
from align.export import export_stage
from align.models.load import cache_dir, keep_4bit_layout
from align.models.tokens import encode_prompt
from align.runs import load_stage_model, open_run, save_recipe
from tests.conftest import tiny_ppo_recipe

PROMPTS = ["What is 3 plus 4?", "Uppercase the word apple.", "Which is larger, 12 or 7?"]


def _prompt_ids(tokenizer, text: str) -> torch.Tensor:
    return torch.tensor([encode_prompt(tokenizer, [{"role": "user", "content": text}])])


def _greedy(model, ids: torch.Tensor) -> list[int]:
    with torch.no_grad():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=12, do_sample=False)
    return out[0, ids.shape[1]:].tolist()


def _logits(model, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(ids).logits


def test_merge_generates_what_the_adapter_model_generates(tiny_run, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = export_stage(str(tiny_run / "dpo"), str(tmp_path / "merged"), merge=True)

    config = json.loads((out / "config.json").read_text())
    assert "quantization_config" not in config
    assert config["dtype"] == "float32"  # the recipe's compute dtype on this CPU
    with safe_open(str(out / "model.safetensors"), "pt") as f:
        assert not [k for k in f.keys() if "lora" in k], "LoRA weights left in the merged folder"
    assert (out / "generation_config.json").is_file()
    info = json.loads((out / export.EXPORT_FILE).read_text())
    assert info["stage"] == "dpo" and info["kind"] == "dpo" and info["export"] == "merged"
    assert info["trained_on_quantization"] == "nf4"
    run = open_run(tiny_run)
    assert info["config_hash"] == run.state("dpo")["config_hash"]

    merged = AutoModelForCausalLM.from_pretrained(out)
    tokenizer = AutoTokenizer.from_pretrained(out)
    assert tokenizer.chat_template
    reference, ref_tokenizer = load_stage_model(run, "dpo")
    base_out = export_stage(str(tiny_run / "base"), str(tmp_path / "base"), merge=True)
    base = AutoModelForCausalLM.from_pretrained(base_out)
    for text in PROMPTS:
        ids = _prompt_ids(tokenizer, text)
        assert ids.tolist() == _prompt_ids(ref_tokenizer, text).tolist()
        assert _greedy(merged, ids) == _greedy(reference, ids)
        # dequant(W_nf4) + BA in fp32 against the nf4 layer plus LoRA: the same up to rounding
        torch.testing.assert_close(_logits(merged, ids), _logits(reference, ids), atol=1e-5, rtol=0)
        # and the adapter did change the model: the merge is not a no-op
        assert (_logits(merged, ids) - _logits(base, ids)).abs().max() > 1e-3


def test_adapter_only_loads_onto_its_base_with_peft(tiny_run, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig

    out = export_stage(str(tiny_run / "dpo"), str(tmp_path / "adapter"), merge=False)

    for name in ("adapter_config.json", "adapter_model.safetensors", "tokenizer.json", export.EXPORT_FILE):
        assert (out / name).is_file(), name
    assert not (out / "head.safetensors").exists()  # only rm stages have a head
    base_path = json.loads((out / "adapter_config.json").read_text())["base_model_name_or_path"]
    assert base_path == str((cache_dir() / "tiny").resolve())  # builtin:tiny is no hub id: the local folder
    assert json.loads((out / export.EXPORT_FILE).read_text())["export"] == "adapter"
    assert AutoTokenizer.from_pretrained(out).chat_template

    # the adapter was trained on the nf4 base, so load that base the way the recipe does
    nf4 = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                             bnb_4bit_compute_dtype=torch.float32)
    base = AutoModelForCausalLM.from_pretrained(base_path, dtype=torch.float32, quantization_config=nf4)
    keep_4bit_layout(base)  # as align computes: no bitsandbytes repacking for AVX512-BF16 CPUs (2e-3 off in logits)
    peft_model = PeftModel.from_pretrained(base, out)
    reference, tokenizer = load_stage_model(open_run(tiny_run), "dpo")
    ids = _prompt_ids(tokenizer, PROMPTS[0])
    torch.testing.assert_close(_logits(peft_model, ids), _logits(reference, ids), atol=1e-6, rtol=0)


def test_out_that_is_not_empty_is_refused_and_kept(tiny_run, tmp_path):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "notes.txt").write_text("keep me")
    with pytest.raises(AlignError, match="mine: already exists and is not empty"):
        export_stage(str(tiny_run / "dpo"), str(out), merge=True)
    assert [p.name for p in out.iterdir()] == ["notes.txt"]


def test_a_failed_export_leaves_no_folder(tiny_run, tmp_path, monkeypatch):
    def fail(*args):
        raise RuntimeError("disk full")

    monkeypatch.setattr(export, "_merged", fail)
    with pytest.raises(RuntimeError, match="disk full"):
        export_stage(str(tiny_run / "dpo"), str(tmp_path / "merged"), merge=True)
    assert list(tmp_path.iterdir()) == []


def test_base_has_no_adapter_to_export(tiny_run, tmp_path):
    with pytest.raises(AlignError, match="base has no adapter.*--merge"):
        export_stage(str(tiny_run / "base"), str(tmp_path / "out"), merge=False)


def test_unknown_stage(tiny_run, tmp_path):
    with pytest.raises(AlignError, match="no stage 'nope'; choose from: base, sft, dpo"):
        export_stage(str(tiny_run / "nope"), str(tmp_path / "out"), merge=True)


def test_reward_model_cannot_be_merged(tmp_path):
    # a run folder that says its rm stage finished is enough: the refusal comes before any model loads
    recipe = parse_recipe(tiny_ppo_recipe(tmp_path))
    run_dir = tmp_path / recipe.name
    (run_dir / "rm").mkdir(parents=True)
    save_recipe(recipe, run_dir)
    (run_dir / "rm" / "stage.json").write_text(json.dumps({"status": "done",
                                                          "adapter": str(run_dir / "rm" / "adapter")}))
    with pytest.raises(AlignError, match="rm stage .* cannot be merged; use --adapter-only"):
        export_stage(str(run_dir / "rm"), str(tmp_path / "out"), merge=True)


def test_command_line(tiny_run, tmp_path, capsys):
    from align.cli import main

    assert main(["export", str(tiny_run / "dpo"), "--adapter-only", str(tmp_path / "adapter")]) == 0
    assert (tmp_path / "adapter" / "adapter_config.json").is_file()
    assert main(["export", str(tiny_run / "nope"), "--merge", str(tmp_path / "merged")]) == 2
    assert "no stage 'nope'" in capsys.readouterr().err and not (tmp_path / "merged").exists()
