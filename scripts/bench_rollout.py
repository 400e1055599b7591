"""Speed of align's decoding loop (align.models.decoding) against `model.generate`, and `make quickstart`'s time per
phase with each.

Rollouts (`rollouts`, the default): SmolLM2-135M-Instruct from the embedded default in nf4 (or `--quantization
none`) with a new LoRA policy whose B matrices are drawn at random, so the adapter changes the function. Three
workloads, each timed `--repeats` times (median), `generate` given a fresh GenerationConfig (no processor from the
model's defaults, as ours applies none) and the KV cache:

- greedy: `--prompts` held-out synthetic task prompts in batches of `--batch-size`, `--max-new-tokens` tokens, as
  `align eval` decodes them; every reply is compared token for token with generate's;
- sampled: `--groups` prompts x G = `--generations` samples at temperature 1, as a GRPO step samples them (ours runs
  each prompt once and repeats its KV cache; generate gets the G copies), EOS ignored on both sides so that both
  generate exactly groups x G x max-new-tokens tokens;
- each of ours again with `model.dequantized_generation` (4-bit weights dequantized once per call), with the
  size of that copy.

RL steps (`--steps N`): where a step's time goes, in quickstart_grpo's grpo stage and quickstart_ppo's ppo stage (their
settings, N steps after a 2-step SFT and, for PPO, a 2-step reward model; no evaluation), each engine in a fresh
process: generation, the rest of making experience (scoring, the log-prob and value passes, advantages) and the
updates, per step after the first (warm-up).

Quickstart (`--quickstart`): `align run recipes/quickstart.yaml` twice, each in a fresh process and run folder:
once with align's decoding replaced by `model.generate` (the code before the fast path) and once as it is. It
prints the seconds of each phase (loading the base, SFT, DPO, the forgetting measurement, the evaluation) and
checks that both evaluations' greedy replies, task accuracies and forgetting numbers are identical. `make setup`
is not part of it: run it on a fresh clone and time it apart (it does not change with the decoding loop).

    .venv/bin/python scripts/bench_rollout.py                       # ~3 minutes on 2 cores
    .venv/bin/python scripts/bench_rollout.py --steps 4             # GRPO and PPO steps by phase, ~10 minutes
    .venv/bin/python scripts/bench_rollout.py --quickstart          # two quickstarts, ~15-20 minutes

Numbers depend on the CPU (AVX2 fp32 or AVX512-BF16/AMX bf16: `precision: auto`); the script prints which.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from functools import partial
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table

REPO = Path(__file__).resolve().parents[1]
PHASES = ("load", "sft", "dpo", "forgetting", "eval")


def generate_peer(model, input_ids, attention_mask, *, max_new_tokens: int, eos_id: int, pad_id: int,
                  do_sample: bool = False, temperature: float = 1.0, top_p: float = 1.0, repeats: int = 1):
    """align.models.decoding.decode's contract computed by `model.generate`, as align did before its own loop."""
    from transformers import GenerationConfig

    sampling = {"do_sample": True, "temperature": temperature, "top_k": 0, "top_p": top_p} if do_sample else {
        "do_sample": False}
    config = GenerationConfig(max_new_tokens=max_new_tokens, pad_token_id=pad_id, use_cache=True,
                              eos_token_id=eos_id if eos_id >= 0 else None, **sampling)
    out = model.generate(input_ids=input_ids.repeat_interleave(repeats, 0),
                         attention_mask=attention_mask.repeat_interleave(repeats, 0), generation_config=config)
    out = out[:, input_ids.shape[1]:]
    is_eos = out == eos_id
    return out.masked_fill((is_eos.long().cumsum(1) - is_eos.long()) > 0, pad_id)


def machine() -> str:
    from align.models.load import compute_dtype

    flags = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    kind = "AMX" if "amx_bf16" in flags else "AVX512-BF16" if "avx512_bf16" in flags else "AVX2"
    return f"{platform.processor() or platform.machine()} ({kind}), {torch.get_num_threads()} threads, " \
           f"precision auto = {compute_dtype('auto')}"


