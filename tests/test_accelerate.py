"""Multi-process training: `accelerate launch` with two CPU processes (gloo) trains the tiny SFT -> DPO run as one
process does, writes every shared file once, and skips what is finished in every process alike."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from safetensors.torch import load_file

from align.config import parse_recipe
from align.pipeline import run_recipe
from tests.conftest import tiny_recipe

REPO = Path(__file__).resolve().parents[1]
CPU_2PROC = REPO / "recipes" / "accelerate" / "cpu_2proc.yaml"

# DPO from a fresh adapter against the bare base: nothing upstream of it differs between one and two processes, so
# two processes must reproduce one up to rounding. SFT averages its loss over the tokens of each process's share, so
# it (and the DPO stage that starts from it) only comes close.
FRESH_DPO = """\
  - name: dpo_fresh
    kind: dpo
    data: {path: "synthetic:preference", max_rows: 96}
    eval_data: {path: "synthetic:preference_heldout", max_rows: 32}
    loss: {type: sigmoid, beta: 0.1}
    train: {max_steps: 6, lr: 3.0e-3, batch_size: 8, max_length: 96, max_prompt_length: 64}
"""
# Forgetting and eval run in the main process alone while the other one waits or has finished.
AFTER_TRAINING = """
forgetting:
  retention: {path: "synthetic:heldout"}
  max_rows: 8
  max_new_tokens: 6
  batch_size: 4
eval:
  tasks: {path: "synthetic:heldout", max_rows: 4}
  stages: [sft, dpo]
  max_new_tokens: 6
