"""The CLI's promise: a malformed input gives one clear error naming file, row/line and field/key,
exit code 2, and never a Python traceback. Everything runs in-process on tiny inputs."""

import json
from pathlib import Path

import pytest

import align.models.tiny
import align.ui
from align.cli import main
from align.data.formats import load_examples
from align.errors import DataError

REPO = Path(__file__).resolve().parents[1]
GOOD = {"prompt": "What is 2 + 3?", "chosen": "5", "rejected": "6"}


@pytest.fixture(scope="module")
def tiny_tok():
    return align.models.tiny.tiny_tokenizer()


@pytest.fixture(autouse=True)
def _in_tmp(tmp_path, monkeypatch, tiny_tok):
    # Relative file names keep messages short (no folding of a long tmp path by rich), and
    # `--model builtin:tiny` reuses one tokenizer instead of training a new one per call.
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(align.models.tiny, "tiny_tokenizer", lambda *a, **k: tiny_tok)


def write_lines(name: str, lines: list) -> str:
    Path(name).write_text("".join((line if isinstance(line, str) else json.dumps(line)) + "\n" for line in lines))
    return name


def run(capsys, *argv) -> tuple[int, str]:
    code = main(list(argv))
    captured = capsys.readouterr()
    return code, captured.out + captured.err


def assert_error(code: int, err: str, *expected: str) -> str:
    """Exit 2, one `error:` message, no traceback, and every expected piece in it (wrapping ignored)."""
    assert "Traceback" not in err
    assert code == 2, err
    flat = " ".join(err.split())  # rich wraps long lines at the console width
    assert flat.startswith("error: "), err
    assert flat.count("error:") == 1, err
    for piece in expected:
        assert piece in flat, f"{piece!r} not in {flat!r}"
    return flat


def inspect(capsys, path, *extra) -> tuple[int, str]:
    return run(capsys, "data", "inspect", path, "--model", "builtin:tiny", *extra)


# --- data files -----------------------------------------------------------------------------------


def test_bad_json_line_names_its_line(capsys):
    path = write_lines("broken.jsonl", [GOOD, GOOD, '{"prompt": "q", "chosen": ', GOOD])
    assert_error(*inspect(capsys, path), "broken.jsonl", "row 3", "not valid JSON")


def test_blank_lines_still_count_towards_the_row_number(capsys):
    path = write_lines("blank.jsonl", [GOOD, "", "   ", "{not json}"])
    assert_error(*inspect(capsys, path), "blank.jsonl", "row 4", "not valid JSON")


def test_missing_field(capsys):
    path = write_lines("missing.jsonl", [GOOD, GOOD, {"prompt": "q", "chosen": "a"}])
    assert_error(*inspect(capsys, path), "missing.jsonl", "row 3", "field 'rejected'", "missing")


@pytest.mark.parametrize("row, field", [
    ({"prompt": "q", "chosen": "   ", "rejected": "b"}, "chosen"),
    ({"prompt": "q", "chosen": "a", "rejected": ""}, "rejected"),
])
def test_empty_chosen_or_rejected(capsys, row, field):
    path = write_lines("empty.jsonl", [GOOD, row])
    assert_error(*inspect(capsys, path), "empty.jsonl", "row 2", f"field '{field}'", "is empty")


def test_empty_sft_completion(capsys):
    path = write_lines("sft.jsonl", [{"prompt": "hi", "completion": "hello"}, {"prompt": "hi", "completion": ""}])
    assert_error(*inspect(capsys, path), "sft.jsonl", "row 2", "field 'completion'", "is empty")


def test_wrong_type(capsys):
    path = write_lines("typed.jsonl", [GOOD, {"prompt": "q", "chosen": 5, "rejected": "b"}])
    assert_error(*inspect(capsys, path), "typed.jsonl", "row 2", "field 'chosen'", "got int 5")


def test_wrong_type_on_the_first_row(capsys):
    path = write_lines("typed1.jsonl", [{"prompt": "q", "chosen": 5, "rejected": "b"}])
    assert_error(*inspect(capsys, path), "typed1.jsonl", "row 1", "field 'chosen'")


def test_unknown_format_lists_the_accepted_formats(capsys):
    path = write_lines("odd.jsonl", [{"foo": 1, "bar": 2}])
    flat = assert_error(*inspect(capsys, path), "odd.jsonl", "['bar', 'foo']", "no known format")
    for name in ("preference: prompt, chosen, rejected", "implicit_prompt", "hh_rlhf"):
        assert name in flat


