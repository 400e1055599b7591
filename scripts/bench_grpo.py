"""Speed and peak memory of align's grpo stage against TRL 1.16's GRPOTrainer, on the same model, prompts and settings.

Each side runs in its own fresh subprocess (so its peak RSS is its own), one after the other, for each
`--quantization` asked for (`both`, the default: `none` then `nf4`; the target is for nf4, QLoRA).

Workload (defaults, all overridable): 4 prompts per step × G = 8 completions each = 32 completions, at most 64
completion tokens, μ (num_iterations) = 1, one minibatch of all 32 completions (one optimizer step per rollout per
μ: TRL's `steps_per_generation` = 1), 4 steps, of which the first is an untimed warm-up. A step is one rollout
batch: sampling, scoring, the old-policy log-probs (where needed), and all μ passes of updates. The model is a
Llama-shaped config initialised at random (scripts/bench_dpo.py's `build_model`: `tiny`, or `100m`, ~110M parameters
with a 32,000-id head) and saved with align's tiny tokenizer; random weights rarely sample EOS, so completions run
to full length and both sides generate about the same number of tokens. The prompts are the first prompts × steps of
align's `synthetic:prompts` and the reward is the `synthetic_tasks` rule card (1 when the completion passes the
prompt's rule, else 0): ours through the recipe, TRL's through a reward function that calls the same align rule
checker on the completion text. A random model almost never earns it, so most advantages are 0; both sides still run
every forward and backward.

Matched, and set explicitly where TRL's default differs: fp32 (`bf16=False`; TRL defaults to bf16), no gradient
checkpointing (TRL defaults to it), the same quantization (nf4: bitsandbytes 4-bit base, double quantization, fp32
compute, the 4-bit layers kept in their loaded layout as align's loader keeps them, and the trainable LoRA weights
cast back to fp32 after TRL casts them to bf16), LoRA r=16, alpha=32, dropout 0 on every linear layer, G, the
maximum completion length, temperature 1 with no top-k/top-p/min-p/repetition penalty, TRL's `beta` = our
`kl_coef` (0: neither side loads a reference), `num_iterations`, `epsilon`/`epsilon_high` = `clip_low`/`clip_high`,
the aggregation (`sequence` = TRL `loss_type="grpo"`, `token` = `bnpo`, `constant` = `dr_grpo`), the advantage
(`group_norm` = `scale_rewards="group"`, `group_mean` = `"none"`), no overlong penalty, no truncated-completion
masking, no dynamic sampling, AdamW (lr 1e-4, eps 1e-5 as ours, no weight decay), linear decay without warm-up,
max grad norm 1, the seed, and the batch geometry: TRL's `generation_batch_size` = prompts × G,
`per_device_train_batch_size` = our `minibatch_size`, no gradient accumulation, so one TRL optimizer step is one of
our minibatches and TRL's `steps_per_generation` = prompts × G / minibatch (1 by default, as the issue asks; a
smaller `--minibatch` gives several optimizer steps per rollout on both sides).
TRL's `max_steps` counts optimizer steps: steps × steps_per_generation × μ. TRL gets the prompts as a conversational
dataset, unshuffled, in the order our online loop draws them (its seeded permutation), so step k of both sides
samples for the same prompts; every side records the prompt token ids of each generation call, and the run fails
unless they agree step by step, as it fails unless both sides made the same number of optimizer steps with the
same G and completions per step.

Not identical: the samples. Ours draws from its own KV-cached decoding loop (align.models.decoding: each prompt's
prefill runs once and its cache is repeated G times; one uniform draw per token), TRL from transformers' `generate`
on G copies of each prompt: the same distribution, different draws, so completions, lengths, rewards and losses
differ and each side counts the completion tokens it generated. TRL skips the old-policy log-prob forward when a
rollout is one optimizer step (μ = 1 and minibatch = prompts × G: the ratio is exactly 1); so does ours (with the
defaults both skip it).
Ours reshuffles the minibatches in each of the μ passes, TRL shuffles once per rollout. The LoRA inits are seeded
alike but not compared.

Reported per side: median s/step over the steps after warm-up (wall time between the ends of consecutive rollout
steps: ours at each step the online loop reports to its observers, TRL at every steps_per_generation × μ-th
`on_step_end`), generation tokens/s = completion tokens (up to and including EOS) / the time of the generation
calls alone (ours `align.stages.ppo_rollout.sample`, TRL `GRPOTrainer._generate_single_turn`: the decoding loop
or `generate` plus the EOS mask, not tokenizing, decoding text or scoring), peak RSS (VmHWM of the side's process),
and ours/TRL: speed-up = TRL s/step / ours s/step, generation speed-up, RSS ratio = ours / TRL. Target: speed-up
>= 2 at RSS ratio <= 1 (nf4). Also: setup s (from the stage or trainer call, model load included, to step 1),
each side's rewards and losses as logged, and the best fp32 matmul TFLOP/s of the machine (`--skip-ceiling` skips
it). `--dequantized-generation` turns align's `model.dequantized_generation` on for our side (nf4: each 4-bit weight
is dequantized once per generation call, not once per token); the report says whether it was on.

    .venv/bin/python scripts/bench_grpo.py --model tiny --steps 2 --prompts 2 --generations 2 --max-new-tokens 4 \\
        --minibatch 2 --quantization none                                  # seconds per side, a smoke test
    nice .venv/bin/python scripts/bench_grpo.py --model 100m --quantization nf4 --json grpo.json   # minutes
    nice .venv/bin/python scripts/bench_grpo.py --model 100m     # none, then nf4; sized for ~10 min on 2 cores

Nothing is downloaded: the model is built in a temporary folder which both sides load.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import importlib.metadata
import importlib.util
import json
import math
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def _sibling(name: str):
    # scripts/ is not a package: import bench_dpo by path, once per process, for its model presets and helpers
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, Path(__file__).resolve().with_name(f"{name}.py"))
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
    return sys.modules[name]


dpo = _sibling("bench_dpo")

SEED, LR, LORA = dpo.SEED, dpo.LR, dpo.LORA
SIDES = {"ours": "align grpo", "trl": "TRL GRPOTrainer"}
LOSS_TYPES = {"sequence": "grpo", "token": "bnpo", "constant": "dr_grpo"}  # our aggregation -> TRL's loss_type
SCALE_REWARDS = {"group_norm": "group", "group_mean": "none"}  # our advantage -> TRL's scale_rewards
REWARD_CARD = "synthetic_tasks"
TARGET_SPEEDUP = 2.0


# --- a child: one side, one quantization ----------------------------------------------------------------------------


class Record:
    """What a side's run shows while it trains: step boundaries, generation calls, optimizer steps, logged metrics."""

    def __init__(self):
        self.begin, self.step_ends, self.gen_s, self.gen_tokens, self.gen_rows = None, [], [], [], []
        self.gen_max_len, self.prompt_digests, self.losses, self.rewards = [], [], [], []
        self.optimizer_steps, self.settings = 0, {}

    def generation(self, prompts: list[list[int]], lengths: list[int], seconds: float) -> None:
        self.gen_s.append(seconds)
        self.gen_tokens.append(sum(lengths))
        self.gen_rows.append(len(lengths))
        self.gen_max_len.append(max(lengths))
        self.prompt_digests.append(dpo.digest([tuple(p) for p in prompts]))


