"""Recipe loading: defaults, every kind of mistake located by file/line/key, overrides, references."""

from __future__ import annotations

import dataclasses
import pathlib

import pytest
import yaml

from align.config import load_recipe, parse_recipe
from align.errors import ConfigError
from align.refs import StageRef, parse_refs, resolve_refs
from align.settings import TrainConfig
from align.stages.dpo import DPOStageConfig
from align.stages.kind import KINDS
from align.stages.sft import SFTStageConfig

RECIPES = sorted(p for p in (pathlib.Path(__file__).parents[1] / "recipes").glob("*.yaml")
                 if not p.name.startswith("sweep_"))  # sweep files: tests/test_sweep.py

# Line numbers matter: tests below point at lines of this text (line 1 is `name: quickstart`).
RECIPE = """\
name: quickstart
model:
  base: builtin:smollm2-135m-instruct
stages:
  - name: sft
    kind: sft
    data: {path: data/chats.jsonl}
    train: {lr: 2e-4, max_steps: 3}
  - name: dpo
    kind: dpo
    init: ${sft.adapter}
    reference: ${sft.adapter}
    data:
      path: data/prefs.jsonl
    loss:
      beta: 0.1
eval:
  tasks: {path: synthetic:heldout}
"""


def write(tmp_path, text, name="recipe.yaml"):
    path = tmp_path / name
    path.write_text(text)
    return path


def error(tmp_path, text, overrides=()) -> ConfigError:
    with pytest.raises(ConfigError) as info:
        load_recipe(write(tmp_path, text), overrides)
    return info.value


def assert_at(e: ConfigError, line: int | None, key: str | None, *words: str):
    """The error names the place (file, line, key) and says what is wrong."""
    text = str(e)
    assert e.line == line and e.key == key, text
    if line is not None:
        assert e.file.endswith("recipe.yaml") and f"recipe.yaml:{line}:" in text, text
    if key:
        assert key in text
    for word in words:
        assert word in text, text


def test_valid_recipe_fills_defaults(tmp_path):
    recipe = load_recipe(write(tmp_path, RECIPE))
    assert recipe.path == str(tmp_path / "recipe.yaml")
    assert (recipe.name, recipe.output_dir, recipe.seed) == ("quickstart", "runs", 0)
    assert recipe.model.quantization == "nf4" and recipe.model.precision == "auto"
    assert recipe.model.chat_template is None
    assert (recipe.model.lora.r, recipe.model.lora.alpha, recipe.model.lora.target_modules) == (16, 32, "all-linear")
    sft, dpo = recipe.stages
    assert isinstance(sft, SFTStageConfig) and isinstance(dpo, DPOStageConfig)
    assert sft.train.lr == 2e-4 and isinstance(sft.train.lr, float)
    assert sft.train.max_steps == 3 and sft.train.epochs == 1.0 and sft.train.lr_scheduler == "linear"
    assert sft.train.seed == 0  # null means the recipe's seed, filled in
    assert sft.data.format == "auto" and sft.data.max_rows is None and sft.eval_data is None
    assert dpo.init == dpo.reference == "${sft.adapter}"  # kept unresolved for the pipeline
    assert dpo.precompute_ref is True and dpo.loss.type == "sigmoid" and dpo.loss.label_smoothing == 0.0
    assert dpo.train == TrainConfig(seed=0)
    assert recipe.eval.stages == ["base", "sft", "dpo"] and recipe.eval.max_new_tokens == 32
    assert recipe.stage("dpo") is dpo
    # The pipeline hashes configs: they must be plain data, and equal for equal text.
    assert dataclasses.asdict(recipe)["stages"][1]["loss"]["beta"] == 0.1
    assert parse_recipe(RECIPE) == parse_recipe(RECIPE)


def test_minimal_recipe_without_eval():
    recipe = parse_recipe("name: x\nmodel: {base: m}\nstages: [{name: a, kind: sft, data: {path: d}}]\n")
    assert recipe.eval is None and recipe.path is None and recipe.stages[0].train == TrainConfig(seed=0)


def test_dataclasses_validate_when_built_in_python():
    with pytest.raises(ConfigError, match="must be > 0") as info:
        TrainConfig(lr=0)
    assert info.value.key == "lr"


def test_registry_lists_kinds():
    assert set(KINDS) == {"sft", "rm", "dpo", "rank", "kto", "ppo", "grpo", "label"}
    assert KINDS["sft"].config is SFTStageConfig and KINDS["dpo"].config is DPOStageConfig