def _median_seconds(fn, repeats: int):
    times, out = [], None
    for _ in range(repeats):
        torch.manual_seed(0)
        start = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times), out


def rollouts(args) -> dict:
    from align.data.synthetic import instances
    from align.models.decoding import decode, dequantized_weights, want_dequantized
    from align.models.host import ModelHost
    from align.models.tokens import encode_prompt, left_pad
    from align.settings import ModelConfig

    host = ModelHost(ModelConfig(base=args.model, quantization=args.quantization))
    base, tokenizer = host.load(), host.tokenizer
    eos, pad = tokenizer.eos_token_id, tokenizer.pad_token_id
    prompts = [encode_prompt(tokenizer, [{"role": "user", "content": inst.prompt}])
               for _, inst in instances("heldout", args.prompts)]
    batches = [left_pad(prompts[i:i + args.batch_size], pad) for i in range(0, len(prompts), args.batch_size)]
    groups = left_pad(prompts[: args.groups], pad)
    results: dict = {"machine": machine(), "model": host.resolved.description, "quantization": args.quantization}
    with host.policy() as model:
        torch.manual_seed(0)
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.data.normal_(0, 0.02)
        model.eval()

        def greedy(engine):
            return [engine(model, b["input_ids"], b["attention_mask"], max_new_tokens=args.max_new_tokens,
                           eos_id=eos, pad_id=pad) for b in batches]

        def sampled(engine):  # eos_id -1: no token ends a sample, so every side generates the same count
            return engine(model, groups["input_ids"], groups["attention_mask"], max_new_tokens=args.max_new_tokens,
                          eos_id=-1, pad_id=pad, do_sample=True, repeats=args.generations)

        sampled_tokens = args.groups * args.generations * args.max_new_tokens
        reference = None
        for label, engine, dequantized in (("generate", generate_peer, False), ("align", decode, False),
                                           ("align, dequantized", decode, True)):
            want_dequantized(base, dequantized)
            greedy_s, replies = _median_seconds(partial(greedy, engine), args.repeats)
            sampled_s, samples = _median_seconds(partial(sampled, engine), args.repeats)
            assert samples.shape == (args.groups * args.generations, args.max_new_tokens)
            if reference is None:
                reference = replies
            identical = all(torch.equal(a, b[:, : a.shape[1]]) and bool((b[:, a.shape[1]:] == pad).all())
                            for a, b in zip(replies, reference))
            results[label] = {"greedy_s": greedy_s, "sampled_s": sampled_s, "greedy_identical": identical,
                              "sampled_tokens_per_s": sampled_tokens / sampled_s}
        want_dequantized(base, False)
        with dequantized_weights(base) as size:
            results["dequantized_bytes"] = size
    for label in ("align", "align, dequantized"):
        results[label]["greedy_speedup"] = results["generate"]["greedy_s"] / results[label]["greedy_s"]
        results[label]["sampled_speedup"] = results["generate"]["sampled_s"] / results[label]["sampled_s"]
    return results


def print_rollouts(args, results: dict) -> None:
    table = Table(title=f"Decoding: {results['model']}, {results['quantization']}; {results['machine']}")
    for column in ("", f"greedy {args.prompts}x{args.max_new_tokens} (s)", "speed-up", "identical to generate",
                   f"sampled {args.groups}x{args.generations}x{args.max_new_tokens} (s)", "tokens/s", "speed-up"):
        table.add_column(column, justify="right")
    for label in ("generate", "align", "align, dequantized"):
        r = results[label]
        table.add_row(label, f"{r['greedy_s']:.2f}", f"{r.get('greedy_speedup', 1):.2f}x",
                      str(r["greedy_identical"]), f"{r['sampled_s']:.2f}", f"{r['sampled_tokens_per_s']:.0f}",
                      f"{r.get('sampled_speedup', 1):.2f}x")
    Console().print(table)
    print(f"dequantized copy while generating: {results['dequantized_bytes'] / 2**20:.0f} MiB")


