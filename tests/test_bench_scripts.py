"""Smoke tests of the benchmark scripts: bench_ppo_memory.py on the tiny model (every mode measured, ratios finite, and
the random Llama it builds loads through align's loader), bench_rollout.py, and bench_collect.py at a small size."""

import json
import math
import subprocess
from pathlib import Path

import pytest
import torch

from align.models.load import compute_dtype, load_base
from align.settings import ModelConfig
from tests.conftest import load_script


def _bench():
    return load_script("bench_ppo_memory")


@pytest.mark.slow  # seven fresh Python processes that each import torch and transformers: ~70 s on 2 busy cores
def test_bench_ppo_memory_measures_every_mode(tmp_path):
    out = tmp_path / "bench.json"
    _bench().main(["--model", "builtin:tiny", "--quantization", "none", "--steps", "1", "--batch", "4",
                   "--max-new-tokens", "4", "--generations", "2", "--work-dir", str(tmp_path / "work"),
                   "--json", str(out)])
    report = json.loads(out.read_text())
    for mode in ("base", "sft", "ppo", "grpo", "four_bases"):
        assert report["results"][mode]["peak_bytes"] > 0, mode
    assert report["results"]["four_bases"]["loads"] == 4
    assert report["results"]["ppo"]["loads"] == 1  # sft and rm were skipped as finished, not rerun
    assert report["results"]["grpo"]["loads"] == 1  # sft skipped as finished
    assert set(report["ratios"]) == {"PPO / SFT peak", "(PPO - base) / (SFT - base)", "GRPO / PPO peak",
                                     "(GRPO - base) / (PPO - base)", "four bases / PPO peak"}
    for name, value in report["ratios"].items():
        assert value is not None and math.isfinite(value), name


def test_random_llama_tiny_builds_a_folder_that_load_base_loads(tmp_path):
    folder = _bench().build_random_llama("tiny", tmp_path / "llama")
    assert json.loads((folder / "config.json").read_text())["dtype"] == "bfloat16"
    model, tokenizer = load_base(ModelConfig(base=str(folder), quantization="none"))
    assert (model.config.hidden_size, model.config.num_hidden_layers, model.config.num_key_value_heads) == (64, 2, 2)
    assert not model.config.tie_word_embeddings and model.config.vocab_size == len(tokenizer)
    assert not torch.isnan(model.lm_head.weight).any()  # initialised, not left empty
    ids = tokenizer.apply_chat_template([{"role": "user", "content": "What is 2 + 3?"}], add_generation_prompt=True,
                                        return_tensors="pt", return_dict=True)["input_ids"]
    assert model(ids.to(model.device)).logits.shape == (1, ids.shape[1], len(tokenizer))
    assert _bench().build_random_llama("tiny", folder) == folder  # kept once built


def test_bench_rollout_compares_align_decoding_with_generate(tmp_path):
    out = tmp_path / "rollout.json"
    load_script("bench_rollout").main(["--model", "builtin:tiny", "--quantization", "nf4", "--prompts", "6",
                                       "--batch-size", "3", "--groups", "2", "--generations", "3",
                                       "--max-new-tokens", "5", "--repeats", "1", "--json", str(out)])
    report = json.loads(out.read_text())
    for engine in ("align", "align, dequantized"):
        assert report[engine]["greedy_identical"] is True, engine
        assert math.isfinite(report[engine]["sampled_speedup"]) and report[engine]["sampled_speedup"] > 0
    quantized = sum(m.in_features * m.out_features for m in load_base(ModelConfig(
        base="builtin:tiny", quantization="nf4"))[0].modules() if type(m).__name__ == "Linear4bit")
    assert report["dequantized_bytes"] == quantized * torch.tensor([], dtype=compute_dtype("auto")).element_size()


def _in_history(rev: str) -> bool:
    return subprocess.run(["git", "-C", str(Path(__file__).parents[1]), "cat-file", "-e", f"{rev}^{{commit}}"],
                          capture_output=True).returncode == 0


@pytest.mark.skipif(not _in_history("1d16108"), reason="the store it compares with (git commit 1d16108) is not in "
                    "this clone's history (a shallow clone)")
def test_bench_collect_runs_both_stores_at_a_small_size(tmp_path):
    out = tmp_path / "collect.json"
    report = load_script("bench_collect").main(["--pairs", "600", "--annotators", "4", "--seconds", "1.5",
                                                "--pause", "0.05", "0.2", "--saturation-seconds", "0.5",
                                                "--baseline-seconds", "0.5", "--dir", str(tmp_path), "--json",
                                                str(out)])
    assert json.loads(out.read_text())["saturation_ratio"] == report["saturation_ratio"] > 0
    for name in ("new", "before"):
        result = report["results"][name]
        assert result["pairs"] == 600
        for run in ("paced", "saturation"):
            assert result[run]["done"] > 0 and result[run]["errors"] == 0, (name, run)
            assert result[run]["next"]["p95"] > 0 and result[run]["submit"]["max"] > 0, (name, run)
    assert math.isfinite(report["upgrade_s"])