def test_unknown_stage_lookup():
    with pytest.raises(ConfigError, match="no stage named 'ppo'"):
        parse_recipe(RECIPE).stage("ppo")


# --- mistakes in the file, each located ---------------------------------------------------------


def test_unknown_key_suggests_the_close_one(tmp_path):
    e = error(tmp_path, RECIPE.replace("      beta: 0.1", "      bta: 0.1"))
    assert_at(e, 16, "stages.dpo.loss.bta", "did you mean 'beta'?")


def test_unknown_key_without_a_close_one_lists_valid_keys(tmp_path):
    e = error(tmp_path, RECIPE + "colour: red\n")
    assert_at(e, 19, "colour", "valid keys:", "stages")


def test_dpo_key_on_sft_stage(tmp_path):
    e = error(tmp_path, RECIPE.replace("    train: {lr: 2e-4, max_steps: 3}", "    loss: {beta: 0.1}"))
    assert_at(e, 8, "stages.sft.loss", "kind sft", "kind rm, dpo")


def test_wrong_type_number(tmp_path):
    e = error(tmp_path, RECIPE.replace("beta: 0.1", "beta: abc"))
    assert_at(e, 16, "stages.dpo.loss.beta", "expected a number, got 'abc'")


def test_bool_is_not_an_int(tmp_path):
    e = error(tmp_path, RECIPE.replace("max_steps: 3", "max_steps: true"))
    assert_at(e, 8, "stages.sft.train.max_steps", "expected an integer")


def test_bool_is_not_a_float(tmp_path):
    e = error(tmp_path, RECIPE.replace("lr: 2e-4", "lr: yes"))
    assert_at(e, 8, "stages.sft.train.lr", "expected a number")


def test_int_is_fine_for_a_float_and_numeric_strings_too():
    recipe = parse_recipe(RECIPE.replace("lr: 2e-4", "lr: 1, epochs: '3', weight_decay: 1E-2"))
    train = recipe.stages[0].train
    assert (train.lr, train.epochs, train.weight_decay) == (1.0, 3.0, 0.01)
    assert all(isinstance(v, float) for v in (train.lr, train.epochs, train.weight_decay))


def test_choice_lists_the_choices(tmp_path):
    e = error(tmp_path, RECIPE.replace("  base: builtin", "  quantization: int8\n  base: builtin"))
    assert_at(e, 3, "model.quantization", "nf4, none", "'int8'")


def test_missing_required_key(tmp_path):
    e = error(tmp_path, RECIPE.replace("    data: {path: data/chats.jsonl}\n", ""))
    assert_at(e, 5, "stages.sft.data", "missing required key 'data'")


def test_missing_kind(tmp_path):
    e = error(tmp_path, RECIPE.replace("    kind: dpo\n", ""))
    assert_at(e, 9, "stages.dpo.kind", "missing", "sft, rm, dpo, rank, kto, ppo")


def test_unknown_kind(tmp_path):
    e = error(tmp_path, RECIPE.replace("kind: dpo", "kind: grpq"))
    assert_at(e, 10, "stages.dpo.kind", "'grpq'", "sft, rm, dpo, rank, kto, ppo, grpo")


def test_duplicate_stage_names(tmp_path):
    e = error(tmp_path, RECIPE.replace("name: dpo", "name: sft"))
    assert_at(e, 9, "stages[1].name", "duplicate stage name 'sft'")


def test_duplicate_yaml_key(tmp_path):
    e = error(tmp_path, RECIPE.replace("      beta: 0.1", "      beta: 0.1\n      beta: 0.2"))
    assert_at(e, 17, "stages.dpo.loss.beta", "duplicate key")


@pytest.mark.parametrize("name, why", [("base", "reserved"), ("2nd", "identifiers")])
def test_bad_stage_name(tmp_path, name, why):
    e = error(tmp_path, RECIPE.replace("name: dpo", f"name: '{name}'"))
    assert_at(e, 9, "stages[1].name" if name[0].isdigit() else "stages.base.name", why)


def test_empty_stages(tmp_path):
    e = error(tmp_path, "name: x\nmodel: {base: m}\nstages: []\n")
    assert_at(e, 3, "stages", "at least one stage")


def test_value_out_of_range(tmp_path):
    e = error(tmp_path, RECIPE.replace("beta: 0.1", "beta: 0"))
    assert_at(e, 16, "stages.dpo.loss.beta", "must be > 0")


