"""scripts/bench_grpo.py: a tiny run of both sides, unquantized and QLoRA, reports every number on the same workload."""

import json
import math

import pytest

from tests.conftest import load_script


def test_trl_gets_the_prompts_in_the_order_our_loop_draws_them():
    bench = load_script("bench_grpo")
    args = bench.parse_args(["--model", "tiny", "--steps", "3", "--prompts", "2", "--generations", "2",
                             "--minibatch", "2"])
    order = bench.loop_order(args)
    assert sorted(order) == list(range(6))  # one epoch: every prompt once, none repeated
    assert order != list(range(6))  # the loop's seeded permutation, not the file's order
    with pytest.raises(SystemExit):  # a minibatch that does not divide prompts × G
        bench.parse_args(["--prompts", "2", "--generations", "3", "--minibatch", "4"])


@pytest.mark.slow  # four fresh processes that each import torch, transformers and TRL: 30-36 s on 2 busy cores
def test_tiny_run_reports_every_number(tmp_path, monkeypatch):
    # One thread per process: on a busy 2-core machine two threads wait on each other at every tiny matmul, and this
    # test checks that the numbers exist and agree in kind, not how large they are.
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    out = tmp_path / "bench.json"
    bench = load_script("bench_grpo")
    bench.main(["--model", "tiny", "--steps", "2", "--prompts", "2", "--generations", "2", "--max-new-tokens", "4",
                "--minibatch", "2", "--quantization", "both", "--dequantized-generation", "--skip-ceiling",
                "--json", str(out)])
    report = json.loads(out.read_text())
    assert report["problems"] == []
    assert set(report["results"]) == {"none", "nf4"} and report["settings"]["dequantized_generation"] is True
    for quant, sides in report["results"].items():
        ours, trl = sides["ours"], sides["trl"]
        for side, r in sides.items():
            for key in ("s_per_step", "gen_tokens_per_s", "peak_rss_bytes", "step_tokens_per_s"):
                assert math.isfinite(r[key]) and r[key] > 0, (quant, side, key)
            assert len(r["step_s"]) == len(r["gen_s"]) == 2 and r["timed_steps"] == 1, (quant, side)
            assert r["completions"] == [2 * 2, 2 * 2], (quant, side)  # prompts × G at every step
            assert all(0 < n <= 4 for n in r["max_completion_tokens"]), (quant, side)
            assert r["settings"]["trainable_dtypes"] == ["torch.float32"], (quant, side)
        # one optimizer step per minibatch of 2 completions: 2 per rollout, 2 rollouts
        assert ours["optimizer_steps"] == trl["optimizer_steps"] == 4, quant
        assert ours["settings"]["num_generations"] == trl["settings"]["num_generations"] == 2, quant
        assert ours["prompt_digests"] == trl["prompt_digests"], quant  # the same prompt ids, step by step
        assert trl["settings"]["steps_per_generation"] == 2 and trl["settings"]["loss_type"] == "grpo"
        assert (ours["settings"]["linear_4bit_layers"] > 0) == (quant == "nf4"), quant
        assert ours["settings"]["linear_4bit_layers"] == trl["settings"]["linear_4bit_layers"], quant
        assert ours["settings"]["dequantized_generation"] == (quant == "nf4"), quant
        c = report["comparisons"][quant]
        assert c["speedup"] == pytest.approx(trl["s_per_step"] / ours["s_per_step"])
        assert c["peak_rss_ratio"] == pytest.approx(ours["peak_rss_bytes"] / trl["peak_rss_bytes"])
        assert c["target_met"] == (c["speedup"] >= 2 and c["peak_rss_ratio"] <= 1)
