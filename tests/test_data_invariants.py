"""Data that is not what it claims to be fails loudly: an empty file of any type, and every row that breaks its
format's invariant, with the file, row and field named. Legitimate rows close to those lines still load."""

import gzip

import pytest

from align.data.formats import load_examples
from align.data.schemas import PreferenceExample, RankedExample, SFTExample, TaskExample
from tests.test_data_formats import SYS, bot, load_one, raises, user
from tests.test_data_ranked import node


def hh(*turns: str) -> str:
    """An HH transcript; turns alternate Human, Assistant, ..."""
    return "".join(f"\n\n{('Human', 'Assistant')[i % 2]}: {text}" for i, text in enumerate(turns))


def gpt(text):
    return {"from": "gpt", "value": text}


def human(text):
    return {"from": "human", "value": text}


def ranked_node(text, rank):
    return node(text, "assistant", rank=rank)


# --- one failing row per converter and invariant ------------------------------------------------------

RANKS = {"prompt": "q", "responses": ["a", "b"], "ranks": [0, 1]}
UF = {"instruction": "q",
      "completions": [{"response": "a", "overall_score": 1}, {"response": "b", "overall_score": 2}]}
SCORED = {"prompt": "q", "all_generated_responses": ["a", "b"], "all_rm_scores": [0.5, 1.5]}


def case(id, kind, format, row, field, words):
    return pytest.param(kind, format, row, field, words, id=id)


