"""scripts/bench_dpo.py: every side of every comparison trains on the same ids, and a tiny run reports every number."""

import json

import pytest

from tests.conftest import load_script


def _bench():
    return load_script("bench_dpo")


def test_each_sides_rows_hold_the_same_sequences():
    bench = _bench()
    data = bench.make_data(steps=2, vocab=600)

    def run_sequences(kind, side):
        return sorted(s for row in bench.side_rows(kind, side, data) for s in bench.sequences(row))

    assert run_sequences("dpo", "ours") == run_sequences("dpo", "trl")
    assert len(run_sequences("dpo", "ours")) == 2 * 2 * bench.PAIRS_PER_STEP
    assert run_sequences("rank", "ours") == run_sequences("rank", "pairs")  # the K/2 pairs cover every response
    # TRL's SFTTrainer turns `completion_mask` into labels, -100 on the prompt: the rows the collator then gets
    trl_sft = [{"input_ids": r["input_ids"],
                "labels": [-100 if m == 0 else t for t, m in zip(r["input_ids"], r["completion_mask"])]}
               for r in bench.side_rows("sft", "trl", data)]
    ours_sft = bench.side_rows("sft", "ours", data)
    assert [s for r in ours_sft for s in bench.sequences(r)] == [s for r in trl_sft for s in bench.sequences(r)]
    assert {n for r in ours_sft for _, n in bench.sequences(r)} == {bench.ANSWER}
    pairs = bench.side_rows("rank", "pairs", data)
    assert all(p["scores"] == [1.0, 0.0] for p in pairs) and len(pairs) == len(data["groups"]) * bench.K // 2


def test_step_flops_follow_the_documented_formula():
    bench = _bench()
    model = {"hidden_size": 8, "num_hidden_layers": 2, "intermediate_size": 16, "num_attention_heads": 2,
             "num_key_value_heads": 1, "vocab_size": 50, "lora_params": 100}
    frozen = 2 * (2 * 8 * 8 + 2 * 8 * 4 + 3 * 8 * 16)
    tokens, scored, attention = 3 * 10, 12, 4 * 2 * 8 * 3 * 10 * 10
    forward = 2 * (frozen + 100) * tokens + 2 * 8 * 50 * scored + attention
    train = forward + 2 * frozen * tokens + 4 * 100 * tokens + 2 * 8 * 50 * scored + 2 * attention
    assert bench.step_flops(model, [3, 10], scored, reference=False) == train
    assert bench.step_flops(model, [3, 10], scored, reference=True) == train + forward


@pytest.mark.slow  # seven fresh processes that each import torch, transformers and TRL: ~2 min on 2 cores
def test_tiny_run_reports_every_number(tmp_path):
    out = tmp_path / "bench.json"
    _bench().main(["--model", "tiny", "--steps", "3", "--json", str(out)])
    report = json.loads(out.read_text())
    assert report["problems"] == [] and report["ceiling"]["tflops"] > 0
    assert set(report["comparisons"]) == {"dpo vs trl", "dpo vs trl_pre", "sft vs trl", "rank vs pairs"}
    for name, c in report["comparisons"].items():
        assert c["same_token_ids"], name
        sides = report["results"][name.split()[0]]
        ours, peer = sides["ours"], sides[c["peer"]]
        assert c["speedup"] == pytest.approx(peer["s_per_step"] / ours["s_per_step"]), name
        assert c["tokens_per_s_ratio"] == pytest.approx(c["speedup"]), name  # the same tokens per step on both sides
        assert c["peak_rss_ratio"] == pytest.approx(ours["peak_rss_bytes"] / peer["peak_rss_bytes"]), name
        if name.startswith("rank"):
            assert c["max_abs_loss_diff"] is None  # Plackett–Luce and DPO are different losses
        else:
            # same init, ids, order and fp32 math on both sides: rounding apart (3e-6 measured)
            assert c["max_abs_loss_diff"] < 1e-5, name
    sft, dpo_trl = report["comparisons"]["sft vs trl"], report["comparisons"]["dpo vs trl"]
    assert sft["epoch_speedup"] == pytest.approx(sft["speedup"])  # neither side precomputes a reference
    assert dpo_trl["epoch_speedup"] < dpo_trl["speedup"]  # only ours does, and an epoch pays for it
    for kind, sides in report["results"].items():
        tokens = {side: r["step_tokens"] for side, r in sides.items()}
        assert len({json.dumps(t) for t in tokens.values()}) == 1, (kind, tokens)
        for side, r in sides.items():
            assert len(r["losses"]) == len(r["step_s"]) == 3 and r["timed_steps"] == 2, (kind, side)
            for key in ("s_per_step", "tokens_per_s", "peak_rss_bytes", "model_tflops", "ceiling_fraction", "setup_s"):
                assert r[key] > 0, (kind, side, key)
    assert report["results"]["dpo"]["ours"]["tokens_per_step"] == 8 * 2 * (64 + 64)  # TRL's own count
    dpo = report["results"]["dpo"]
    assert dpo["ours"]["ref_precompute_s"] > 0 and dpo["trl_pre"]["ref_precompute_s"] > 0
    assert dpo["trl"]["ref_precompute_s"] is None  # TRL's default: a reference forward in every step instead