@contextlib.contextmanager
def wrapped(owner, name: str, around):
    """Replace `owner.name` by `around(original, *args, **kwargs)` until the block ends (a method, when `owner` is a
    class: the stage or trainer looks it up when it calls it)."""
    original = getattr(owner, name)

    @functools.wraps(original)
    def call(*args, **kwargs):
        return around(original, *args, **kwargs)

    setattr(owner, name, call)
    try:
        yield
    finally:
        setattr(owner, name, original)


def stamp(times: list[float] | None = None, first: Record | None = None):
    """An `around` that appends the time each call ends to `times` (or sets `first.begin`)."""
    def around(original, *args, **kwargs):
        out = original(*args, **kwargs)
        if first is not None:
            first.begin = time.perf_counter()
        else:
            times.append(time.perf_counter())
        return out

    return around


def prompt_count(args) -> int:
    return args.prompts * args.steps  # one epoch of the online loop: no step repeats a prompt


def loop_order(args) -> list[int]:
    """The prompt indices our online loop (align.stages.online.run_online) samples for, step after step: a seeded
    permutation per epoch, and the run is one epoch."""
    import torch

    order = torch.randperm(prompt_count(args), generator=torch.Generator().manual_seed(SEED))
    return order.tolist()


def linear_4bit_layers(model) -> int:
    if "bitsandbytes" not in sys.modules:  # nothing quantized; importing it here would add to the side's peak RSS
        return 0
    import bitsandbytes as bnb

    return sum(isinstance(m, bnb.nn.Linear4bit) for m in model.modules())


