import gzip
import json
import os
from pathlib import Path

import pytest

from align.data.formats import FORMATS, describe_formats, load_examples
from align.data.schemas import PreferenceExample, SFTExample, TaskExample
from align.data.sources import fingerprint, read_rows
from align.errors import DataError

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"
HH_FILE = SHARED / "preference" / "hh_rlhf_helpful_base_test_rows0-499.jsonl.gz"
ALPACA_FILE = SHARED / "sft" / "alpaca_sample_rows0-2999.jsonl.gz"


def user(text):
    return {"role": "user", "content": text}


def bot(text):
    return {"role": "assistant", "content": text}


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def load_one(tmp_path, row, kind, format="auto"):
    return load_examples(write_jsonl(tmp_path / "d.jsonl", [row]), kind, format=format)


def raises(tmp_path, rows, kind, format="auto", **kwargs) -> DataError:
    path = write_jsonl(tmp_path / "d.jsonl", rows) if isinstance(rows, list) else rows
    with pytest.raises(DataError) as info:
        load_examples(path, kind, format=format, **kwargs)
    return info.value


# --- every format converts right, and auto-detection picks it -------------------------------------

SYS = {"role": "system", "content": "Be brief."}
SFT_CASES = [
    ("messages", {"messages": [SYS, user("a"), bot("b"), user("c"), bot("d")]},
     SFTExample([SYS, user("a"), bot("b"), user("c")], [bot("d")])),
    ("prompt_completion", {"prompt": "hi", "completion": "hello"}, SFTExample([user("hi")], [bot("hello")])),
    ("prompt_completion", {"prompt": [SYS, user("hi")], "completion": [bot("yo")]},
     SFTExample([SYS, user("hi")], [bot("yo")])),
    ("alpaca", {"instruction": "Sum", "input": "1 2", "output": "3"}, SFTExample([user("Sum\n\n1 2")], [bot("3")])),
    ("alpaca", {"instruction": "Hi", "input": "", "output": "Hey"}, SFTExample([user("Hi")], [bot("Hey")])),
    ("alpaca", {"instruction": "Hi", "output": "Hey"}, SFTExample([user("Hi")], [bot("Hey")])),
    ("sharegpt", {"conversations": [{"from": "system", "value": "Be brief."}, {"from": "human", "value": "a"},
                                    {"from": "gpt", "value": "b"}]}, SFTExample([SYS, user("a")], [bot("b")])),
    ("hh_rlhf", {"chosen": "\n\nHuman: q1\n\nAssistant: a1\n\nHuman: q2\n\nAssistant: a2", "rejected": "x"},
     SFTExample([user("q1"), bot("a1"), user("q2")], [bot("a2")])),
]
PREF_CASES = [
    ("preference", {"prompt": "q", "chosen": "good", "rejected": "bad"},
     PreferenceExample([user("q")], [bot("good")], [bot("bad")])),
    ("preference", {"prompt": [user("q")], "chosen": [bot("good")], "rejected": [bot("bad")]},
     PreferenceExample([user("q")], [bot("good")], [bot("bad")])),
    ("preference", {"prompt": "q", "chosen": "good", "rejected": "bad", "margin": 2},
     PreferenceExample([user("q")], [bot("good")], [bot("bad")], margin=2.0)),
    ("implicit_prompt", {"chosen": [user("q"), bot("a"), user("q2"), bot("good")],
                         "rejected": [user("q"), bot("a"), user("q2"), bot("bad")]},
     PreferenceExample([user("q"), bot("a"), user("q2")], [bot("good")], [bot("bad")])),
    ("implicit_prompt", {"chosen": [user("q"), bot("good")], "rejected": [user("q"), bot("bad")], "margin": -0.5},
     PreferenceExample([user("q")], [bot("good")], [bot("bad")], margin=-0.5)),
    # HH: the prompt is every turn before the LAST Assistant turn; the single space after the marker
    # goes, the rest of the text (inner newlines, trailing spaces) stays exactly.
    ("hh_rlhf", {"chosen": "\n\nHuman: q1\n\nAssistant: a1\n\nHuman: q2 \n\nAssistant: line1\nline2 ",
                 "rejected": "\n\nHuman: q1\n\nAssistant: a1\n\nHuman: q2 \n\nAssistant:  bad"},
     PreferenceExample([user("q1"), bot("a1"), user("q2 ")], [bot("line1\nline2 ")], [bot(" bad")])),
]
TASK_CASES = [("task", {"prompt": "2+2?", "rule": {"kind": "exact", "answer": "4"}},
               TaskExample([user("2+2?")], {"kind": "exact", "answer": "4"}))]