def test_unknown_format_with_an_explicit_kind_lists_that_kinds_formats(capsys):
    path = write_lines("odd_sft.jsonl", [{"foo": 1, "bar": 2}])
    flat = assert_error(*inspect(capsys, path, "--kind", "sft"), "odd_sft.jsonl", "cannot tell the sft data format")
    for name in ("messages", "prompt_completion", "alpaca", "sharegpt", "hh_rlhf"):
        assert name in flat


def test_unknown_format_name(capsys):
    path = write_lines("named.jsonl", [GOOD])
    assert_error(*inspect(capsys, path, "--kind", "preference", "--format", "nope"),
                 "named.jsonl", "'nope'", "implicit_prompt")


def test_missing_data_file(capsys):
    assert_error(*inspect(capsys, "absent.jsonl"), "absent.jsonl", "file not found")


def test_row_out_of_range(capsys):
    path = write_lines("two.jsonl", [GOOD, GOOD])
    assert_error(*inspect(capsys, path, "--row", "5"), "--row 5", "two.jsonl", "2 usable rows")


def write_empty(name: str) -> str:
    """A data file of type `name` (by its extension, a folder without one) that holds no rows."""
    if name.endswith(".parquet"):
        import pyarrow as pa
        import pyarrow.parquet as pq

        pq.write_table(pa.table({"prompt": pa.array([], pa.string())}), name)
    elif "." not in name:
        import datasets

        datasets.Dataset.from_dict({"prompt": []}).save_to_disk(name)
    else:
        Path(name).write_text("")
    return name


@pytest.mark.parametrize("name", ["empty.jsonl", "empty.json", "empty.txt", "empty.parquet", "empty_dataset"])
def test_empty_data_file(capsys, name):
    write_empty(name)
    capsys.readouterr()  # datasets' progress bar
    assert_error(*inspect(capsys, name), name, "no rows")


HH_PAIR = {"chosen": "\n\nHuman: Hi?\n\nAssistant: Hello.", "rejected": "\n\nHuman: Hi?\n\nAssistant: Go away."}


def test_inspect_reads_an_hh_file_as_pairs_even_with_a_bad_row(capsys):
    # The bad row's rejected reply is empty: an error of the preference kind, not a reason to read chosen as SFT.
    path = write_lines("hh.jsonl", [HH_PAIR, {**HH_PAIR, "rejected": "\n\nHuman: Hi?\n\nAssistant: "}])
    assert_error(*inspect(capsys, path), "hh.jsonl", "row 2", "field 'rejected'", "is empty")
    code, err = inspect(capsys, path, "--skip-bad-rows")
    assert code == 0, err
    flat = " ".join(err.split())
    assert "preference / hh_rlhf" in flat
    assert "other kinds (--kind)" in flat and "sft, prompt, ranked, unpaired" in flat


def test_skip_bad_rows_lists_every_skipped_row(capsys):
    path = write_lines("mixed.jsonl", [GOOD, "{oops", GOOD, {"prompt": "q", "chosen": "a"}, GOOD])
    code, err = inspect(capsys, path, "--skip-bad-rows")
    assert "Traceback" not in err
    assert code == 0, err
    flat = " ".join(err.split())
    assert "3 usable, 2 skipped" in flat
    assert "skipped mixed.jsonl, row 2: not valid JSON" in flat
    assert "skipped mixed.jsonl, row 4, field 'rejected'" in flat


def test_inspect_renders_a_good_file(capsys):
    path = write_lines("good.jsonl", [GOOD, {"prompt": "Say hi", "chosen": "hi", "rejected": "no"}])
    code, err = inspect(capsys, path, "--row", "2")
    assert code == 0, err
    assert "preference / preference" in err and "2 usable, 0 skipped" in err
    assert "<|im_start|>assistant" in err and "row 2, chosen" in err and "row 2, rejected" in err
    assert "warning" not in err


def test_inspect_renders_a_task_file(capsys):
    path = write_lines("tasks.jsonl", [{"prompt": "What is 2 + 3?", "rule": {"kind": "exact", "answer": "5"}}])
    code, err = inspect(capsys, path)
    assert code == 0, err
    assert "task / task" in err and "<|im_start|>assistant" in err


def test_inspect_renders_a_file_of_bare_prompts(capsys):
    path = write_lines("prompts.jsonl", [{"prompt": "Say hi."}, {"prompt": "Say bye."}])
    code, err = inspect(capsys, path)
    assert code == 0, err
    assert "prompt / prompt" in err and "Say hi." in err


