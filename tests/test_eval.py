"""`align eval`: win rates and their intervals, the length-controlled win rate, and an evaluation of a
finished tiny run end to end (judge, KL, implicit rewards, human verdicts, caching, errors)."""

import json

import numpy as np
import pytest

from align.annotation.store import Collection
from align.cli import main
from align.collect.export import export_collection
from align.data.formats import load_examples
from align.data.rules import check
from align.eval import evaluate, metrics


def test_wilson_interval_matches_hand_computation():
    rate = metrics.win_rate(["win"] * 8 + ["loss"] * 2)
    # p = 0.8, n = 10, z = 1.96: centre (p + z²/2n) / (1 + z²/n) = 0.71675, half-width 0.22657
    assert rate["value"] == pytest.approx(0.8)
    assert rate["low"] == pytest.approx(0.4902, abs=1e-3) and rate["high"] == pytest.approx(0.9433, abs=1e-3)
    assert metrics.win_rate(["win", "tie", "loss", "loss"])["value"] == pytest.approx(0.375)
    assert metrics.win_rate([]) is None
    assert metrics.verdicts([1.0, 0.5, 0.2], [0.5, 0.5, 0.9]) == ["win", "tie", "loss"]


def _length_biased_verdicts(seed: int, n: int = 400, length_only: bool = True):
    """A stage whose replies are ~25 tokens longer than the reference's, and a judge that prefers the
    longer reply (P(win) = sigmoid(Δlen / 10)) and, unless `length_only`, also the stage's content."""
    rng = np.random.default_rng(seed)
    reference = rng.integers(20, 80, n)
    stage = reference + rng.normal(25, 30, n).round()
    logit = (stage - reference) / 10 + (0.0 if length_only else 1.5)
    outcomes = ["win" if rng.random() < 1 / (1 + np.exp(-x)) else "loss" for x in logit]
    return outcomes, stage, reference


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_length_controlled_win_rate_is_near_half_when_verdicts_depend_only_on_length(seed):
    outcomes, stage, reference = _length_biased_verdicts(seed)
    raw = metrics.win_rate(outcomes)
    lc = metrics.length_controlled_win_rate(outcomes, stage, reference, seed=seed)
    assert raw["value"] > 0.68 and raw["low"] > 0.6  # far above 50%: longer replies win
    assert abs(lc["value"] - 0.5) < 0.08 and lc["low"] < 0.5 < lc["high"]


def test_length_controlled_win_rate_keeps_a_preference_for_content():
    outcomes, stage, reference = _length_biased_verdicts(0, length_only=False)
    lc = metrics.length_controlled_win_rate(outcomes, stage, reference)
    assert lc["value"] > 0.75 and lc["low"] > 0.6  # sigmoid(1.5) = 0.82 at equal length
    same_length = metrics.length_controlled_win_rate(["win", "win", "loss", "tie"], [5] * 4, [5] * 4)
    assert same_length["value"] == pytest.approx(0.625, abs=1e-6)  # no length difference: the raw rate


def _eval(tiny_run, out, *extra, judge: str | None = "synthetic_tasks"):
    args = ["eval", str(tiny_run), "--tasks", "synthetic:heldout", "--max-prompts", "6", "--max-new-tokens", "6",
            "--out", str(out), "--quiet", *(["--judge", judge] if judge else []), *extra]
    assert main(args) == 0
    return json.loads((out / "eval.json").read_text())


def test_eval_of_a_tiny_run(tiny_run, tmp_path, monkeypatch):
    out = tmp_path / "eval"
    sampled = ("--sample", "--temperature", "1.0")  # the tiny model's greedy replies are blank
    # computed here, not taken from what the DPO stage measured on the same pairs after training
    monkeypatch.setattr(evaluate.Evaluation, "_measured_in_training", lambda *args: None)
    result = _eval(tiny_run, out, *sampled)
    stages = result["stages"]
    assert list(stages) == ["sft", "base", "dpo"]  # the reference (the sft stage) first
    sft, dpo = stages["sft"], stages["dpo"]
    assert sft["is_reference"] and sft["win_rate"] is None and sft["kl_to_reference"] is None
    # the judge's scores of dpo's replies against those of the reference's replies to the same prompts
    verdicts = metrics.verdicts(dpo["rewards"], sft["rewards"])
    assert len(dpo["lengths"]) == len(verdicts) == 6 and dpo["win_rate"] == metrics.win_rate(verdicts)
    assert dpo["lc_win_rate"] == metrics.length_controlled_win_rate(verdicts, dpo["lengths"], sft["lengths"], seed=0)
    assert dpo["kl_to_reference"] > 0 and stages["base"]["kl_to_reference"] > 0
    tasks = load_examples("synthetic:heldout", "task", max_rows=6).examples
    correct = [check(task.rule, sample["responses"]["dpo"]["text"]) for task, sample in zip(tasks, result["samples"])]
    assert dpo["task_accuracy"] == sum(correct) / 6 == sum(dpo["rewards"]) / 6  # the judge gives 1 for correct, else 0
    assert set(dpo["task_per_family"]) == {task.rule["family"] for task in tasks}
    # the implicit reward of the DPO stage on its own held-out pairs, as training measured it
    trained = json.loads((tiny_run / "dpo" / "stage.json").read_text())["metrics"]
    assert dpo["implicit_reward_accuracy"] == pytest.approx(trained["eval_rewards/accuracies"])
    assert stages["base"]["implicit_reward_accuracy"] is None
    assert result["judge"] == {"name": "synthetic_tasks", "kind": "rule", "accuracy": None, "pairs": None}
    assert "loss" in result["curves"]["dpo"] and len(result["samples"]) == 6
    assert (out / "report.html").is_file() and (out / "plots").is_dir()

    # people judge pairs.jsonl in a collection, every pair going to its "a" reply; the export comes back
    pairs = [json.loads(line) for line in (out / "pairs.jsonl").read_text().splitlines()]
    assert pairs and all(p["a_model"] != p["b_model"] and "sft" in (p["a_model"], p["b_model"]) for p in pairs)
    pairs = [p for p in pairs if p["a"].strip() and p["b"].strip()]  # a blank reply is no preference row
    assert pairs
    collection = tmp_path / "prefs.sqlite"
    assert main(["collect", "import", str(collection), str(out / "pairs.jsonl")]) == 0
    rated = tmp_path / "verdicts.jsonl"
    _judge_by_a(Collection.open(collection), pairs, rated)

    def no_generation(*args, **kwargs):
        raise AssertionError("replies must come from the cache")

    monkeypatch.setattr(evaluate, "generate", no_generation)
    again = _eval(tiny_run, out, *sampled, "--verdicts", str(rated))
    for name in ("base", "dpo"):
        own = [p for p in pairs if name in (p["a_model"], p["b_model"])]
        human = again["stages"][name]["human_win_rate"]
        ties = sum(s["responses"][name]["text"].strip() == s["responses"]["sft"]["text"].strip()
                   for s in again["samples"])
        assert human["n"] == len(own) + ties and human["ties"] == ties
        assert human["wins"] == sum(p["a_model"] == name for p in own)
    assert again["stages"]["dpo"]["win_rate"] == dpo["win_rate"]  # same replies, same judge