def run_ours(args, quant: str, work: Path, rec: Record) -> float:
    """Our grpo stage as `align run` runs it: a one-stage recipe through the pipeline; returns the start time."""
    import yaml

    from align import ui
    from align.config import parse_recipe
    from align.pipeline import run_recipe
    from align.stages import grpo, grpo_rollout

    model = {"base": str(work / "model"), "quantization": quant, "precision": "fp32", "lora": LORA}
    if quant == "nf4":  # a 4-bit option: the plain base has nothing to dequantize
        model["dequantized_generation"] = args.dequantized_generation
    stage = {
        "name": "grpo", "kind": "grpo", "data": {"path": "synthetic:prompts", "max_rows": prompt_count(args)},
        "rewards": [{"rule": REWARD_CARD}],
        "grpo": {"prompts_per_step": args.prompts, "num_generations": args.generations,
                 "max_new_tokens": args.max_new_tokens, "temperature": 1.0, "advantage": args.advantage,
                 "aggregation": args.aggregation, "kl_coef": args.kl_coef, "num_iterations": args.num_iterations,
                 "minibatch_size": args.minibatch, "dynamic_sampling": False, "overlong_buffer": 0},
        # the only checkpoint is written after the last step has been timed
        "train": {"max_steps": args.steps, "lr": LR, "lr_scheduler": "linear", "warmup_ratio": 0.0,
                  "weight_decay": 0.0, "save_steps": args.steps},
    }
    recipe = parse_recipe(yaml.safe_dump({"name": "bench_grpo", "seed": SEED, "output_dir": str(work / f"ours_{quant}"),
                                          "model": model, "stages": [stage], "forgetting": {"enabled": False}}))
    cfg = recipe.stages[0].grpo
    rec.settings = {"num_generations": cfg.num_generations, "max_new_tokens": cfg.max_new_tokens,
                    "num_iterations": cfg.num_iterations, "minibatch": cfg.minibatch_size, "kl_coef": cfg.kl_coef,
                    "aggregation": cfg.aggregation, "advantage": cfg.advantage, "clip": [cfg.clip_low, cfg.clip_high],
                    "temperature": cfg.temperature, "lr": recipe.stages[0].train.lr, "quantization": quant,
                    "dequantized_generation": recipe.model.dequantized_generation and quant == "nf4"}

    def generation(original, model, tokenizer, prompt_ids, cfg, repeats=1):
        start = time.perf_counter()
        out = original(model, tokenizer, prompt_ids, cfg, repeats=repeats)
        seconds = time.perf_counter() - start
        rec.generation([p for p in prompt_ids for _ in range(repeats)], out[2].sum(1).long().tolist(), seconds)
        return out

    def update(original, algorithm, *args, **kwargs):
        out = original(algorithm, *args, **kwargs)
        rec.optimizer_steps = algorithm.scheduler.last_epoch  # one scheduler step per optimizer step
        rec.settings["linear_4bit_layers"] = linear_4bit_layers(algorithm.model)
        rec.settings["trainable_dtypes"] = sorted({str(p.dtype) for p in algorithm.params})
        return out

    start = time.perf_counter()
    with contextlib.ExitStack() as patches:
        # the loop's own observer (the stage's progress) marks where it starts and where each step ends
        patches.enter_context(wrapped(ui.StageProgress, "begin", stamp(first=rec)))
        patches.enter_context(wrapped(ui.StageProgress, "stepped", stamp(rec.step_ends)))
        patches.enter_context(wrapped(grpo_rollout, "sample", generation))
        patches.enter_context(wrapped(grpo.GRPO, "update", update))
        summary = run_recipe(recipe, quiet=True)
    if summary["stages"]["grpo"]["status"] != "done":
        raise SystemExit(f"bench_grpo: our grpo stage did not finish: {summary['stages']['grpo']}")
    log = work / f"ours_{quant}" / "bench_grpo" / "grpo" / "metrics.jsonl"
    for record in map(json.loads, log.read_text().splitlines()):
        rec.losses.append(record["loss"])
        rec.rewards.append(record["reward"])
    return start