# The prompt kind: task rows keep their rule, bare prompts and every preference and SFT row give their prompt.
PROMPT_CASES = [
    *TASK_CASES,
    ("prompt", {"prompt": "2+2?"}, TaskExample([user("2+2?")], {})),
    ("prompt", {"prompt": [SYS, user("hi")], "id": 7}, TaskExample([SYS, user("hi")], {})),
    # sft's hh_rlhf (a lone `chosen` transcript) is not a prompt format: the preference one has the name.
    *[(name, row, TaskExample(expected.prompt, {})) for name, row, expected in PREF_CASES + SFT_CASES
      if (name, row, expected) not in SFT_CASES or name != "hh_rlhf"],
]


@pytest.mark.parametrize("kind, name, row, expected", [("sft", *c) for c in SFT_CASES]
                         + [("preference", *c) for c in PREF_CASES] + [("task", *c) for c in TASK_CASES]
                         + [("prompt", *c) for c in PROMPT_CASES])
def test_format_converts_and_is_detected(tmp_path, kind, name, row, expected):
    data = load_one(tmp_path, row, kind)
    assert data.format == name
    assert data.examples == [expected]
    assert load_one(tmp_path, row, kind, format=name).examples == [expected]  # named explicitly: same result


def test_hh_reply_that_invents_turns_keeps_them_in_the_reply(tmp_path):
    # Real HH rows (helpful-base rows 157, 324) have replies that contain "\n\nAssistant:" themselves;
    # the prompt is then the prefix the other transcript shares, not the reply's own last marker.
    prompt = "\n\nHuman: list some\n\nAssistant:"
    row = {"chosen": prompt + " A, B", "rejected": prompt + " C\n\nHumans: more?\n\nAssistant: D"}
    ex = load_one(tmp_path, row, "preference").examples[0]
    assert ex.prompt == [user("list some")]
    assert ex.chosen == [bot("A, B")] and ex.rejected == [bot("C\n\nHumans: more?\n\nAssistant: D")]


def test_explicit_format_overrides_detection(tmp_path):
    # A row with `messages` would be detected as "messages"; the user says it is Alpaca.
    row = {"messages": [user("m"), bot("n")], "instruction": "I", "output": "O"}
    assert load_one(tmp_path, row, "sft").format == "messages"
    data = load_one(tmp_path, row, "sft", format="alpaca")
    assert data.format == "alpaca" and data.examples == [SFTExample([user("I")], [bot("O")])]


def test_registry_and_description_cover_every_format():
    for kind in ("sft", "preference", "task", "prompt", "ranked", "unpaired"):
        names = [name for (k, name) in FORMATS if k == kind]
        assert names and all(f"  {name}: " in describe_formats(kind) for name in names)


def test_prompt_kind_tries_task_then_bare_prompts_then_preference_then_sft_formats():
    # The preference kind's own formats first, then its ranked ones, so detection of pairs is as it was.
    assert [name for (k, name) in FORMATS if k == "prompt"] == [
        "task", "gsm8k", "prompt", "fastchat_questions", "preference", "implicit_prompt", "hh_rlhf", "oasst_tree",
        "ranked", "ultrafeedback", "scored_responses", "messages", "prompt_completion", "alpaca", "sharegpt"]


def test_prompt_sets_for_eval_text_lines_and_fastchat_questions(tmp_path):
    text = tmp_path / "prompts.txt"
    text.write_text("What is 2 + 2?\n\n  Name a colour.\n")
    loaded = load_examples(str(text), "prompt")
    assert [ex.prompt for ex in loaded.examples] == [[{"role": "user", "content": "What is 2 + 2?"}],
                                                    [{"role": "user", "content": "  Name a colour."}]]
    assert loaded.rows_read == 2 and all(ex.rule == {} for ex in loaded.examples)
    questions = tmp_path / "question.jsonl"
    questions.write_text('{"question_id": 81, "category": "writing", "turns": ["Write a haiku.", "Now a limerick."]}\n'
                         '{"question_id": 82, "category": "math", "turns": []}\n')
    with pytest.raises(DataError, match="row 2, field 'turns\\[0\\]'"):
        load_examples(str(questions), "prompt")
    first = load_examples(str(questions), "prompt", skip_bad_rows=True)
    assert (first.format == "fastchat_questions"
            and first.examples[0].prompt == [{"role": "user", "content": "Write a haiku."}])


