"""Verifiable math answers: the `math` rule (align.data.rules) compares a response's final answer with the gold one by
math-verify, GSM8K rows load with such a rule, and the `math_answer` and `answer_format` cards reward them."""

import gzip
import json

import pytest

from align.data.formats import load_examples
from align.data.rules import check, final_answer
from align.errors import DataError
from align.rewards import load_reward
from tests.conftest import SHARED

GSM8K = SHARED / "data" / "verifiable" / "gsm8k_test_rows0-299.jsonl.gz"


@pytest.mark.parametrize("response, answer", [
    ("Half of it: \\boxed{\\frac{1}{2}}", "0.5"),  # a string match fails, math-verify does not
    ("She pays 1,000 dollars.", "1000"),
    ("3 + 4 = 7\n#### 7", "7"),
    ("so the answer is 0.50", "1/2"),
])
def test_a_final_answer_equal_as_mathematics_passes(response, answer):
    assert check({"kind": "math", "answer": answer}, response)
    assert not check({"kind": "exact", "answer": answer}, response)


@pytest.mark.parametrize("response", ["#### 8", "The answer is 71", "no number at all", "\\boxed{7"])
def test_a_different_or_missing_final_answer_fails(response):
    assert not check({"kind": "math", "answer": "7"}, response)


def test_the_final_answer_is_the_marked_one_else_the_boxed_else_the_last_number():
    assert final_answer("12 apples, 3 pears\n#### 15 fruit") == "15 fruit"
    assert final_answer("1 and \\boxed{x^{2}} then 9") == "x^{2}"
    assert final_answer("from 3 to -4.5") == "-4.5"
    assert final_answer("none") is None


def test_gsm8k_rows_load_with_their_final_answer_and_a_row_without_one_is_named(tmp_path):
    path = tmp_path / "gsm8k.jsonl"
    rows = [{"question": "Tom has 3 apples and buys 4. How many?", "answer": "3 + 4 = <<3+4=7>>7\n#### 7"},
            {"question": "What is 2 + 2?", "answer": "It is 4."}]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    with pytest.raises(DataError) as info:
        load_examples(str(path), "prompt")
    assert info.value.row == 2 and info.value.field == "answer" and "####" in str(info.value)
    path.write_text(json.dumps(rows[0]) + "\n")
    loaded = load_examples(str(path), "task")
    assert loaded.format == "gsm8k" and loaded.examples[0].rule == {"kind": "math", "answer": "7"}
    assert loaded.examples[0].prompt == [{"role": "user", "content": rows[0]["question"]}]


def test_the_cards_reward_a_correct_final_answer_and_its_format():
    rule = {"kind": "math", "answer": "18"}
    answers = ["16 - 3 - 4 = 9 eggs, 9 * 2 = 18\n#### 18", "She makes 18 dollars.", "#### 19"]
    assert load_reward("math_answer").score([None] * 3, answers, [rule] * 3).tolist() == [1.0, 1.0, 0.0]
    assert load_reward("answer_format").score([None] * 3, answers, [rule] * 3).tolist() == [1.0, 0.0, 1.0]


@pytest.mark.skipif(not GSM8K.is_file(), reason="../shared GSM8K slice absent")
def test_every_shared_gsm8k_row_loads_and_its_own_solution_scores_one():
    loaded = load_examples(str(GSM8K), "prompt")
    assert len(loaded.examples) == 300 and not loaded.skipped
    solutions = [json.loads(line)["answer"] for line in gzip.open(GSM8K, "rt", encoding="utf-8")]
    scores = load_reward("math_answer").score([ex.prompt for ex in loaded.examples], solutions,
                                              [ex.rule for ex in loaded.examples])
    assert scores.tolist() == [1.0] * 300