def run_trl(args, quant: str, work: Path, rec: Record) -> float:
    """TRL's GRPOTrainer as its documentation sets it up, with every setting that differs from ours set explicitly;
    returns the start time."""
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig, PrinterCallback, TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    from align.data.formats import load_examples
    from align.method_configs import GRPOConfig as OurGRPOConfig
    from align.models.adapters import lora_config
    from align.models.load import keep_4bit_layout
    from align.rewards import load_reward
    from align.settings import LoraConfig

    examples = load_examples("synthetic:prompts", "prompt", max_rows=prompt_count(args)).examples
    # Arrow wants one type per column: the rules' answers are strings, lists or JSON objects, so each is a JSON string
    dataset = Dataset.from_list([{"prompt": examples[i].prompt, "rule_json": json.dumps(examples[i].rule)}
                                 for i in loop_order(args)])
    rule = load_reward(REWARD_CARD)

    def synthetic_tasks(prompts, completions, rule_json, **kwargs):  # the align rule checker, on the completion text
        texts = [c[-1]["content"] if isinstance(c, list) else c for c in completions]
        return rule.score(prompts, texts, [json.loads(r) for r in rule_json]).tolist()

    quantization = {}
    if quant == "nf4":  # what align's loader asks bitsandbytes for
        quantization["quantization_config"] = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                                                 bnb_4bit_use_double_quant=True,
                                                                 bnb_4bit_compute_dtype=torch.float32)
    ours = OurGRPOConfig()  # the clip range and gradient norm our stage runs with, as the recipe leaves them
    per_rollout = args.prompts * args.generations // args.minibatch * args.num_iterations  # optimizer steps
    config = GRPOConfig(
        output_dir=str(work / f"trl_{quant}"), bf16=False, gradient_checkpointing=False,
        use_cpu=not torch.cuda.is_available(), max_steps=args.steps * per_rollout, learning_rate=LR,
        lr_scheduler_type="linear", warmup_steps=0, weight_decay=0.0, optim="adamw_torch",
        adam_epsilon=1e-5,  # our grpo stage's AdamW eps (TRL's default is 1e-8)
        max_grad_norm=ours.max_grad_norm, seed=SEED, data_seed=SEED, shuffle_dataset=False,
        per_device_train_batch_size=args.minibatch, gradient_accumulation_steps=1,
        generation_batch_size=args.prompts * args.generations,
        num_generations=args.generations, max_completion_length=args.max_new_tokens, temperature=1.0, top_p=1.0,
        top_k=0, min_p=None, repetition_penalty=1.0, beta=args.kl_coef, num_iterations=args.num_iterations,
        epsilon=ours.clip_low, epsilon_high=ours.clip_high, loss_type=LOSS_TYPES[args.aggregation],
        scale_rewards=SCALE_REWARDS[args.advantage], mask_truncated_completions=False, disable_dropout=True,
        logging_steps=per_rollout, save_strategy="no", report_to=[], disable_tqdm=True, dataloader_num_workers=0,
        log_completions=False)
    tokenizer = AutoTokenizer.from_pretrained(work / "model")

    class Steps(TrainerCallback):
        def on_train_begin(self, args, state, control, **kwargs):
            rec.begin = time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step % per_rollout == 0:  # the rollout's last optimizer step
                rec.step_ends.append(time.perf_counter())
            rec.optimizer_steps = state.global_step

        def on_log(self, args, state, control, logs=None, **kwargs):
            if "loss" in (logs or {}):
                rec.losses.append(logs["loss"])
                rec.rewards.append(logs["reward"])

    def generation(original, trainer, prompt_ids, *args, **kwargs):
        start = time.perf_counter()
        completion_ids, logprobs = original(trainer, prompt_ids, *args, **kwargs)
        rec.generation(prompt_ids, [len(c) for c in completion_ids], time.perf_counter() - start)
        return completion_ids, logprobs

    start = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(work / "model", dtype=torch.float32, **quantization)
    if quant == "nf4":
        keep_4bit_layout(model)  # as our loader does: the same 4-bit numbers (and backward) on AVX512-BF16 CPUs
    trainer = GRPOTrainer(model=model, reward_funcs=synthetic_tasks, args=config, train_dataset=dataset,
                          processing_class=tokenizer, peft_config=lora_config(LoraConfig(**LORA)), callbacks=[Steps()])
    for param in trainer.model.parameters():
        if param.requires_grad:  # TRL casts QLoRA's trainable weights to bf16; ours train in fp32
            param.data = param.data.float()
    trainer.remove_callback(PrinterCallback)  # it prints every log line to stdout, where the result goes
    rec.settings = {"num_generations": trainer.num_generations, "max_new_tokens": trainer.max_completion_length,
                    "num_iterations": trainer.num_iterations, "minibatch": config.per_device_train_batch_size,
                    "kl_coef": trainer.beta, "loss_type": trainer.loss_type, "scale_rewards": config.scale_rewards,
                    "clip": [trainer.epsilon_low, trainer.epsilon_high], "temperature": trainer.temperature,
                    "lr": config.learning_rate, "quantization": quant,
                    "steps_per_generation": config.steps_per_generation,
                    "generation_batch_size": config.generation_batch_size,
                    "trainable_dtypes": sorted({str(p.dtype) for p in trainer.model.parameters() if p.requires_grad}),
                    "linear_4bit_layers": linear_4bit_layers(trainer.model)}
    with wrapped(GRPOTrainer, "_generate_single_turn", generation):
        trainer.train()
    return start