def test_each_kind_tries_its_own_formats_before_those_it_reads_from_other_kinds():
    pairs = ["preference", "implicit_prompt", "hh_rlhf"]
    ranked = ["oasst_tree", "ranked", "ultrafeedback", "scored_responses"]
    assert [name for (k, name) in FORMATS if k == "preference"] == pairs + ranked
    assert [name for (k, name) in FORMATS if k == "ranked"] == ranked + pairs
    assert [name for (k, name) in FORMATS if k == "unpaired"] == ["unpaired"] + pairs + ranked


def test_hh_transcripts_that_part_before_the_last_reply_are_no_pair(tmp_path):
    # `chosen` goes on with a Human turn that `rejected` lacks: the two answer different prompts.
    row = {"chosen": "\n\nHuman: q\n\nAssistant: a\n\nHuman: more?\n\nAssistant: b",
           "rejected": "\n\nHuman: q\n\nAssistant: c"}
    for kind in ("preference", "prompt", "ranked", "unpaired"):  # every kind that reads HH rows as pairs
        err = raises(tmp_path, [row], kind)
        assert (err.row, err.field) == (1, "rejected") and "share the prompt" in err.message
    assert load_one(tmp_path, row, "sft").examples == [SFTExample([user("q"), bot("a"), user("more?")], [bot("b")])]


def test_margin_defaults_to_none(tmp_path):
    for row in (OK_PAIR, {**OK_PAIR, "margin": None}):
        assert load_one(tmp_path, row, "preference").examples[0].margin is None
    assert load_one(tmp_path, {**OK_PAIR, "margin": 1.5}, "preference").examples[0].margin == 1.5


# --- errors name file, row and field -----------------------------------------------------------------

OK_PAIR = {"prompt": "q", "chosen": "a", "rejected": "b"}
HH_OK = "\n\nHuman: q\n\nAssistant: a"


@pytest.mark.parametrize("kind, format, bad_row, field, words", [
    ("preference", "preference", {"prompt": "q", "chosen": "a"}, "rejected", "missing"),
    ("preference", "preference", {**OK_PAIR, "chosen": 3}, "chosen", "expected"),
    ("preference", "preference", {**OK_PAIR, "chosen": "  \n"}, "chosen", "empty"),
    ("preference", "preference", {**OK_PAIR, "rejected": "a "}, "rejected", "identical"),
    ("preference", "preference", {**OK_PAIR, "prompt": [user("q"), {"role": "robot", "content": "x"}]},
     "prompt[1].role", "unknown role"),
    ("preference", "hh_rlhf", {"chosen": HH_OK, "rejected": "\n\nHuman: q\n\nAssistant: "}, "rejected", "empty"),
    ("preference", "hh_rlhf", {"chosen": HH_OK, "rejected": "\n\nHuman: other\n\nAssistant: b"}, "rejected",
     "share the prompt"),
    ("preference", "hh_rlhf", {"chosen": HH_OK, "rejected": "\n\nHuman: q but no reply"}, "rejected",
     "no 'Assistant:' turn"),
    ("preference", "hh_rlhf", {"chosen": HH_OK, "rejected": HH_OK}, "rejected", "identical"),
    ("preference", "implicit_prompt", {"chosen": [user("q"), bot("a")], "rejected": [user("r"), bot("b")]},
     "chosen[0].role", "inside the response"),
    ("sft", "messages", {"messages": [user("a"), bot("b"), user("c"), {"role": "assistant", "content": 5}]},
     "messages[3].content", "string"),
    ("sft", "messages", {"messages": [bot("b"), user("c")]}, "messages", "end with an assistant"),
    ("sft", "messages", {"messages": [user("a"), bot(" ")]}, "messages[1]", "empty"),
    ("sft", "prompt_completion", {"prompt": "q", "completion": None}, "completion", "missing"),
    ("sft", "alpaca", {"instruction": "I", "output": ""}, "output", "empty"),
    ("sft", "alpaca", {"instruction": "I", "input": 7, "output": "O"}, "input", "expected a string"),
    ("sft", "sharegpt", {"conversations": [{"from": "human", "value": "a"}, {"from": "bard", "value": "b"}]},
     "conversations[1].from", "unknown role"),
    ("sft", "hh_rlhf", {"chosen": "\n\nHuman: only a question"}, "chosen", "no 'Assistant:' turn"),
    ("task", "task", {"prompt": "q", "rule": {"answer": "4"}}, "rule.kind", "expected one of"),
    ("task", "task", {"prompt": "q", "rule": "exact"}, "rule", "expected"),
    ("preference", "preference", {**OK_PAIR, "margin": "high"}, "margin", "expected a finite number"),
    ("preference", "preference", {**OK_PAIR, "margin": True}, "margin", "expected a finite number"),
    ("preference", "preference", {**OK_PAIR, "margin": float("nan")}, "margin", "expected a finite number"),
    ("preference", "implicit_prompt", {"chosen": [user("q"), bot("a")], "rejected": [user("q"), bot("b")],
                                       "margin": [1]}, "margin", "expected a finite number"),
    ("prompt", "prompt", {"prompt": 3}, "prompt", "expected"),
    ("prompt", "task", {"prompt": "q", "rule": {"kind": "exact"}}, "rule.answer", "needs 'answer'"),
    ("prompt", "alpaca", {"instruction": "I"}, "output", "missing"),
])
def test_bad_row_names_file_row_and_field(tmp_path, kind, format, bad_row, field, words):
    path = tmp_path / "d.jsonl"
    path.write_text("\n" + json.dumps(bad_row) + "\n")  # a blank first line: the bad row is row 2
    err = raises(tmp_path, str(path), kind, format=format)
    assert (err.file, err.row, err.field) == (str(path), 2, field)
    assert words in err.message and f"row 2, field '{field}'" in str(err)