def test_cross_field_check_points_at_the_section_when_the_field_is_a_default(tmp_path):
    e = error(tmp_path, RECIPE.replace("max_steps: 3", "max_prompt_length: 600"))
    assert_at(e, 8, "stages.sft.train.max_length", "greater than max_prompt_length")


def test_eval_stages_must_exist(tmp_path):
    e = error(tmp_path, RECIPE + "  stages: [base, sft, rm]\n")
    assert_at(e, 19, "eval.stages[2]", "unknown stage 'rm'")


@pytest.mark.parametrize("line, key, words", [
    ("  judge: dpo", "eval.judge", "is a dpo stage; a judge is an rm stage or a reward card"),
    ("  judge: nope", "eval.judge", "neither an rm stage of this recipe, a reward card (answer_format, concise"),
    ("  reference: sftt", "eval.reference", "unknown stage 'sftt'"),
])
def test_eval_judge_and_reference_are_checked(tmp_path, line, key, words):
    assert_at(error(tmp_path, RECIPE + line + "\n"), 19, key, words)


def test_eval_needs_tasks_or_prompts(tmp_path):
    e = error(tmp_path, RECIPE.replace("  tasks: {path: synthetic:heldout}\n", "  max_new_tokens: 8\n"))
    assert e.key == "eval.tasks" and "give tasks, prompts or both" in str(e)


def test_yaml_syntax_error(tmp_path):
    e = error(tmp_path, RECIPE.replace("    loss:\n", "    loss: [\n"))
    assert_at(e, 17, None, "YAML syntax", "expected ',' or ']'")  # line 17, `eval:`: where the open list breaks


def test_top_level_must_be_a_mapping(tmp_path):
    assert_at(error(tmp_path, "- a\n- b\n"), 1, None, "mapping")


def test_empty_file(tmp_path):
    assert "empty" in str(error(tmp_path, ""))


def test_missing_file(tmp_path):
    with pytest.raises(ConfigError, match="not found") as info:
        load_recipe(tmp_path / "nope.yaml")
    assert info.value.file.endswith("nope.yaml")


# --- references ------------------------------------------------------------------------------------


def test_parse_and_resolve_refs():
    assert parse_refs("${sft.adapter}/x and ${rm.dir}") == [StageRef("sft", "adapter"), StageRef("rm", "dir")]
    assert parse_refs("plain") == []
    outputs = {"sft": {"adapter": "runs/q/sft/adapter"}}
    assert resolve_refs("${sft.adapter}", outputs) == "runs/q/sft/adapter"
    with pytest.raises(ConfigError, match="not available"):
        resolve_refs("${sft.dir}", outputs)


@pytest.mark.parametrize("ref, line, key, words", [
    ("${dpo.adapter}", 11, "stages.dpo.init", ["before stages.dpo"]),  # itself
    ("${nope.adapter}", 11, "stages.dpo.init", ["no stage 'nope'"]),
    ("${sft.nope}", 11, "stages.dpo.init", ["unknown output 'nope'", "adapter, dir"]),
    ("${sft}", 11, "stages.dpo.init", ["malformed"]),
])
def test_bad_references(tmp_path, ref, line, key, words):
    e = error(tmp_path, RECIPE.replace("init: ${sft.adapter}", f"init: '{ref}'"))
    assert_at(e, line, key, ref, *words)


def test_reference_to_a_later_stage(tmp_path):
    e = error(tmp_path, RECIPE.replace("data: {path: data/chats.jsonl}", "data: {path: '${dpo.dir}/x.jsonl'}"))
    assert_at(e, 7, "stages.sft.data.path", "${dpo.dir}", "before stages.sft")


def test_eval_may_use_any_stage():
    recipe = parse_recipe(RECIPE.replace("synthetic:heldout", "'${dpo.dir}/tasks.jsonl'"))
    assert recipe.eval.tasks.path == "${dpo.dir}/tasks.jsonl"


# --- command-line overrides ----------------------------------------------------------------------