def child(args) -> dict:
    side, quant = args.side.split(":")
    rec = Record()
    start = (run_ours if side == "ours" else run_trl)(args, quant, Path(args.work), rec)
    ends = [rec.begin, *rec.step_ends]
    return {"side": side, "label": SIDES[side], "quantization": quant, "peak_rss_bytes": dpo.peak_rss(),
            "setup_s": rec.begin - start, "step_s": [b - a for a, b in zip(ends, ends[1:])], "gen_s": rec.gen_s,
            "gen_tokens": rec.gen_tokens, "completions": rec.gen_rows, "max_completion_tokens": rec.gen_max_len,
            "prompt_digests": rec.prompt_digests, "optimizer_steps": rec.optimizer_steps, "losses": rec.losses,
            "rewards": rec.rewards, "settings": rec.settings}


# --- the parent: build the model, measure every side, compare, report -----------------------------------------------


WORKLOAD = ("steps", "prompts", "generations", "max_new_tokens", "num_iterations", "minibatch", "kl_coef",
            "aggregation", "advantage")


def measure(args, side: str, quant: str, work: Path) -> dict:
    # The environment (HF_HUB_OFFLINE, CUDA_VISIBLE_DEVICES, ...) and this process's niceness pass on to the child.
    cmd = [sys.executable, str(Path(__file__).resolve()), "--side", f"{side}:{quant}", "--work", str(work)]
    for key in WORKLOAD:
        cmd += [f"--{key.replace('_', '-')}", str(getattr(args, key))]
    if args.dequantized_generation:
        cmd.append("--dequantized-generation")
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"bench_grpo: {side} ({quant}) failed (exit {proc.returncode}):\n{proc.stderr[-6000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def summarize(args, r: dict) -> dict:
    timed = slice(args.warmup, None)
    s_per_step = statistics.median(r["step_s"][timed])
    gen_s, gen_tokens = sum(r["gen_s"][timed]), sum(r["gen_tokens"][timed])
    tokens_per_step = statistics.mean(r["gen_tokens"][timed])
    return {**r, "s_per_step": s_per_step, "timed_steps": len(r["step_s"][timed]),
            "gen_s_per_step": statistics.median(r["gen_s"][timed]), "gen_tokens_per_step": tokens_per_step,
            "gen_tokens_per_s": gen_tokens / gen_s, "step_tokens_per_s": tokens_per_step / s_per_step,
            "gen_fraction": gen_s / sum(r["step_s"][timed])}