def _judge_by_a(collection, pairs, out) -> None:
    """An annotator prefers each pair's "a" reply, through the collection's store; exported to `out`."""
    preferred = {(json.dumps(p["prompt"]), frozenset((p["a"], p["b"]))): p["a"] for p in pairs}
    who = collection.add_annotator("rater")
    while (task := collection.next_pair(who)) is not None:
        left, right = task["left"]["text"], task["right"]["text"]
        pick = "left" if preferred[(json.dumps(task["prompt"]), frozenset((left, right)))] == left else "right"
        collection.submit(who, task["pair_id"], task["left"]["id"], pick, f"{task['pair_id']}")
    assert export_collection(collection, out, aggregate="all")["rows"] == len(preferred)


def test_eval_is_reused_until_something_changes(tiny_run, tmp_path, capsys):
    out = tmp_path / "eval"
    first = _eval(tiny_run, out, "--stages", "dpo")
    assert list(first["stages"]) == ["sft", "dpo"]
    second = _eval(tiny_run, out, "--stages", "dpo")
    assert second == first and "skip" in capsys.readouterr().err
    third = _eval(tiny_run, out, "--stages", "dpo", "--reference", "base")
    assert list(third["stages"]) == ["base", "dpo"]


def test_eval_errors_name_the_problem(tiny_run, tmp_path, capsys):
    def error(*args) -> str:
        assert main(["eval", *map(str, args), "--quiet"]) == 2
        return capsys.readouterr().err

    assert "not a run folder" in error(tmp_path, "--prompts", "p.txt")
    assert "has no eval section" in error(tiny_run)  # and no --prompts
    assert "no stage 'nope'" in error(tiny_run, "--tasks", "synthetic:heldout", "--stages", "nope")
    assert "'judge'" in error(tiny_run, "--tasks", "synthetic:heldout", "--judge", "sft")  # not an rm stage
    assert "'nope' is neither an rm stage" in error(tiny_run, "--tasks", "synthetic:heldout", "--judge", "nope",
                                                    "--max-prompts", "2")


def test_report_puts_several_evaluations_on_one_page(tiny_run, tmp_path):
    first = _eval(tiny_run, tmp_path / "greedy", "--stages", "dpo")
    second = _eval(tiny_run, tmp_path / "sampled", "--stages", "dpo", "--sample")
    assert first["samples"] != second["samples"]
    page = tmp_path / "compare.html"
    assert main(["report", str(tmp_path / "greedy" / "eval.json"), str(tmp_path / "sampled" / "eval.json"),
                 "--out", str(page)]) == 0
    html = page.read_text()
    assert html.count('class="plot"') >= 2 and html.count("tiny/dpo") >= 2  # both evaluations, labelled by run
    assert main(["report", str(tmp_path / "nowhere"), "--out", str(page)]) == 2


def test_an_rm_stage_is_the_default_judge(tiny_rm_run, tmp_path, monkeypatch):
    """SFT and a reward model on the tiny model: `align eval` judges with the rm stage by default, reports
    its accuracy on the rm stage's held-out pairs, and never evaluates the reward model as a policy."""
    monkeypatch.setattr(evaluate.Evaluation, "_measured_in_training", lambda *args: None)  # compute it here
    rm_accuracy = json.loads((tiny_rm_run / "rm" / "stage.json").read_text())["metrics"]["eval_accuracy"]
    result = _eval(tiny_rm_run, tmp_path / "eval", "--reference", "base", judge=None)
    assert list(result["stages"]) == ["base", "sft"]
    assert result["judge"]["kind"] == "learned" and result["judge"]["name"] == "rm" and result["judge"]["pairs"] == 10
    assert result["judge"]["accuracy"] == pytest.approx(rm_accuracy)  # the same pairs, the same reward model
    monkeypatch.undo()
    reused = _eval(tiny_rm_run, tmp_path / "again", "--reference", "base", judge=None)
    assert reused["judge"]["accuracy"] == rm_accuracy
    sft = result["stages"]["sft"]
    assert len(set(sft["rewards"])) > 1 and sft["win_rate"]["n"] == 6