CASES = [
    # SFT conversations: a user message for the completion to answer, and the completion is the assistant's.
    case("messages-no-prompt", "sft", "messages", {"messages": [bot("hi")]}, "messages", "has no prompt"),
    case("messages-prompt-ends-with-assistant", "sft", "messages", {"messages": [user("q"), bot("a"), bot("b")]},
         "messages[1]", "ends with a message of role 'assistant'"),
    case("messages-only-system-before", "sft", "messages", {"messages": [SYS, bot("b")]}, "messages[0]",
         "ends with a message of role 'system'"),
    case("prompt_completion-empty-prompt", "sft", "prompt_completion", {"prompt": " ", "completion": "a"}, "prompt",
         "is empty"),
    case("prompt_completion-user-in-completion", "sft", "prompt_completion",
         {"prompt": "q", "completion": [bot("a"), user("and you?")]}, "completion[1].role", "inside the response"),
    case("alpaca-empty-instruction", "sft", "alpaca", {"instruction": "", "input": "1 2", "output": "3"},
         "instruction", "is empty"),
    case("sharegpt-no-prompt", "sft", "sharegpt", {"conversations": [gpt("Hello!")]}, "conversations",
         "has no prompt"),
    case("sharegpt-prompt-ends-with-gpt", "sft", "sharegpt", {"conversations": [human("q"), gpt("a"), gpt("b")]},
         "conversations[1]", "ends with a message of role 'assistant'"),
    case("hh_rlhf-sft-ends-with-human", "sft", "hh_rlhf", {"chosen": hh("q", "a", "q2")}, "chosen",
         "no 'Assistant:' turn answers the last 'Human:' turn"),
    case("hh_rlhf-sft-no-human", "sft", "hh_rlhf", {"chosen": "\n\nAssistant: hello"}, "chosen",
         "no 'Human:' turn"),
    case("hh_rlhf-sft-empty-question", "sft", "hh_rlhf", {"chosen": hh(" ", "a")}, "chosen", "is empty"),
    # Pairs: one prompt, two different assistant responses to it.
    case("hh_rlhf-prompts-differ", "preference", "hh_rlhf",  # the issue's row: chosen went on, rejected did not
         {"chosen": hh("q", "a", "q2", "b"), "rejected": hh("q", "c")}, "rejected", "share the prompt"),
    case("hh_rlhf-rejected-ends-with-human", "preference", "hh_rlhf",  # as HH-RLHF helpful-online rows 786, 1056
         {"chosen": hh("q", "a", "q2", "b"), "rejected": hh("q", "a", "q2")}, "rejected",
         "no 'Assistant:' turn answers the last 'Human:' turn"),
    case("preference-empty-prompt", "preference", "preference", {"prompt": "", "chosen": "a", "rejected": "b"},
         "prompt", "is empty"),
    case("preference-prompt-ends-with-assistant", "preference", "preference",
         {"prompt": [user("q"), bot("a")], "chosen": "b", "rejected": "c"}, "prompt[1]",
         "ends with a message of role 'assistant'"),
    case("preference-user-in-chosen", "preference", "preference",
         {"prompt": "q", "chosen": [user("q2"), bot("b")], "rejected": "c"}, "chosen[0].role", "inside the response"),
    case("implicit_prompt-no-shared-prompt", "preference", "implicit_prompt",
         {"chosen": [bot("a")], "rejected": [bot("b")]}, "chosen", "has no prompt"),
    case("implicit_prompt-user-later-in-response", "preference", "implicit_prompt",
         {"chosen": [user("q"), bot("a"), user("more"), bot("b")], "rejected": [user("q"), bot("c")]},
         "chosen[2].role", "inside the response"),
    case("implicit_prompt-prompt-ends-with-assistant", "preference", "implicit_prompt",
         {"chosen": [user("q"), bot("a"), bot("b")], "rejected": [user("q"), bot("a"), bot("c")]}, "chosen[1]",
         "ends with a message of role 'assistant'"),
    # Rankings: a prompt, at least two responses, ranks that are places, one score per distinct response.
    case("ranked-empty-prompt", "ranked", "ranked", {**RANKS, "prompt": "  "}, "prompt", "is empty"),
    case("ranked-negative-rank", "ranked", "ranked", {**RANKS, "ranks": [-1, 0]}, "ranks[0]", "whole number"),
    case("ranked-fractional-rank", "ranked", "ranked", {**RANKS, "ranks": [0, 0.5]}, "ranks[1]", "whole number"),
    case("ranked-same-response-two-scores", "ranked", "ranked",
         {**RANKS, "responses": ["a", "b", "a "], "ranks": [0, 1, 2]}, "ranks", "appears twice"),
    case("ranked-user-in-response", "ranked", "ranked", {**RANKS, "responses": ["a", [user("b")]]},
         "responses[1][0].role", "inside the response"),
    case("ultrafeedback-empty-instruction", "ranked", "ultrafeedback", {**UF, "instruction": ""}, "instruction",
         "is empty"),
    case("ultrafeedback-same-response-two-scores", "ranked", "ultrafeedback",
         {**UF, "completions": [*UF["completions"], {"response": "a", "overall_score": 3}]}, "completions",
         "appears twice"),
    case("scored_responses-prompt-ends-with-assistant", "ranked", "scored_responses",
         {**SCORED, "prompt": [user("q"), bot("a")]}, "prompt[1]", "ends with a message of role 'assistant'"),
    case("oasst_tree-assistant-root", "ranked", "oasst_tree",
         {"prompt": node("hi", "assistant", [node("q", "prompter")])}, "prompt.role", "a tree alternates"),
    case("oasst_tree-prompter-answers-prompter", "ranked", "oasst_tree",
         {"prompt": node("q", "prompter", [node("a", "prompter", rank=0), ranked_node("b", 1)])},
         "prompt.replies[0].role", "a tree alternates"),
    case("oasst_tree-negative-rank", "ranked", "oasst_tree",
         {"prompt": node("q", "prompter", [ranked_node("a", -1), ranked_node("b", 0)])}, "prompt.replies[0].rank",
         "whole number"),
    case("oasst_tree-empty-question", "ranked", "oasst_tree",
         {"prompt": node(" ", "prompter", [ranked_node("a", 0), ranked_node("b", 1)])}, "prompt.text", "is empty"),
    # Unpaired rows, tasks and prompts.
    case("unpaired-empty-prompt", "unpaired", "unpaired", {"prompt": "", "completion": "a", "label": True}, "prompt",
         "is empty"),
    case("unpaired-user-in-completion", "unpaired", "unpaired",
         {"prompt": "q", "completion": [user("a")], "label": False}, "completion[0].role", "inside the response"),
    case("task-empty-prompt", "task", "task", {"prompt": "", "rule": {"kind": "exact", "answer": "4"}}, "prompt",
         "is empty"),
    case("task-exact-null-answer", "task", "task", {"prompt": "q", "rule": {"kind": "exact", "answer": None}},
         "rule.answer", "expected an answer"),
    case("task-one_of-string-answers", "task", "task", {"prompt": "q", "rule": {"kind": "one_of", "answers": "12"}},
         "rule.answers", "expected a list of answers"),
    case("task-one_of-empty-answer", "task", "task", {"prompt": "q", "rule": {"kind": "one_of", "answers": ["4", ""]}},
         "rule.answers[1]", "expected an answer"),
    case("prompt-empty", "prompt", "prompt", {"prompt": "\n"}, "prompt", "is empty"),
    case("prompt-only-system", "prompt", "prompt", {"prompt": [SYS]}, "prompt[0]",
         "ends with a message of role 'system'"),
]