def compare(args, ours: dict, trl: dict) -> tuple[dict, list[str]]:
    """Ours against TRL, and what disagrees between them that must not."""
    quant, problems = ours["quantization"], []
    for r in (ours, trl):
        if len(r["step_s"]) != args.steps or len(r["gen_s"]) != args.steps:
            problems.append(f"{quant}: {r['side']} ran {len(r['step_s'])} steps and {len(r['gen_s'])} generation "
                            f"calls, not {args.steps}")
    if ours["prompt_digests"] != trl["prompt_digests"]:
        problems.append(f"{quant}: the sides sampled for different prompt ids")
    for key, a, b in (("optimizer steps", ours["optimizer_steps"], trl["optimizer_steps"]),
                      ("completions per step", ours["completions"], trl["completions"]),
                      ("G", ours["settings"]["num_generations"], trl["settings"]["num_generations"]),
                      ("max completion tokens", ours["settings"]["max_new_tokens"], trl["settings"]["max_new_tokens"]),
                      ("num_iterations", ours["settings"]["num_iterations"], trl["settings"]["num_iterations"]),
                      ("minibatch", ours["settings"]["minibatch"], trl["settings"]["minibatch"]),
                      ("kl_coef / beta", ours["settings"]["kl_coef"], trl["settings"]["kl_coef"]),
                      ("clip", ours["settings"]["clip"], trl["settings"]["clip"]),
                      ("4-bit linear layers", ours["settings"]["linear_4bit_layers"],
                       trl["settings"]["linear_4bit_layers"]),
                      ("trainable dtypes", ours["settings"]["trainable_dtypes"], trl["settings"]["trainable_dtypes"])):
        if a != b:
            problems.append(f"{quant}: {key} is {a} for ours, {b} for TRL")
    if (ours["settings"]["linear_4bit_layers"] > 0) != (quant == "nf4"):
        problems.append(f"{quant}: our base has {ours['settings']['linear_4bit_layers']} 4-bit linear layers")
    speedup, rss = trl["s_per_step"] / ours["s_per_step"], ours["peak_rss_bytes"] / trl["peak_rss_bytes"]
    return {"speedup": speedup, "generation_speedup": ours["gen_tokens_per_s"] / trl["gen_tokens_per_s"],
            "peak_rss_ratio": rss, "target_met": speedup >= TARGET_SPEEDUP and rss <= 1.0,
            "same_prompts": ours["prompt_digests"] == trl["prompt_digests"]}, problems