def test_bad_json_line_names_line_number_and_blank_lines_keep_numbering(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text(json.dumps(OK_PAIR) + "\n\n   \n{not json\n")
    err = raises(tmp_path, str(path), "preference")
    assert (err.file, err.row) == (str(path), 4) and err.message.startswith("not valid JSON: ")


def test_row_that_is_not_an_object(tmp_path):
    err = raises(tmp_path, [OK_PAIR, ["q", "a", "b"]], "preference")
    assert err.row == 2 and "array" in err.message


def test_unknown_format_lists_formats_and_keys(tmp_path):
    err = raises(tmp_path, [{"question": "q", "answer": "a"}], "preference")
    assert err.file == str(tmp_path / "d.jsonl")
    for text in ("['answer', 'question']", "implicit_prompt", "hh_rlhf", "prompt, chosen, rejected", "data.format"):
        assert text in err.message
    assert "data.format" in raises(tmp_path, [OK_PAIR], "preference", format="nectar").message
    # A row with a prompt and part of a pair is no bare prompt: which format it meant is unclear.
    err = raises(tmp_path, [{"prompt": "q", "chosen": "a"}], "prompt")
    for text in ("['chosen', 'prompt']", "without rule", "implicit_prompt", "alpaca"):
        assert text in err.message


def test_missing_file_and_unsupported_type_list_what_is_supported(tmp_path):
    for path in (str(tmp_path / "nope.jsonl"), write_jsonl(tmp_path / "d.csv", [OK_PAIR])):
        err = raises(tmp_path, path, "preference")
        assert err.file == path and ".parquet" in err.message and ".jsonl.gz" in err.message


# --- skipping bad rows ---------------------------------------------------------------------------------

def test_skip_bad_rows_collects_every_bad_row_and_keeps_the_good(tmp_path):
    path = tmp_path / "d.jsonl"
    lines = [json.dumps(OK_PAIR), "{broken", json.dumps({**OK_PAIR, "chosen": 1}), "",
             json.dumps({**OK_PAIR, "rejected": "c"}), json.dumps({**OK_PAIR, "rejected": "a"})]
    path.write_text("\n".join(lines) + "\n")
    data = load_examples(str(path), "preference", skip_bad_rows=True)
    assert [ex.rejected for ex in data.examples] == [[bot("b")], [bot("c")]]
    assert [(e.row, e.field) for e in data.skipped] == [(2, None), (3, "chosen"), (6, "rejected")]
    assert data.rows_read == 5 and data.format == "preference" and data.source == str(path)
    assert raises(tmp_path, str(path), "preference").row == 2  # without skipping, the first bad row stops


def test_empty_file_or_all_rows_bad_is_an_error_even_when_skipping(tmp_path):
    err = raises(tmp_path, [{**OK_PAIR, "chosen": ""}, {**OK_PAIR, "chosen": ""}], "preference", skip_bad_rows=True)
    assert "all 2 rows are bad" in err.message and err.row is None
    (tmp_path / "d.jsonl").write_text("\n")
    assert "no rows" in raises(tmp_path, str(tmp_path / "d.jsonl"), "sft", skip_bad_rows=True).message


def test_max_rows(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [{**OK_PAIR, "prompt": str(i)} for i in range(10)])
    data = load_examples(path, "preference", max_rows=3)
    assert data.rows_read == 3 and [ex.prompt[0]["content"] for ex in data.examples] == ["0", "1", "2"]


# --- file types and fingerprints ------------------------------------------------------------------

ROWS = [{"instruction": "I1", "input": "", "output": "O1"}, {"instruction": "I2", "input": "x", "output": "O2"}]
EXPECTED = [SFTExample([user("I1")], [bot("O1")]), SFTExample([user("I2\n\nx")], [bot("O2")])]


def _gz_jsonl(path):
    with gzip.open(path, "wt", encoding="utf-8") as f:
        f.writelines(json.dumps(r) + "\n" for r in ROWS)


def _json_wrapped_gz(path):
    with gzip.open(path, "wt", encoding="utf-8") as f:
        json.dump({"version": "1", "data": ROWS}, f)


def _parquet(path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.Table.from_pylist(ROWS), path)


def _datasets_folder(path):
    import datasets

    datasets.DatasetDict({"train": datasets.Dataset.from_list(ROWS),
                          "test": datasets.Dataset.from_list(ROWS[:1])}).save_to_disk(str(path))


@pytest.mark.parametrize("name, write", [
    ("d.jsonl.gz", _gz_jsonl), ("d.json", lambda p: p.write_text(json.dumps(ROWS))), ("d.json.gz", _json_wrapped_gz),
    ("d.parquet", _parquet), ("folder", _datasets_folder),
])
def test_file_types(tmp_path, name, write):
    write(tmp_path / name)
    data = load_examples(str(tmp_path / name), "sft")
    assert data.examples == EXPECTED and data.format == "alpaca" and data.rows_read == 2
    assert [n for n, _ in read_rows(str(tmp_path / name))] == [1, 2]


def test_datasets_folder_with_only_another_split(tmp_path):
    import datasets

    datasets.DatasetDict({"validation": datasets.Dataset.from_list(ROWS)}).save_to_disk(str(tmp_path / "f"))
    assert load_examples(str(tmp_path / "f"), "sft").examples == EXPECTED


def test_json_element_numbers_are_rows(tmp_path):
    (tmp_path / "d.json").write_text(json.dumps([ROWS[0], {"instruction": "I", "output": 2}]))
    err = raises(tmp_path, str(tmp_path / "d.json"), "sft")
    assert (err.row, err.field) == (2, "output")


def test_fingerprint_is_stable_and_follows_content(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", ROWS)
    first = fingerprint(path)
    assert fingerprint(path) == first == load_examples(path, "sft").fingerprint
    write_jsonl(tmp_path / "d.jsonl", ROWS[:1])
    assert fingerprint(path) != first
    _datasets_folder(tmp_path / "folder")
    folder_print = fingerprint(str(tmp_path / "folder"))
    assert folder_print == fingerprint(str(tmp_path / "folder"))
    (tmp_path / "folder" / "train" / "extra.txt").write_text("x")
    assert fingerprint(str(tmp_path / "folder")) != folder_print


# --- the real public data in ../shared ---------------------------------------------------------------

needs_shared = pytest.mark.skipif(not os.path.isdir(SHARED), reason=f"real data not present at {SHARED}")


@needs_shared
def test_real_hh_rlhf_helpful_base_loads_as_preference_pairs():
    data = load_examples(str(HH_FILE), "preference", skip_bad_rows=True)
    assert data.format == "hh_rlhf" and data.rows_read == 454
    # One row is bad in the data itself: row 112's rejected reply is empty ("\n\nAssistant: " at the end).
    # No row there has chosen identical to rejected (other HH test splits do: 2 and 32 rows).
    assert [(e.row, e.field) for e in data.skipped] == [(112, "rejected")]
    assert len(data.examples) == 453
    first = data.examples[0]
    assert first.prompt == [user("Do you know why turkeys became the official food of thanksgiving?")]
    assert all(ex.prompt and ex.prompt[-1]["role"] == "user" for ex in data.examples)
    assert all(ex.chosen != ex.rejected for ex in data.examples)


@needs_shared
def test_real_alpaca_loads_as_sft():
    data = load_examples(str(ALPACA_FILE), "sft", skip_bad_rows=True)
    assert data.format == "alpaca" and data.rows_read == 3000
    # Row 2336 has an empty output in the original Alpaca data; everything else converts.
    assert [(e.row, e.field) for e in data.skipped] == [(2336, "output")]
    assert len(data.examples) == 2999
    assert all(len(ex.prompt) == 1 and ex.completion[0]["content"].strip() for ex in data.examples)