@pytest.mark.parametrize("kind, format, row, field, words", CASES)
def test_row_breaking_its_format_is_named(tmp_path, kind, format, row, field, words):
    err = raises(tmp_path, [row], kind)  # detected, as a user's file is
    assert (err.row, err.field) == (1, field), err
    assert words in err.message, err
    assert str(raises(tmp_path, [row], kind, format=format)) == str(err)  # the format it was detected as


LEGITIMATE = [
    # HH-RLHF prompts with two Assistant turns in a row (harmless-base rows 162, 256), and a reply that goes on
    # with its own "\n\nAssistant:" turn (harmless-base row 1414): the prompt ends at the last Human turn.
    ("preference", {"chosen": hh("q", "a") + "\n\nAssistant: more\n\nHuman: q2\n\nAssistant: x\n\nAssistant: y",
                    "rejected": hh("q", "a") + "\n\nAssistant: more\n\nHuman: q2\n\nAssistant: z"},
     PreferenceExample([user("q"), bot("a"), bot("more"), user("q2")], [bot("x\n\nAssistant: y")], [bot("z")])),
    # a conversation that opens with the assistant's greeting
    ("sft", {"messages": [SYS, bot("Hi! Ask me."), user("q"), bot("a")]},
     SFTExample([SYS, bot("Hi! Ask me."), user("q")], [bot("a")])),
    # the same response twice with the same score is a tie, not a contradiction
    ("ranked", {"prompt": "q", "responses": ["a", "a", "b"], "scores": [2, 2, 1]},
     RankedExample([user("q")], [[bot("a")], [bot("a")], [bot("b")]], [2.0, 2.0, 1.0])),
    ("ranked", {"prompt": "q", "responses": ["a", "b"], "ranks": [1.0, 0]},  # a Parquet float column
     RankedExample([user("q")], [[bot("a")], [bot("b")]], [-1.0, 0.0])),
    ("task", {"prompt": "q", "rule": {"kind": "exact", "answer": 12}},
     TaskExample([user("q")], {"kind": "exact", "answer": 12})),
    ("task", {"prompt": "q", "rule": {"kind": "json", "answer": None}},
     TaskExample([user("q")], {"kind": "json", "answer": None})),
]


@pytest.mark.parametrize("kind, row, expected", LEGITIMATE)
def test_legitimate_rows_near_those_lines_still_load(tmp_path, kind, row, expected):
    assert load_one(tmp_path, row, kind).examples == [expected]


# --- empty files, of every type the loader reads ------------------------------------------------------

def _gzip(content: bytes):
    return lambda path: path.write_bytes(gzip.compress(content))


def _parquet_without_rows(path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"prompt": pa.array([], pa.string())}), path)


def _dataset_without_rows(path):
    import datasets

    datasets.Dataset.from_dict({"prompt": []}).save_to_disk(str(path))


@pytest.mark.parametrize("name, write, words", [
    ("d.jsonl", lambda p: p.write_text(""), "no rows: the file is empty"),
    ("blank.jsonl", lambda p: p.write_text("\n  \n"), "no rows: the file is empty"),
    ("d.jsonl.gz", _gzip(b""), "no rows: the file is empty"),
    ("d.json", lambda p: p.write_text(""), "no rows: the file is empty"),
    ("d.json.gz", _gzip(b"\n"), "no rows: the file is empty"),
    ("array.json", lambda p: p.write_text("[]"), "no rows: the file is empty"),
    ("wrapped.json", lambda p: p.write_text('{"data": []}'), "no rows: the file is empty"),
    ("d.txt", lambda p: p.write_text("\n\n"), "no rows: the file is empty"),
    ("d.parquet", _parquet_without_rows, "no rows: the file is empty"),
    ("zero.parquet", lambda p: p.write_bytes(b""), "0 bytes"),
    ("folder", _dataset_without_rows, "no rows in the dataset"),
])
def test_empty_file_is_a_data_error_naming_it(tmp_path, name, write, words):
    write(tmp_path / name)
    err = raises(tmp_path, str(tmp_path / name), "prompt", skip_bad_rows=True)
    assert err.file == str(tmp_path / name) and err.row is None and words in err.message


def test_text_lines_that_are_not_utf8_are_bad_rows(tmp_path):
    path = tmp_path / "prompts.txt"
    path.write_bytes(b"Say hi.\n" + b"caf\xe9?\n")
    err = raises(tmp_path, str(path), "prompt")
    assert err.row == 2 and "not valid UTF-8" in err.message
    loaded = load_examples(str(path), "prompt", skip_bad_rows=True)
    assert [ex.prompt for ex in loaded.examples] == [[user("Say hi.")]] and len(loaded.skipped) == 1