def report(args, model: dict, ceiling: dict | None, results: dict) -> dict:
    from rich.console import Console
    from rich.table import Column, Table

    comparisons, problems = {}, []
    for quant, sides in results.items():
        comparisons[quant], found = compare(args, sides["ours"], sides["trl"])
        problems += found
    console = Console()
    if not console.is_terminal:
        console.width = 160  # piped into a file or a test: room for the whole table
    right = dict(justify="right")
    dequantized = "on" if args.dequantized_generation else "off"
    table = Table("base", "side", Column("s/step", **right), Column("gen s/step", **right),
                  Column("gen tok/s", **right), Column("step tok/s", **right), Column("tokens/step", **right),
                  Column("peak RSS", **right), Column("setup s", **right), Column("reward first → last", **right),
                  title=f"GRPO, {model['preset']} model: {args.prompts} prompts × G={args.generations}, ≤"
                        f"{args.max_new_tokens} tokens, μ={args.num_iterations}, minibatch {args.minibatch}; median "
                        f"over {args.steps - args.warmup} steps after {args.warmup} warm-up")
    ratios = Table("base", Column("speed-up (TRL s/step ÷ ours)", **right), Column("generation speed-up", **right),
                   Column("RSS ours ÷ TRL", **right), Column(f"target ≥{TARGET_SPEEDUP:g}× at ≤1× RSS", **right),
                   title="ours against TRL")
    for quant, sides in results.items():
        name = "nf4 (QLoRA)" if quant == "nf4" else "fp32"
        for r in sides.values():
            table.add_row(name, r["label"], f"{r['s_per_step']:.2f}", f"{r['gen_s_per_step']:.2f}",
                          f"{r['gen_tokens_per_s']:,.0f}", f"{r['step_tokens_per_s']:,.0f}",
                          f"{r['gen_tokens_per_step']:,.0f}", dpo.size(r["peak_rss_bytes"]), f"{r['setup_s']:.1f}",
                          f"{r['rewards'][0]:.3f} → {r['rewards'][-1]:.3f}")
        c = comparisons[quant]
        met = "[green]met[/]" if c["target_met"] else "[red]not met[/]"
        ratios.add_row(name, f"{c['speedup']:.2f}x", f"{c['generation_speedup']:.2f}x", f"{c['peak_rss_ratio']:.2f}",
                       met + (" (the target's base)" if quant == "nf4" else ""))
    console.print(table)
    console.print(ratios)
    console.print(f"gen tok/s: completion tokens per second of generation calls alone (ours ppo_rollout.sample, TRL "
                  f"_generate_single_turn); step tok/s: per second of step time. model.dequantized_generation (ours, "
                  f"nf4 only): {dequantized}")
    console.print(f"model: random Llama ({model['preset']}), {model['params'] / 1e6:.1f}M parameters; LoRA "
                  f"{model['lora_params'] / 1e6:.2f}M; same prompts on both sides, step by step: "
                  + ", ".join(f"{q} {'yes' if c['same_prompts'] else 'NO'}" for q, c in comparisons.items()))
    if ceiling:
        console.print(f"matmul ceiling: {ceiling['tflops']:.3f} TFLOP/s fp32 on {ceiling['threads']} threads")
    for problem in problems:
        console.print(f"[red]{problem}[/]")
    settings = {**{k: getattr(args, k) for k in WORKLOAD}, "model": args.model, "warmup": args.warmup,
                "quantizations": list(results), "dequantized_generation": args.dequantized_generation, "lr": LR,
                "lora": LORA, "seed": SEED, "reward": REWARD_CARD, "trl_loss_type": LOSS_TYPES[args.aggregation],
                "trl_version": importlib.metadata.version("trl"), "machine": platform.machine(),
                "gen_tokens_per_s_basis": "completion tokens / seconds in the generation calls alone",
                "target": f"speedup >= {TARGET_SPEEDUP:g} at peak_rss_ratio <= 1 (nf4)"}
    return {"settings": settings, "model": model, "ceiling": ceiling, "results": results, "comparisons": comparisons,
            "problems": problems}


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", choices=sorted(dpo.SHAPES), default="100m")
    parser.add_argument("--quantization", choices=["none", "nf4", "both"], default="both",
                        help="none: LoRA on a frozen fp32 base; nf4: QLoRA (both sides); both: one, then the other")
    parser.add_argument("--steps", type=int, default=4, help="rollout steps per side, warm-up included")
    parser.add_argument("--warmup", type=int, default=1, help="untimed first steps")
    parser.add_argument("--prompts", type=int, default=4, help="prompts per step")
    parser.add_argument("--generations", type=int, default=8, help="G: completions per prompt")
    parser.add_argument("--max-new-tokens", type=int, default=64, help="max completion tokens")
    parser.add_argument("--num-iterations", type=int, default=1, help="μ: update passes per rollout")
    parser.add_argument("--minibatch", type=int, help="completions per optimizer step (default: prompts × G)")
    parser.add_argument("--kl-coef", type=float, default=0.0, help="our kl_coef = TRL's beta")
    parser.add_argument("--aggregation", choices=sorted(LOSS_TYPES), default="sequence",
                        help="ours; TRL's loss_type follows (sequence: grpo, token: bnpo, constant: dr_grpo)")
    parser.add_argument("--advantage", choices=sorted(SCALE_REWARDS), default="group_norm",
                        help="ours; TRL's scale_rewards follows (group_norm: group, group_mean: none)")
    parser.add_argument("--dequantized-generation", action="store_true",
                        help="our side's model.dequantized_generation (nf4): dequantize once per generation call")
    parser.add_argument("--skip-ceiling", action="store_true", help="do not measure the fp32 matmul ceiling")
    parser.add_argument("--json", help="write every number to this file")
    parser.add_argument("--side", help=argparse.SUPPRESS)
    parser.add_argument("--work", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.warmup < 1 or args.steps - args.warmup < 1:
        parser.error("--steps must leave at least one warm-up and one timed step")
    if args.generations < 2:
        parser.error("--generations must be >= 2: advantages compare a prompt's completions")
    args.minibatch = args.minibatch or args.prompts * args.generations
    if (args.prompts * args.generations) % args.minibatch:
        parser.error(f"--minibatch must divide prompts × generations ({args.prompts * args.generations})")
    return args


def main(argv=None) -> dict:
    args = parse_args(argv)
    if args.side:
        print(json.dumps(child(args)))
        return {}
    quants = ["none", "nf4"] if args.quantization == "both" else [args.quantization]
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        ceiling = None if args.skip_ceiling else dpo.matmul_ceiling()  # before anything else runs in this process
        model = dpo.build_model(args.model, work)
        results = {}
        for quant in quants:  # one side at a time: each has the machine to itself
            results[quant] = {side: summarize(args, measure(args, side, quant, work)) for side in SIDES}
    out = report(args, model, ceiling, results)
    for r in (r for sides in results.values() for r in sides.values()):
        bad = [k for k in ("s_per_step", "gen_tokens_per_s", "peak_rss_bytes") if not math.isfinite(r[k]) or r[k] <= 0]
        out["problems"] += [f"{r['quantization']}: {r['side']} measured no {k}" for k in bad]
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=2))
    if out["problems"]:
        raise SystemExit("bench_grpo: the sides did not run the same workload:\n" + "\n".join(out["problems"]))
    return out


if __name__ == "__main__":
    main()