def timed(owner, name: str, seconds: dict, phase: str) -> None:
    """`owner.name` from now on adds the seconds of each call to `seconds[phase]`."""
    original = getattr(owner, name)

    def wrapper(*args, **kwargs):
        start = time.perf_counter()
        try:
            return original(*args, **kwargs)
        finally:
            seconds[phase] = seconds.get(phase, 0.0) + time.perf_counter() - start

    setattr(owner, name, wrapper)


def use_engine(engine: str) -> None:
    from align.models import generation
    from align.stages import ppo_rollout

    if engine == "generate":
        generation.decode = ppo_rollout.decode = generate_peer


def steps_child(engine: str, kind: str, steps: int, out: Path) -> None:
    """`steps` steps of quickstart_<kind>'s <kind> stage, each step's phases timed, into out/result.json."""
    import yaml

    from align import cli
    from align.stages import grpo, ppo, ppo_rollout

    use_engine(engine)
    recipe = yaml.safe_load((REPO / "recipes" / f"quickstart_{kind}.yaml").read_text())
    recipe.pop("eval", None)
    recipe["forgetting"] = {"enabled": False}
    for stage in recipe["stages"]:
        stage["train"]["max_steps"] = steps if stage["kind"] == kind else 2
        stage.pop("eval_data", None)
    recipe["output_dir"] = str(out)
    (out / "recipe.yaml").write_text(yaml.safe_dump(recipe))
    per_step: list[dict] = []
    current: dict = {}
    algorithm = {"grpo": grpo.GRPO, "ppo": ppo.PPO}[kind]
    timed(ppo_rollout, "decode", current, "generation")
    timed(algorithm, "experience", current, "experience")
    update = algorithm.update

    def update_and_close_step(self, *args, **kwargs):
        start = time.perf_counter()
        result = update(self, *args, **kwargs)
        current["update"] = time.perf_counter() - start
        per_step.append(dict(current))
        current.clear()
        return result

    algorithm.update = update_and_close_step
    cli.main(["run", "--quiet", str(out / "recipe.yaml")])
    (out / "result.json").write_text(json.dumps(per_step))


def rl_steps(args) -> dict:
    results: dict = {"machine": machine(), "steps": args.steps}
    with tempfile.TemporaryDirectory() as work:
        for kind in ("grpo", "ppo"):
            for engine in ("generate", "align"):
                out = Path(work) / f"{kind}-{engine}"
                out.mkdir()
                subprocess.run([sys.executable, __file__, "--steps-child", f"{kind}:{engine}:{args.steps}", "--out",
                                str(out)], check=True, cwd=REPO)
                timed_steps = json.loads((out / "result.json").read_text())[1:]  # the first one warms up
                mean = {phase: statistics.mean(s.get(phase, 0.0) for s in timed_steps)
                        for phase in ("generation", "experience", "update")}
                results[f"{kind}/{engine}"] = {"generation": mean["generation"],
                                               "rest_of_experience": mean["experience"] - mean["generation"],
                                               "update": mean["update"], "step": mean["experience"] + mean["update"]}
    table = Table(title=f"Seconds per RL step by phase (mean of steps 2-{args.steps}); {results['machine']}")
    for column in ("stage", "decoding", "generation", "rest of experience", "update", "step", "generation share"):
        table.add_column(column, justify="right")
    for key, r in results.items():
        if "/" in key:
            table.add_row(*key.split("/"), f"{r['generation']:.2f}", f"{r['rest_of_experience']:.2f}",
                          f"{r['update']:.2f}", f"{r['step']:.2f}", f"{r['generation'] / r['step']:.0%}")
    Console().print(table)
    return results