def test_overrides(tmp_path):
    recipe = load_recipe(write(tmp_path, RECIPE), [
        "stages.dpo.loss.beta=0.05",  # nested, stage by name
        "model.lora.r=8",
        "stages.0.train.max_steps=5",  # stage by index
        "model.lora.target_modules=[q_proj, v_proj]",  # list value
        "stages.sft.eval_data.path=data/dev.jsonl",  # a section absent from the file
        "stages.dpo.train.lr=5e-6",
        "model.chat_template=null",
        "eval.stages=[base, dpo]",
    ])
    assert recipe.stage("dpo").loss.beta == 0.05
    assert recipe.model.lora.r == 8 and recipe.model.lora.target_modules == ["q_proj", "v_proj"]
    assert recipe.stage("sft").train.max_steps == 5
    assert recipe.stage("sft").eval_data.path == "data/dev.jsonl"
    assert recipe.stage("dpo").train.lr == 5e-6
    assert recipe.eval.stages == ["base", "dpo"]


def test_override_fills_a_null_section():
    text = RECIPE.replace("    kind: sft\n", "    kind: sft\n    eval_data: null\n")
    assert parse_recipe(text, overrides=["stages.sft.eval_data.path=d"]).stage("sft").eval_data.path == "d"


@pytest.mark.parametrize("override, key, words", [
    ("stages.dpo.loss.bta=0.05", "stages.dpo.loss.bta", ["did you mean 'beta'?"]),
    ("stages.ppo.loss.beta=0.05", "stages.ppo.loss.beta", ["'ppo'"]),
    ("stages.sft.loss.beta=0.05", "stages.sft.loss", ["kind rm, dpo"]),
    ("model.lora.r=abc", "model.lora.r", ["expected an integer"]),
    ("model.base.x=1", "model.base.x", ["not a mapping"]),
    ("stages.sft.train.lr=0", "stages.sft.train.lr", ["must be > 0"]),
    ("model.lora.r", None, ["key=value"]),
])
def test_bad_overrides_name_the_command_line(override, key, words):
    with pytest.raises(ConfigError) as info:
        parse_recipe(RECIPE, "recipe.yaml", overrides=[override])
    e = info.value
    assert e.file == "command line" and e.line is None and e.key == key, str(e)
    assert override in str(e) and all(w in str(e) for w in words), str(e)


# --- the recipes shipped with the repo -------------------------------------------------------------


NO_RECIPES = pytest.param(None, id="none", marks=pytest.mark.skip(reason="no recipes/*.yaml yet"))


@pytest.mark.parametrize("path", [pytest.param(p, id=p.name) for p in RECIPES] or [NO_RECIPES])
def test_shipped_recipe_is_valid(path):
    from align.data.formats import load_examples

    recipe = load_recipe(path)
    written = yaml.safe_load(path.read_text())["stages"]
    assert [stage.name for stage in recipe.stages] == [stage["name"] for stage in written]  # all of them, in order
    # The embedded data a recipe names exists, as the kind its stage reads: a misspelt split or family fails here.
    sections = [(source, KINDS[s.kind].data) for s in recipe.stages for source in s.sources]
    sections += [(s.eval_data, KINDS[s.kind].held_out) for s in recipe.stages if s.eval_data]
    sections += [(recipe.eval.tasks, "task"), (recipe.eval.prompts, "prompt")] if recipe.eval else []
    sections += [(recipe.forgetting.retention, "sft"), (recipe.forgetting.tasks, "task")]
    for section, kind in sections:
        if section is not None and section.path.startswith("synthetic:"):
            assert load_examples(section.path, kind, max_rows=2).examples


@pytest.mark.parametrize("kind, loss, key, words", [
    ("rank", "type: listnet", "stages.dpo.loss.type", ["'listnet'", "plackett_luce, lipo, pro, rrhf"]),
    ("rank", "sft_weight: -1", "stages.dpo.loss.sft_weight", ["must be >= 0"]),
    ("kto", "undesirable_weight: 0", "stages.dpo.loss.undesirable_weight", ["must be > 0"]),
    ("dpo", "type: ipo, label_smoothing: 0.1", "stages.dpo.loss.label_smoothing", ["sigmoid and simpo only"]),
    ("dpo", "type: simpo, gamma_beta_ratio: -0.5", "stages.dpo.loss.gamma_beta_ratio", ["must be >= 0"]),
    ("dpo", "smooth_by_agreement: true, label_smoothing: 0.1", "stages.dpo.loss.smooth_by_agreement",
     ["one or the other"]),
])
def test_ranking_and_dpo_family_losses_are_checked(tmp_path, kind, loss, key, words):
    text = RECIPE.replace("kind: dpo", f"kind: {kind}").replace("    loss:\n      beta: 0.1", f"    loss: {{{loss}}}")
    assert_at(error(tmp_path, text), 15, key, *words)
