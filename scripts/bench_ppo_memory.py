"""PPO's and GRPO's peak memory against SFT's on the same base and batch shape, and against peers' four models.

align's PPO keeps policy, value, reward and reference as four LoRA adapters on ONE frozen base; peers
(TRL's old PPOTrainer, OpenRLHF) hold four models. This script measures, each in a fresh subprocess:

- `base`: align's loader loads the base, nothing else (the floor);
- `sft`: an sft stage of --steps steps, batch --batch, max_length 128;
- `ppo`: a ppo stage of --steps steps (rollout batch --batch, minibatch --batch/2, 1 PPO epoch, rewards:
  the `synthetic_tasks` rule plus a reward-model adapter). Its sft and rm stages (1 step each) are first
  run by an unmeasured subprocess, so the measured one skips them as finished: its peak is base + PPO;
- `grpo`: a grpo stage of --steps steps from the same sft adapter, --batch completions a step (--batch / G
  prompts x G = --generations samples), minibatch --batch/2, the `synthetic_tasks` rule alone and no
  reference (kl_coef 0, as quickstart_grpo and TRL's default): policy only, no value, reward or reference adapter;
- `four_bases`: the base loaded four times, no adapters, no training: a lower bound for peers' PPO.

Peak: on CUDA `torch.cuda.max_memory_allocated()`; on CPU the peak RSS (VmHWM). "above base" is the
peak minus the same process's peak right after the base was loaded. Data: the embedded synthetic task.

    .venv/bin/python scripts/bench_ppo_memory.py --model builtin:tiny --quantization none   # CPU, seconds
    .venv/bin/python scripts/bench_ppo_memory.py            # SmolLM2-135M in nf4; on CPU, minutes
    python scripts/bench_ppo_memory.py --random-llama 8b --quantization nf4 --steps 1 --work-dir /tmp/b

On CPU the numbers are mostly Python and its libraries; they mean something on a GPU. `--random-llama
8b` first builds a random Llama-3-8B-shaped model in bf16 on the CPU and saves it in the work dir: about
16 GB of RAM and 16 GB of disk, and minutes. The children load it (nf4 on a GPU: ~6 GB per base, so
`four_bases` needs ~23 GB). A `--work-dir` that is kept reuses the built model and the sft/rm stages.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

MODES = ("base", "sft", "ppo", "grpo", "four_bases")
LLAMA_SHAPES = {
    "8b": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
               num_key_value_heads=8, vocab_size=128256),
    "tiny": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2),
}


def peak_bytes() -> int:
    import torch

    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated()
    # Not ru_maxrss: Linux carries the parent's high-water mark over fork+exec into it, VmHWM starts afresh.
    status = Path("/proc/self/status").read_text()
    return int(next(line for line in status.splitlines() if line.startswith("VmHWM:")).split()[1]) * 1024


def recipe(args, mode: str, work: Path) -> str:
    """YAML of the measured (or, for `prep`, preparing) run; prep and ppo share their sft and rm stages."""
    import yaml

    rows = args.batch * args.steps  # enough prompts that no step repeats one
    train = {"lr": 1.0e-4, "batch_size": args.batch, "max_length": 128, "max_prompt_length": 96}
    sft = {"name": "sft", "kind": "sft", "data": {"path": "synthetic:sft", "max_rows": rows},
           "train": {**train, "max_steps": args.steps if mode == "sft" else 1}}
    stages = [sft]
    if mode == "grpo":
        stages.append({
            "name": "grpo", "kind": "grpo", "init": "${sft.adapter}",
            "data": {"path": "synthetic:prompts", "max_rows": rows},
            "rewards": [{"rule": "synthetic_tasks"}],
            "grpo": {"prompts_per_step": args.batch // args.generations, "num_generations": args.generations,
                     "minibatch_size": args.batch // 2, "max_new_tokens": args.max_new_tokens},
            "train": {**train, "max_steps": args.steps},
        })
    if mode in ("prep", "ppo"):
        stages.append({"name": "rm", "kind": "rm", "init": "${sft.adapter}",
                       "data": {"path": "synthetic:preference", "max_rows": args.batch},
                       "train": {**train, "max_steps": 1}})
    if mode == "ppo":
        stages.append({
            "name": "ppo", "kind": "ppo", "init": "${sft.adapter}",
            "data": {"path": "synthetic:prompts", "max_rows": rows},
            "rewards": [{"rule": "synthetic_tasks", "weight": 1.0}, {"model": "${rm.adapter}", "weight": 0.5}],
            "ppo": {"rollout_batch_size": args.batch, "minibatch_size": args.batch // 2, "ppo_epochs": 1,
                    "max_new_tokens": args.max_new_tokens},
            "train": {**train, "max_steps": args.steps},
        })
    return yaml.safe_dump({
        "name": "bench_sft" if mode == "sft" else "bench_ppo",
        # the sft measurement in a folder of its own: prep's sft, when its settings are the same, would be reused
        "output_dir": str(work / ("runs_sft" if mode == "sft" else "runs")),
        "model": {"base": args.model, "quantization": args.quantization,
                  "lora": {"r": 16, "alpha": 32, "dropout": 0.0}},
        "stages": stages,
    })


def child(args) -> dict:
    """One measurement, in this (fresh) process."""
    import torch

    from align import pipeline  # imported in every mode, so that CPU floors hold the same libraries
    from align.config import parse_recipe
    from align.models.host import ModelHost
    from align.models.load import compute_dtype, load_base
    from align.settings import ModelConfig

    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    held, loaded = [], []  # every base loaded, kept referenced to the end; the peak right after each load

    def load_and_record(*a, **kw):
        held.append(load_base(*a, **kw))
        loaded.append(peak_bytes())
        return held[-1]

    if args.child in ("base", "four_bases"):
        for _ in range(4 if args.child == "four_bases" else 1):
            load_and_record(ModelConfig(base=args.model, quantization=args.quantization))
    else:
        measured = parse_recipe(recipe(args, args.child, Path(args.work_dir)))
        # the host loads the base when the first stage that runs borrows it
        pipeline.run_recipe(measured, quiet=True, host=ModelHost(measured.model, loader=load_and_record))
        # Only prep may skip everything: its sft and rm may be finished already in a kept work dir.
        assert loaded or args.child == "prep", "the measured stage was skipped as finished"
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else f"CPU {platform.machine()} (peak RSS)"
    return {"mode": args.child, "peak_bytes": peak_bytes(), "loaded_bytes": loaded[0] if loaded else None,
            "loads": len(loaded), "device": device, "dtype": str(compute_dtype("auto")).removeprefix("torch.")}


def measure(args, mode: str, work: Path) -> dict:
    # The environment (ALIGN_CACHE, HF_HUB_OFFLINE, CUDA_VISIBLE_DEVICES) passes on to the child unchanged.
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", mode, "--work-dir", str(work),
           "--model", args.model, "--quantization", args.quantization, "--steps", str(args.steps),
           "--batch", str(args.batch), "--max-new-tokens", str(args.max_new_tokens),
           "--generations", str(args.generations)]
    start = time.time()
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"bench_ppo_memory: the {mode} run failed (exit {proc.returncode}):\n{proc.stderr[-6000:]}")
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    result["seconds"] = round(time.time() - start, 1)
    return result


def build_random_llama(preset: str, folder: Path) -> Path:
    """A random Llama of the preset's shape, in bf16, with align's tiny tokenizer; kept once built."""
    if (folder / "config.json").is_file():
        return folder
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig

    from align.models.tiny import tiny_tokenizer

    tokenizer = tiny_tokenizer()  # its ~600 ids fit any preset's vocabulary
    config = LlamaConfig(**{"vocab_size": len(tokenizer), **LLAMA_SHAPES[preset]}, tie_word_embeddings=False,
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)  # 16 GB for 8b: fp32 would need 32
    tmp = folder.with_name(folder.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    tmp.rename(folder)  # a killed build never leaves a folder that looks finished
    return folder


def ratio(a: float, b: float) -> float | None:
    return a / b if b > 0 else None


def size(n: float) -> str:
    return f"{n / 2**30:.2f} GiB" if abs(n) >= 2**30 else f"{n / 2**20:.1f} MiB"


def report(args, results: dict) -> dict:
    from rich.console import Console
    from rich.table import Column, Table

    for r in results.values():
        r["above_base_bytes"] = r["peak_bytes"] - r["loaded_bytes"]
    sft, ppo, grpo = results["sft"], results["ppo"], results["grpo"]
    ratios = {
        "PPO / SFT peak": ratio(ppo["peak_bytes"], sft["peak_bytes"]),
        "(PPO - base) / (SFT - base)": ratio(ppo["above_base_bytes"], sft["above_base_bytes"]),
        "GRPO / PPO peak": ratio(grpo["peak_bytes"], ppo["peak_bytes"]),
        "(GRPO - base) / (PPO - base)": ratio(grpo["above_base_bytes"], ppo["above_base_bytes"]),
        "four bases / PPO peak": ratio(results["four_bases"]["peak_bytes"], ppo["peak_bytes"]),
    }
    settings = {k: getattr(args, k)
                for k in ("model", "random_llama", "quantization", "steps", "batch", "generations", "max_new_tokens")}
    table = Table("mode", Column("peak", justify="right"), Column("above base", justify="right"),
                  title="peak memory per mode")
    for mode, r in results.items():
        table.add_row(mode, size(r["peak_bytes"]), size(r["above_base_bytes"]))
    console = Console()
    console.print(table)
    for name, value in ratios.items():
        console.print(f"{name}: {'n/a' if value is None else f'{value:.2f}'}")
    console.print(f"device: {results['base']['device']}, compute dtype {results['base']['dtype']}")
    console.print("settings: " + ", ".join(f"{k}={v}" for k, v in settings.items()))
    return {"device": results["base"]["device"], "dtype": results["base"]["dtype"], "settings": settings,
            "results": results, "ratios": ratios}


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="builtin:smollm2-135m-instruct", help="model.base of the recipes")
    parser.add_argument("--quantization", choices=["nf4", "none"], default="nf4")
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--batch", type=int, default=8,
                        help="SFT batch and PPO rollout batch (even: minibatch is half)")
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--generations", type=int, default=8, help="GRPO's G; it must divide --batch")
    parser.add_argument("--random-llama", choices=sorted(LLAMA_SHAPES),
                        help="a random Llama of this shape instead of --model")
    parser.add_argument("--work-dir", help="runs and the built model (default: a temporary folder, removed at the end)")
    parser.add_argument("--json", help="write every number to this file")
    parser.add_argument("--child", choices=[*MODES, "prep"], help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.batch < 2 or args.batch % 2 or args.steps < 1 or args.batch % args.generations:
        parser.error("--batch must be even, >= 2 and a multiple of --generations; --steps >= 1")
    return args


def main(argv=None) -> dict:
    args = parse_args(argv)
    if args.child:
        print(json.dumps(child(args)))
        return {}
    with contextlib.nullcontext(args.work_dir) if args.work_dir else tempfile.TemporaryDirectory() as work_dir:
        work = Path(work_dir)
        if args.random_llama:
            args.model = str(build_random_llama(args.random_llama, work / f"random-llama-{args.random_llama}"))
        # Measured stages must run, not be skipped as finished by an earlier run in a kept work dir.
        shutil.rmtree(work / "runs" / "bench_sft", ignore_errors=True)
        for stage in ("ppo", "grpo"):
            shutil.rmtree(work / "runs" / "bench_ppo" / stage, ignore_errors=True)
        measure(args, "prep", work)
        results = {mode: measure(args, mode, work) for mode in MODES}
    out = report(args, results)
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=2))
    return out


if __name__ == "__main__":
    main()