"""


def _recipe(out: Path, after_training: str = "") -> str:
    return tiny_recipe(out, dpo_steps=6, extra_dpo=FRESH_DPO) + after_training


def launch_two(recipe: Path) -> subprocess.CompletedProcess:
    """`accelerate launch` of `align run` in two CPU processes, as the README says, from this venv."""
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(CPU_2PROC),
           "--main_process_port", "0",  # 0: accelerate takes a free port
           "-m", "align.cli", "run", str(recipe), "--quiet"]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), *filter(None, [os.environ.get("PYTHONPATH")])])}
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict:
    """The recipe run once in this process and once by two launched processes: {"one", "two": run dir, "launch"}."""
    root = tmp_path_factory.mktemp("accelerate")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("ALIGN_CACHE", str(root / "cache"))
        mp.setenv("HF_HUB_OFFLINE", "1")
        run_recipe(parse_recipe(_recipe(root / "one")), quiet=True)
        recipe = root / "two.yaml"
        recipe.write_text(_recipe(root / "two", AFTER_TRAINING))
        launched = launch_two(recipe)
    assert launched.returncode == 0, launched.stderr[-4000:]
    return {"one": root / "one" / "tiny", "two": root / "two" / "tiny", "launch": launched, "recipe": recipe,
            "cache": root / "cache"}


def _metrics(run: Path, stage: str) -> dict:
    return json.loads((run / stage / "stage.json").read_text())["metrics"]


def _log(run: Path, stage: str) -> list[dict]:
    return [json.loads(line) for line in (run / stage / "metrics.jsonl").read_text().splitlines()]


def _max_diff(a: Path, b: Path) -> float:
    wa, wb = (load_file(str(p / "adapter" / "adapter_model.safetensors")) for p in (a, b))
    assert wa.keys() == wb.keys()
    return max(float((wa[k] - wb[k]).abs().max()) for k in wa)


def test_two_processes_train_what_one_process_trains(runs):
    one, two = runs["one"], runs["two"]
    for stage in ("sft", "dpo", "dpo_fresh"):
        assert json.loads((two / stage / "stage.json").read_text())["status"] == "done"
    # Same batches, synchronised gradients: the fresh DPO stage agrees step by step and in its adapter.
    fresh_one, fresh_two = _log(one, "dpo_fresh"), _log(two, "dpo_fresh")
    assert [e["step"] for e in fresh_one] == [e["step"] for e in fresh_two]
    for a, b in zip(fresh_one, fresh_two):
        for key in ("loss", "grad_norm", "rewards/margins", "rewards/accuracies"):
            assert (a.get(key) is None) == (b.get(key) is None)
            if a.get(key) is not None:
                assert b[key] == pytest.approx(a[key], abs=1e-5), (a["step"], key)
    assert _max_diff(one / "dpo_fresh", two / "dpo_fresh") < 1e-4
    m1, m2 = _metrics(one, "dpo_fresh"), _metrics(two, "dpo_fresh")
    for key in ("eval_loss", "eval_rewards/accuracies", "eval_rewards/margins", "eval_rank/kendall_tau"):
        assert m2[key] == pytest.approx(m1[key], abs=1e-5), key
    # SFT weighs tokens within each process's share; the SFT -> DPO chain stays close.
    assert _log(two, "sft")[0]["loss"] == pytest.approx(_log(one, "sft")[0]["loss"], abs=5e-3)  # the same batch
    assert _metrics(two, "sft")["train_loss"] == pytest.approx(_metrics(one, "sft")["train_loss"], abs=0.02)
    assert _max_diff(one / "sft", two / "sft") < 0.05
    d1, d2 = _metrics(one, "dpo"), _metrics(two, "dpo")
    assert d2["train_loss"] == pytest.approx(d1["train_loss"], abs=0.01)
    assert d2["eval_rewards/margins"] == pytest.approx(d1["eval_rewards/margins"], abs=0.01)
    assert d2["eval_rewards/accuracies"] == pytest.approx(d1["eval_rewards/accuracies"], abs=0.1)


def test_shared_files_are_written_once_by_the_main_process(runs):
    one, two = runs["one"], runs["two"]
    for stage in ("sft", "dpo", "dpo_fresh"):
        assert [set(e) for e in _log(two, stage)] == [set(e) for e in _log(one, stage)]  # one line per log, not two
    sft_one, sft_two = _log(one, "sft")[0], _log(two, "sft")[0]
    assert sft_two["num_tokens"] == sft_one["num_tokens"]  # the processes' shares add up to the whole batch
    assert (two / "dpo" / "ref_logps_train.pt").is_file() and not list((two / "dpo").glob("*.tmp"))
    checkpoint = two / "dpo" / "checkpoints" / "checkpoint-6"
    assert {p.name for p in checkpoint.glob("rng_state_*.pth")} == {"rng_state_0.pth", "rng_state_1.pth"}
    summary = json.loads((two / "summary.json").read_text())
    assert set(summary["forgetting"]) == {"sft", "dpo", "dpo_fresh"}
    assert summary["eval"]["stages"].keys() == {"sft", "dpo"} and (two / "eval" / "report.html").is_file()
    assert runs["launch"].stderr.count("run tiny") == 1  # one summary table: the other process is silent


def test_a_second_launch_skips_the_finished_stages_in_every_process(runs):
    states = {s: (runs["two"] / s / "stage.json").read_text() for s in ("sft", "dpo", "dpo_fresh")}
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("ALIGN_CACHE", str(runs["cache"]))
        launched = launch_two(runs["recipe"])
    assert launched.returncode == 0, launched.stderr[-4000:]
    assert launched.stderr.count("finished, config unchanged") == 3  # said once, by the main process
    assert {s: (runs["two"] / s / "stage.json").read_text() for s in states} == states


def test_the_global_batch_must_divide_among_the_processes(tmp_path, monkeypatch):
    from align import distributed
    from align.errors import AlignError
    from align.stages.engine import device_batch_size

    recipe = parse_recipe(tiny_recipe(tmp_path))
    monkeypatch.setattr(distributed, "world_size", lambda: 4)
    assert device_batch_size(recipe.stage("dpo")) == 2
    monkeypatch.setattr(distributed, "world_size", lambda: 3)
    with pytest.raises(AlignError, match=r"stages\.sft\.train\.batch_size: 8 .* 3 processes"):
        device_batch_size(recipe.stage("sft"))


@pytest.mark.parametrize("config", sorted((REPO / "recipes" / "accelerate").glob("*.yaml")), ids=lambda p: p.name)
def test_accelerate_configs_load(config):
    from accelerate.commands.config.config_args import load_config_from_file

    assert load_config_from_file(str(config)).num_processes == 2  # unless --num_processes says otherwise
