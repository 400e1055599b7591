"""A stage is skipped, and a cached result reused, only on the same resolved model: its bytes, quantization, dtype and
chat template (align.models.identity), never the recipe's string for it. And a stage trained in the same process
leaves the base as loaded, so that what comes after it generates as in a fresh process."""

import dataclasses
import json

import torch

from align.config import parse_recipe
from align.models.generation import Decoding, generate
from align.models.identity import base_identity, content_digest
from align.models.load import load_base
from align.models.tiny import tiny_model_and_tokenizer
from align.pipeline import Pipeline, run_recipe
from align.stages.kind import KINDS


def _save_model(folder, seed: int) -> None:
    model, tokenizer = tiny_model_and_tokenizer(seed=seed)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)


def _recipe(output_dir, base, precision: str = "fp32", template: str = "") -> str:
    return f"""
name: ident
output_dir: {output_dir}
model: {{base: {base}, quantization: none, precision: {precision}, lora: {{r: 4, alpha: 8, dropout: 0.0}}{template}}}
stages:
  - name: sft
    kind: sft
    data: {{path: "synthetic:sft", max_rows: 16}}
    train: {{max_steps: 1, lr: 1.0e-3, batch_size: 8, max_length: 64, max_prompt_length: 48}}
eval: {{tasks: {{path: "synthetic:heldout", max_rows: 4}}, stages: [base, sft], max_new_tokens: 4}}
"""


def test_new_bytes_at_the_same_path_rerun_the_stage_and_regenerate_replies(tmp_path, monkeypatch):
    model_dir = tmp_path / "model"
    _save_model(model_dir, seed=0)
    text = _recipe(tmp_path / "runs", model_dir)
    first = run_recipe(parse_recipe(text), quiet=True)
    trained, generated = [], []
    sft = KINDS["sft"]
    monkeypatch.setitem(KINDS, "sft", dataclasses.replace(sft, run=lambda *a: trained.append(1) or sft.run(*a)))
    monkeypatch.setattr("align.eval.evaluate.generate", lambda *a, **k: generated.append(1) or generate(*a, **k))
    again = run_recipe(parse_recipe(text), quiet=True)
    assert not trained and not generated  # same model: the stage is skipped and the replies come from the cache
    assert again["identity"] == first["identity"]

    _save_model(model_dir, seed=1)  # other weights, the same path and recipe
    changed = run_recipe(parse_recipe(text), quiet=True)
    assert changed["identity"]["weights"] != first["identity"]["weights"]
    assert len(trained) == 1 and len(generated) == 2  # sft trained again; base and sft answered on the new weights
    state = json.loads((tmp_path / "runs" / "ident" / "sft" / "stage.json").read_text())
    assert state["identity"]["dtype"] == "float32" and state["machine"]
    evaluation = json.loads((tmp_path / "runs" / "ident" / "eval" / "eval.json").read_text())
    assert evaluation["identity"] == changed["identity"] and evaluation["machine"] == state["machine"]
    report = (tmp_path / "runs" / "ident" / "eval" / "report.html").read_text()
    assert "Computed in <b>float32</b> on <b>" in report
    change = evaluation["stages"]["base"]["task_accuracy_change"]  # against the sft reference, on the same 4 prompts
    assert change["n"] == 4 and change["low"] <= change["value"] <= change["high"]
    accuracy = {name: st["task_accuracy"] for name, st in evaluation["stages"].items()}
    assert change["value"] == accuracy["base"] - accuracy["sft"]


def test_identity_covers_dtype_and_chat_template_but_not_the_path(tmp_path):
    model_dir = tmp_path / "model"
    _save_model(model_dir, seed=0)
    fp32 = base_identity(parse_recipe(_recipe(tmp_path, model_dir)).model)
    assert base_identity(parse_recipe(_recipe(tmp_path, model_dir, precision="bf16")).model) != fp32
    template = ", chat_template: '{{ messages[0].content }}'"
    assert base_identity(parse_recipe(_recipe(tmp_path, model_dir, template=template)).model) != fp32
    copy = tmp_path / "copy"
    _save_model(copy, seed=0)
    assert base_identity(parse_recipe(_recipe(tmp_path, copy)).model) == fp32  # same bytes elsewhere: same model
    assert content_digest(copy) == content_digest(model_dir)


def test_a_trained_stage_hands_back_the_base_as_loaded(tmp_path):
    """The Trainer turns the KV cache off and leaves training mode on; bf16 replies without the cache differ."""
    recipe = parse_recipe(_recipe(tmp_path, "builtin:tiny"))
    pipeline = Pipeline(recipe, quiet=True)
    with pipeline.host.bare() as fresh:
        use_cache, training = fresh.config.use_cache, fresh.training
    pipeline.run_stage(recipe.stages[0])
    with pipeline.host.bare() as base:
        assert (base.config.use_cache, base.training) == (use_cache, training) == (True, False)
    assert Decoding().kwargs()["use_cache"] is True  # whatever a model's config says

    other, tokenizer = load_base(recipe.model)
    prompts = [[{"role": "user", "content": f"What is {i} plus {i}?"}] for i in range(4)]
    with torch.no_grad(), pipeline.host.bare() as base:
        in_run = generate(base, tokenizer, prompts, Decoding(8), 4)
        assert [r.ids for r in in_run] == [r.ids for r in generate(other, tokenizer, prompts, Decoding(8), 4)]