def quickstart_child(engine: str, out: Path) -> None:
    """One `align run recipes/quickstart.yaml` in this process, with `engine` decoding and each phase timed."""
    from align import cli, pipeline
    from align.models import host

    use_engine(engine)
    seconds: dict[str, float] = {}
    timed(host.ModelHost, "load", seconds, "load")
    timed(pipeline.Pipeline, "measure_forgetting", seconds, "forgetting")
    timed(pipeline.Pipeline, "evaluate", seconds, "eval")
    start = time.perf_counter()
    cli.main(["run", "--quiet", str(REPO / "recipes" / "quickstart.yaml"), f"output_dir={out}"])
    seconds["total"] = time.perf_counter() - start
    run = out / "quickstart"
    for stage in ("sft", "dpo"):
        seconds[stage] = json.loads((run / stage / "stage.json").read_text())["seconds"]
    summary = json.loads((run / "summary.json").read_text())
    evaluation = json.loads((run / "eval" / "eval.json").read_text())
    (out / "result.json").write_text(json.dumps({
        "seconds": seconds, "forgetting": summary["forgetting"],
        "accuracy": summary["heldout"]["task_accuracy"],
        "replies": [{k: v["text"] for k, v in s["responses"].items()} for s in evaluation["samples"]]}))


def quickstart(args) -> dict:
    results = {"machine": machine()}
    with tempfile.TemporaryDirectory() as work:
        for engine in ("generate", "align"):
            out = Path(work) / engine
            subprocess.run([sys.executable, __file__, "--quickstart-child", engine, "--out", str(out)], check=True,
                           cwd=REPO)
            results[engine] = json.loads((out / "result.json").read_text())
    before, after = results["generate"], results["align"]
    for side in (before, after):  # the stage each measurement started from is a path in its own run folder
        for measured in side["forgetting"].values():
            measured.pop("start", None)
    results["identical"] = {key: before[key] == after[key] for key in ("replies", "accuracy", "forgetting")}
    table = Table(title=f"make quickstart by phase (seconds); {results['machine']}")
    for column in ("phase", "generate", "align", "speed-up"):
        table.add_column(column, justify="right")
    for phase in (*PHASES, "total"):
        b, a = before["seconds"].get(phase, 0.0), after["seconds"].get(phase, 0.0)
        table.add_row(phase, f"{b:.0f}", f"{a:.0f}", f"{b / a:.2f}x" if a else "-")
    Console().print(table)
    print("identical greedy replies, task accuracies, forgetting:", results["identical"])
    print("task accuracy:", after["accuracy"])
    return results


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="builtin:smollm2-135m-instruct")
    p.add_argument("--quantization", choices=("nf4", "none"), default="nf4")
    p.add_argument("--prompts", type=int, default=96)
    p.add_argument("--batch-size", type=int, default=48)
    p.add_argument("--groups", type=int, default=4)
    p.add_argument("--generations", type=int, default=8)
    p.add_argument("--max-new-tokens", type=int, default=24)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--quickstart", action="store_true", help="time make quickstart's phases with each decoding")
    p.add_argument("--steps", type=int, help="time N steps of quickstart_grpo's grpo and quickstart_ppo's ppo stage")
    p.add_argument("--quickstart-child", choices=("generate", "align"), help=argparse.SUPPRESS)
    p.add_argument("--steps-child", help=argparse.SUPPRESS)
    p.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    p.add_argument("--json", type=Path, help="write the numbers here")
    return p.parse_args(argv)


def main(argv=None) -> dict:
    args = parse_args(argv)
    if args.quickstart_child:
        quickstart_child(args.quickstart_child, args.out)
        return {}
    if args.steps_child:
        kind, engine, steps = args.steps_child.split(":")
        steps_child(engine, kind, int(steps), args.out)
        return {}
    if args.steps:
        results = rl_steps(args)
    elif args.quickstart:
        results = quickstart(args)
    else:
        results = rollouts(args)
        print_rollouts(args, results)
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))
    return results


if __name__ == "__main__":
    main()