def test_task_rule_of_unknown_kind_is_a_data_error():
    path = write_lines("tasks.jsonl", [{"prompt": "q", "rule": {"kind": "exact", "answer": "1"}},
                                       {"prompt": "q", "rule": {"kind": "regex", "pattern": "a"}}])
    with pytest.raises(DataError) as info:
        load_examples(path, "task")
    assert (info.value.file, info.value.row, info.value.field) == ("tasks.jsonl", 2, "rule.kind")


def test_unknown_format_with_auto_kind_lists_every_kinds_formats(capsys):
    path = write_lines("odd.jsonl", [{"foo": 1, "bar": 2}])
    assert_error(*inspect(capsys, path), "odd.jsonl", "alpaca", "prompt_completion", "rule")


def test_error_is_one_line_even_on_a_narrow_console(capsys, monkeypatch):
    monkeypatch.setattr(align.ui.console, "_width", 80)  # what rich uses when stderr is piped (CI logs)
    path = write_lines("missing.jsonl", [GOOD, {"prompt": "q", "chosen": "a"}])
    code, err = inspect(capsys, path)
    assert_error(code, err, "row 2")
    assert len(err.strip().splitlines()) == 1, err


# --- recipes --------------------------------------------------------------------------------------

RECIPE = """\
name: t
model:
  base: builtin:tiny
stages:
  - name: sft
    kind: sft
    data: {path: "synthetic:sft"}
    train:
      lr: 1.0e-3
  - name: dpo
    kind: dpo
    init: ${sft.adapter}
    data: {path: "synthetic:preference"}
    loss:
      beta: 0.1
"""


def recipe(name: str, old: str = "", new: str = "") -> str:
    assert old in RECIPE
    Path(name).write_text(RECIPE.replace(old, new, 1))
    return name


def validate(capsys, path, *overrides) -> tuple[int, str]:
    return run(capsys, "validate", path, *overrides)


def test_valid_recipe(capsys):
    code, err = validate(capsys, recipe("ok.yaml"))
    assert code == 0, err
    assert "ok.yaml" in err and "sft (sft) → dpo (dpo)" in err


def test_quickstart_recipe_validates(capsys):
    code, err = validate(capsys, str(REPO / "recipes" / "quickstart.yaml"))
    assert code == 0, err
    assert "recipe 'quickstart'" in err


def test_typo_key_suggests_the_right_one(capsys):
    path = recipe("typo.yaml", "beta: 0.1", "betta: 0.1")
    assert_error(*validate(capsys, path), "typo.yaml:15:", "'stages.dpo.loss.betta'", "did you mean 'beta'?")


def test_wrong_type_in_a_recipe(capsys):
    path = recipe("lr.yaml", "lr: 1.0e-3", "lr: fast")
    assert_error(*validate(capsys, path), "lr.yaml:9:", "'stages.sft.train.lr'", "expected a number, got 'fast'")


def test_missing_required_key(capsys):
    # a block mapping starts at its first key: line 3, inside `model:`
    path = recipe("nobase.yaml", "base: builtin:tiny", "quantization: none")
    assert_error(*validate(capsys, path), "nobase.yaml:3:", "'model.base'", "missing required key 'base'")


def test_reference_to_a_later_stage(capsys):
    path = recipe("later.yaml", "    kind: sft\n", "    kind: sft\n    init: ${dpo.adapter}\n")
    assert_error(*validate(capsys, path), "later.yaml:7:", "'stages.sft.init'", "'${dpo.adapter}'",
                 "only outputs of stages that run before")


def test_reference_to_an_unknown_stage(capsys):
    path = recipe("unknown.yaml", "    kind: sft\n", "    kind: sft\n    init: ${later.adapter}\n")
    assert_error(*validate(capsys, path), "unknown.yaml:7:", "'stages.sft.init'", "there is no stage 'later'")


def test_missing_recipe_file(capsys):
    assert_error(*validate(capsys, "absent.yaml"), "absent.yaml", "recipe file not found")


def test_yaml_syntax_error(capsys):
    path = recipe("syntax.yaml", "    loss:\n", "    loss: [\n")
    assert_error(*validate(capsys, path), "syntax.yaml:", "YAML syntax")


def test_run_on_an_empty_data_file(capsys):
    path = recipe("empty_data.yaml", 'data: {path: "synthetic:sft"}', f"data: {{path: {write_empty('empty.jsonl')}}}")
    assert_error(*run(capsys, "run", path), "empty.jsonl", "no rows")


def test_bad_override_names_the_command_line(capsys):
    assert_error(*validate(capsys, recipe("ov.yaml"), "stages.dpo.loss.betta=3"),
                 "command line", "'stages.dpo.loss.betta'", "did you mean 'beta'?", "override")
