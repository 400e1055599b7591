"""Speed of align's dpo, sft and rank stages against their peers, on the same model, ids, precision and settings.

Three comparisons, each side in its own fresh subprocess (so its peak RSS is its own):

- `dpo`: our dpo stage against TRL 1.16's DPOTrainer, twice: with TRL's default (`precompute_ref_log_probs=False`:
  a reference forward in every step) and with `precompute_ref_log_probs=True`. Ours, as a user's run does, starts
  the policy from an init (SFT) adapter, uses that adapter as the reference and precomputes its log-probs before
  step 1: that precompute is timed and reported apart from the steps, as is TRL's when it precomputes.
- `sft`: our sft stage against TRL's SFTTrainer (completion-only loss), on each pair's prompt + chosen answer.
- `rank`: our rank stage at K = 4 (Plackett–Luce) against our dpo stage fed the K/2 disjoint pairs of every group
  (best vs 2nd, 3rd vs 4th): the same responses, the same tokens per step.

Workload (issue 8): 8 pairs per step, prompts of 64 tokens, chosen and rejected answers of 64 tokens each, so
8·2·(64+64) = 2,048 tokens per step as TRL counts them (rank: 4 groups of 4 answers = the same 2,048). The data
are random token ids, pre-tokenised, and both sides train on exactly the same ids: every side records the
sequences of each batch it trains on, and the run fails unless they agree (step by step for dpo and sft; for
rank, whose two sides batch groups and pairs, over the run and in tokens per step). TRL 1.16's DPOTrainer only
takes text, so its dataset preparation is skipped and it gets the `prompt_ids`/`chosen_ids`/`rejected_ids`
columns its collator reads; SFTTrainer takes `input_ids` + `completion_mask` as they are.

Settings, identical on both sides and set explicitly (TRL's configs default to bf16 and gradient checkpointing):
fp32 (bf16 is ~100x slower on a CPU without AMX/AVX512-bf16), no gradient checkpointing, LoRA r=16, alpha=32,
dropout 0 on every linear layer of the decoder, AdamW (the Trainer's default), lr 1e-4 linear decay, no warm-up,
beta 0.1, sigmoid loss, the same seed and data seed (so the same sample order), logging every step. The run
fails unless both sides' Trainers report the same optimiser settings and trainable parameter count. The
`policy` adapter of our sft stage is new, seeded as the pipeline seeds every stage; TRL's SFTTrainer seeds the
same way, so both LoRA inits agree. dpo and rank start from one init adapter on disk, with B != 0, so that a
reference mix-up (the bare base instead of the init adapter) would show in the losses. With `--quantization
nf4` (QLoRA on both sides) TRL casts the trainable LoRA weights to bf16; they are cast back to fp32, as ours are.

Reported per side: median s/step over the steps after warm-up (wall time between optimizer steps, data loading
included), tokens/s (2,048 tokens per step for every side), peak RSS (VmHWM), the per-step training losses and
their largest difference against the peer, and model FLOPs per step against a matmul ceiling (the best fp32
matmul TFLOP/s measured in this run). Model FLOPs of a LoRA step, with N the decoder's frozen linear weights,
N_A the LoRA weights, T the tokens the side's forward runs (ours encodes a group's prompt once: 192 tokens per
pair, TRL 256), R rows of S tokens, C the scored answer tokens, H hidden, V vocab, L layers:

    forward    2·(N + N_A)·T + 2·H·V·C + 4·L·H·R·S²   linears, the LM head where a log-prob is used, dense attention
    backward   2·N·T + 4·N_A·T + 2·H·V·C + 8·L·H·R·S² input grads through frozen weights; LoRA input + weight grads
    reference  + one forward, where a side runs the reference in the step (TRL's default)

Positions whose log-prob no loss uses are not counted (TRL scores every position on a CPU: no Triton there).

    .venv/bin/python scripts/bench_dpo.py --model tiny --steps 3        # seconds per side, a smoke test
    nice .venv/bin/python scripts/bench_dpo.py --model 100m --json bench.json    # ~110M Llama, several minutes

The model is a Llama-shaped config initialised at random here and saved with align's tiny tokenizer to a
temporary folder, which both sides load; nothing is downloaded.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

SEED, LR, BETA = 0, 1.0e-4, 0.1
LORA = {"r": 16, "alpha": 32, "dropout": 0.0, "target_modules": "all-linear"}
PROMPT, ANSWER, PAIRS_PER_STEP, K = 64, 64, 8, 4
SHAPES = {  # vocab None: the tokenizer's
    "tiny": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, vocab_size=None),
    "100m": dict(hidden_size=768, intermediate_size=2048, num_hidden_layers=12, num_attention_heads=12,
                 num_key_value_heads=12, vocab_size=32000),
}
# comparison -> side -> (name in the tables, whether it runs the reference forward in every training step)
SIDES = {
    "dpo": {"ours": ("align", False), "trl": ("TRL", True), "trl_pre": ("TRL, precomputed ref", False)},
    "sft": {"ours": ("align", False), "trl": ("TRL", False)},
    "rank": {"ours": (f"align K={K}", False), "pairs": ("align dpo, K/2 pairs", False)},
}
# Trainer settings that must agree between the two sides of a comparison (rank batches 4 groups, its peer 8 pairs)
SETTINGS = ("optim", "learning_rate", "lr_scheduler_type", "warmup_steps", "weight_decay", "max_grad_norm",
            "adam_beta1", "adam_beta2", "adam_epsilon", "gradient_accumulation_steps", "seed", "data_seed", "bf16",
            "fp16", "gradient_checkpointing", "per_device_train_batch_size")


# --- the parent: model, data, ceiling ---------------------------------------------------------------------------


def build_model(preset: str, work: Path) -> dict:
    """Save a random Llama of `preset`'s shape with align's tiny tokenizer, and an init adapter for dpo and rank."""
    import torch
    from peft import get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    from align.models.adapters import lora_config
    from align.models.tiny import tiny_tokenizer
    from align.settings import LoraConfig

    tokenizer = tiny_tokenizer()
    shape = dict(SHAPES[preset])
    shape["vocab_size"] = shape["vocab_size"] or len(tokenizer)  # the data are random ids: any vocabulary serves
    config = LlamaConfig(**shape, max_position_embeddings=1024, tie_word_embeddings=True,
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id)
    torch.manual_seed(SEED)
    model = LlamaForCausalLM(config)
    model.save_pretrained(work / "model")
    tokenizer.save_pretrained(work / "model")
    params = sum(p.numel() for p in model.parameters())
    embedding = model.get_input_embeddings().weight.numel()
    peft_model = get_peft_model(model, lora_config(LoraConfig(**LORA)))
    lora_params = sum(p.numel() for n, p in peft_model.named_parameters() if "lora_" in n)
    for name, p in peft_model.named_parameters():
        if "lora_B" in name:  # a trained SFT adapter has B != 0; B = 0 would make the reference equal the bare base
            torch.nn.init.normal_(p, std=0.02)
    peft_model.save_pretrained(work / "init_adapter")
    return {"preset": preset, "params": params, "non_embedding_params": params - embedding, "lora_params": lora_params,
            **{k: getattr(config, k) for k in ("hidden_size", "intermediate_size", "num_hidden_layers",
                                               "num_attention_heads", "num_key_value_heads", "vocab_size")}}


def make_data(steps: int, vocab: int) -> dict:
    """Random answers: `steps` batches of 8 pairs, and of 4 groups of K answers (best first)."""
    import torch

    from align.models.tiny import SPECIAL_TOKENS

    gen = torch.Generator().manual_seed(SEED)

    def ids(n: int) -> list[int]:  # above the special tokens, so no id is ever the pad token
        return torch.randint(len(SPECIAL_TOKENS), vocab, (n,), generator=gen).tolist()

    pairs = [{"prompt": ids(PROMPT), "chosen": ids(ANSWER), "rejected": ids(ANSWER)}
             for _ in range(steps * PAIRS_PER_STEP)]
    groups = [{"prompt": ids(PROMPT), "responses": [ids(ANSWER) for _ in range(K)]}
              for _ in range(steps * PAIRS_PER_STEP * 2 // K)]
    return {"pairs": pairs, "groups": groups}


def matmul_ceiling() -> dict:
    """The best fp32 matmul TFLOP/s of this machine, square and at the 100m model's MLP shape, best of 5 each."""
    import torch

    best = {}
    for m, k, n in ((2048, 2048, 2048), (2048, 768, 2048)):
        a, b = torch.randn(m, k), torch.randn(k, n)
        a @ b  # first call: allocation and thread pool start-up
        seconds = min(_timed(lambda a=a, b=b: a @ b) for _ in range(5))
        best[f"{m}x{k}x{n}"] = 2 * m * k * n / seconds / 1e12
    return {"tflops": max(best.values()), "by_shape": best, "threads": torch.get_num_threads()}


def _timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


# --- a child: one side of one comparison --------------------------------------------------------------------------


def side_rows(kind: str, side: str, data: dict) -> list[dict]:
    """The training rows in the side's own format."""
    pairs, groups = data["pairs"], data["groups"]
    if kind == "sft" and side == "ours":
        return [{"prompt_ids": p["prompt"], "completion_ids": p["chosen"]} for p in pairs]
    if kind == "sft":
        return [{"input_ids": p["prompt"] + p["chosen"],
                 "completion_mask": [0] * len(p["prompt"]) + [1] * len(p["chosen"])} for p in pairs]
    if kind == "dpo" and side == "ours":
        return [{"prompt_ids": p["prompt"], "responses": [p["chosen"], p["rejected"]], "scores": [1.0, 0.0]}
                for p in pairs]
    if kind == "dpo":
        return [{"prompt_ids": p["prompt"], "chosen_ids": p["chosen"], "rejected_ids": p["rejected"]} for p in pairs]
    if side == "ours":
        return [{"prompt_ids": g["prompt"], "responses": g["responses"], "scores": [float(K - 1 - k) for k in range(K)]}
                for g in groups]
    return [{"prompt_ids": g["prompt"], "responses": g["responses"][k : k + 2], "scores": [1.0, 0.0]}
            for g in groups for k in range(0, K, 2)]


def sequences(row: dict) -> list[tuple[tuple[int, ...], int]]:
    """(prompt + answer ids, scored tokens) of every sequence a training row holds, whatever the side's format."""
    if "responses" in row:
        return [(tuple(row["prompt_ids"] + r), len(r)) for r in row["responses"]]
    if "chosen_ids" in row:
        return [(tuple(row["prompt_ids"] + row[k]), len(row[k])) for k in ("chosen_ids", "rejected_ids")]
    if "completion_ids" in row:
        return [(tuple(row["prompt_ids"] + row["completion_ids"]), len(row["completion_ids"]))]
    return [(tuple(row["input_ids"]), sum(label != -100 for label in row["labels"]))]  # TRL's prepared SFT rows


def digest(seqs) -> str:
    # sorted: the sides lay a batch out differently (all chosen then all rejected, or pair by pair)
    return hashlib.sha256(repr(sorted(seqs)).encode()).hexdigest()[:16]


def peak_rss() -> int:
    # Not ru_maxrss: Linux carries the parent's high-water mark over fork+exec into it, VmHWM starts afresh.
    status = Path("/proc/self/status").read_text()
    return int(next(line for line in status.splitlines() if line.startswith("VmHWM:")).split()[1]) * 1024


def recorder_callback():
    """A TrainerCallback with each optimizer step's end time, loss and training sequences, and the settings."""
    from transformers import TrainerCallback

    class Recorder(TrainerCallback):
        def __init__(self):
            self.begin, self.step_ends, self.losses, self.batches, self.settings = None, [], [], [], {}

        def on_train_begin(self, args, state, control, model=None, train_dataloader=None, **kwargs):
            self.begin = time.perf_counter()
            self.settings = {k: getattr(getattr(args, k), "value", getattr(args, k)) for k in SETTINGS}
            self.settings["trainable_params"] = sum(p.numel() for p in model.parameters() if p.requires_grad)
            self.settings["trainable_dtypes"] = sorted({str(p.dtype) for p in model.parameters() if p.requires_grad})
            # Accelerate wraps the DataLoader; its iterator reads `collate_fn` when each epoch starts, after this.
            loader = train_dataloader.base_dataloader
            collate = loader.collate_fn

            def recording(rows):
                batch = collate(rows)
                self.batches.append({"sequences": [s for r in rows for s in sequences(r)],
                                     "shape": list(batch["input_ids"].shape)})
                return batch

            loader.collate_fn = recording

        def on_step_end(self, args, state, control, **kwargs):
            self.step_ends.append(time.perf_counter())

        def on_log(self, args, state, control, logs=None, **kwargs):
            if "loss" in (logs or {}):
                self.losses.append(logs["loss"])

    return Recorder()


@contextlib.contextmanager
def timing(owner, name: str, seconds: list[float]):
    """Time every call of `owner.name` (a function the stage or trainer looks up when it calls it)."""
    original = getattr(owner, name)

    def timed(*args, **kwargs):
        start = time.perf_counter()
        try:
            return original(*args, **kwargs)
        finally:
            seconds.append(time.perf_counter() - start)

    setattr(owner, name, timed)
    try:
        yield
    finally:
        setattr(owner, name, original)


def run_ours(kind: str, side: str, rows: list[dict], args, work: Path, precompute: list[float]) -> float:
    """Our stage as the pipeline runs it, from the rows a stage encodes onwards; returns the start time."""
    import transformers
    import yaml

    from align.config import parse_recipe
    from align.models.host import ModelHost
    from align.models.load import compute_dtype
    from align.stages import groups, sft
    from align.stages.engine import StageContext, fit

    stage_kind = "dpo" if kind == "dpo" or side == "pairs" else kind
    stage = {"name": stage_kind, "kind": stage_kind, "data": {"path": str(work / "data.json")},
             "train": {"max_steps": args.steps, "lr": LR, "batch_size": PAIRS_PER_STEP * 2 // K if stage_kind == "rank"
                       else PAIRS_PER_STEP, "max_length": 4096, "max_prompt_length": 2048, "lr_scheduler": "linear",
                       "warmup_ratio": 0.0, "weight_decay": 0.0, "logging_steps": 1, "gradient_checkpointing": False,
                       "save_steps": args.steps}}  # the only checkpoint is written after the last timed step
    if stage_kind != "sft":
        loss = "sigmoid" if stage_kind == "dpo" else "plackett_luce"
        stage.update(init=str(work / "init_adapter"), loss={"type": loss, "beta": BETA})
    recipe = parse_recipe(yaml.safe_dump({
        "name": "bench", "seed": SEED, "output_dir": str(work / "runs"), "stages": [stage],
        "model": {"base": str(work / "model"), "quantization": args.quantization, "precision": "fp32", "lora": LORA},
    }))
    cfg = recipe.stages[0]
    host = ModelHost(recipe.model)
    stage_dir = work / "runs" / f"{kind}_{side}"
    stage_dir.mkdir(parents=True)  # fresh: a cached reference would skip the precompute
    ctx = StageContext(host, stage_dir, recipe.seed, compute_dtype(recipe.model.precision), quiet=True)
    transformers.set_seed(cfg.train.seed)  # as the pipeline does before each stage: a new adapter's init draws on it
    start = time.perf_counter()
    with timing(groups, "reference_logps", precompute):
        if stage_kind == "sft":  # sft.run from its encoded rows on
            with host.policy(init=cfg.init) as model:
                fit(sft.SFTTrainer, model, cfg, ctx, rows, None, sft.collate(host.tokenizer.pad_token_id))
        else:  # dpo.run and rank.run from their encoded rows on
            groups.run_groups(cfg, ctx, rows, None, cfg.loss.build())
    return start


def run_trl(kind: str, side: str, rows: list[dict], args, work: Path, precompute: list[float]) -> float:
    """TRL's trainer as its documentation sets it up, with every setting that differs from ours set explicitly."""
    import torch
    from datasets import Dataset
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig, PrinterCallback
    from trl import DPOConfig, DPOTrainer, SFTConfig, SFTTrainer

    from align.models.adapters import lora_config
    from align.settings import LoraConfig

    class PretokenizedDPOTrainer(DPOTrainer):
        def _prepare_dataset(self, dataset, *args, **kwargs):
            return dataset  # TRL 1.16 always tokenizes text; these rows hold the ids its collator reads

    quantization = {}
    if args.quantization == "nf4":  # what align's loader asks bitsandbytes for
        quantization["quantization_config"] = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                                                 bnb_4bit_use_double_quant=True,
                                                                 bnb_4bit_compute_dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(work / "model")
    model = AutoModelForCausalLM.from_pretrained(work / "model", dtype=torch.float32, **quantization)
    common = dict(output_dir=str(work / "runs" / f"{kind}_{side}"), per_device_train_batch_size=PAIRS_PER_STEP,
                  max_steps=args.steps, learning_rate=LR, lr_scheduler_type="linear", warmup_steps=0, weight_decay=0.0,
                  logging_steps=1, save_strategy="no", seed=SEED, data_seed=SEED, bf16=False,
                  gradient_checkpointing=False, use_cpu=not torch.cuda.is_available(), report_to=[], disable_tqdm=True,
                  dataloader_num_workers=0, max_length=None)
    start = time.perf_counter()
    with timing(DPOTrainer, "_precompute_ref_logps", precompute):
        if kind == "dpo":
            # TRL copies the loaded adapter as a frozen "ref" adapter: the reference is the init adapter, as ours
            model = PeftModel.from_pretrained(model, str(work / "init_adapter"), is_trainable=True)
            config = DPOConfig(**common, beta=BETA, loss_type=["sigmoid"], precompute_ref_log_probs=side == "trl_pre")
            trainer = PretokenizedDPOTrainer(model=model, args=config, train_dataset=Dataset.from_list(rows),
                                             processing_class=tokenizer)
        else:
            config = SFTConfig(**common, completion_only_loss=True, packing=False, pad_to_multiple_of=None)
            trainer = SFTTrainer(model=model, args=config, train_dataset=Dataset.from_list(rows),
                                 processing_class=tokenizer, peft_config=lora_config(LoraConfig(**LORA)))
        for param in trainer.model.parameters():
            if param.requires_grad:  # TRL casts QLoRA's trainable weights to bf16; ours train in fp32
                param.data = param.data.float()
        trainer.remove_callback(PrinterCallback)  # it prints every log line to stdout, where the result goes
        trainer.train()
    return start


def child(args) -> dict:
    import transformers.trainer

    kind, side = args.side.split(":")
    work = Path(args.work)
    rows = side_rows(kind, side, json.loads((work / "data.json").read_text()))
    recorder = recorder_callback()
    transformers.trainer.DEFAULT_CALLBACKS.append(recorder)  # every Trainer of this process, ours built inside `fit`
    precompute: list[float] = []
    runner = run_ours if side in ("ours", "pairs") else run_trl
    start = runner(kind, side, rows, args, work, precompute)
    ends = [recorder.begin, *recorder.step_ends]
    batches = recorder.batches[: args.steps]  # the loader collates one batch ahead
    return {
        "kind": kind, "side": side, "label": SIDES[kind][side][0], "peak_rss_bytes": peak_rss(),
        "setup_s": recorder.begin - start, "ref_precompute_s": sum(precompute) if precompute else None,
        "step_s": [b - a for a, b in zip(ends, ends[1:])], "losses": recorder.losses, "settings": recorder.settings,
        "step_tokens": [sum(len(ids) for ids, _ in b["sequences"]) for b in batches],
        "step_scored": [sum(n for _, n in b["sequences"]) for b in batches],
        "step_digests": [digest(b["sequences"]) for b in batches],
        "run_digest": digest([s for b in batches for s in b["sequences"]]),
        "batch_shapes": [b["shape"] for b in batches],
    }


# --- the parent: measure every side, compare, report ---------------------------------------------------------------


def measure(args, kind: str, side: str, work: Path) -> dict:
    # The environment (HF_HUB_OFFLINE, CUDA_VISIBLE_DEVICES, ...) passes on to the child unchanged.
    cmd = [sys.executable, str(Path(__file__).resolve()), "--side", f"{kind}:{side}", "--work", str(work),
           "--steps", str(args.steps), "--quantization", args.quantization]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"bench_dpo: {kind}:{side} failed (exit {proc.returncode}):\n{proc.stderr[-6000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def step_flops(model: dict, shape: list[int], scored: int, reference: bool) -> float:
    """Model FLOPs of one LoRA training step on a [rows, S] batch (the formula of this file's docstring)."""
    h, layers, inter = model["hidden_size"], model["num_hidden_layers"], model["intermediate_size"]
    kv = h * model["num_key_value_heads"] // model["num_attention_heads"]
    frozen, lora = layers * (2 * h * h + 2 * h * kv + 3 * h * inter), model["lora_params"]  # q, o; k, v; gate, up, down
    rows, s = shape
    tokens, head, attention = rows * s, 2 * h * model["vocab_size"] * scored, 4 * layers * h * rows * s * s
    forward = 2 * (frozen + lora) * tokens + head + attention
    backward = 2 * frozen * tokens + 4 * lora * tokens + head + 2 * attention
    return forward + backward + (forward if reference else 0)


def summarize(args, model: dict, ceiling: dict, r: dict) -> dict:
    timed = r["step_s"][args.warmup :]
    s_per_step = statistics.median(timed)
    reference = SIDES[r["kind"]][r["side"]][1]
    flops = statistics.mean(step_flops(model, shape, scored, reference)
                            for shape, scored in zip(r["batch_shapes"][args.warmup :], r["step_scored"][args.warmup :]))
    rows, width = r["batch_shapes"][0]
    return {**r, "s_per_step": s_per_step, "timed_steps": len(timed), "tokens_per_step": r["step_tokens"][0],
            "tokens_per_s": r["step_tokens"][0] / s_per_step, "forward_tokens_per_step": rows * width,
            # the data are one epoch, so this is a one-epoch run's cost per step, its reference precompute included
            "epoch_s_per_step": s_per_step + (r["ref_precompute_s"] or 0.0) / args.steps,
            "model_tflop_per_step": flops / 1e12, "model_tflops": flops / s_per_step / 1e12,
            "ceiling_fraction": flops / s_per_step / 1e12 / ceiling["tflops"]}


def compare(kind: str, ours: dict, peer: dict) -> tuple[dict, list[str]]:
    """Ratios of ours against the peer, and what disagrees between them that must not."""
    problems = []
    if kind == "rank":  # groups and pairs batch differently: the same sequences over the run, same tokens per step
        same = ours["run_digest"] == peer["run_digest"] and ours["step_tokens"] == peer["step_tokens"]
    else:
        same = ours["step_digests"] == peer["step_digests"]
    if not same:
        problems.append(f"{kind}: {ours['side']} and {peer['side']} trained on different token ids")
    for key in SETTINGS + ("trainable_params", "trainable_dtypes"):
        batch_differs = kind == "rank" and key == "per_device_train_batch_size"  # 4 groups of 4 against 8 pairs
        if ours["settings"][key] != peer["settings"][key] and not batch_differs:
            problems.append(f"{kind}: {key} is {ours['settings'][key]} for {ours['side']}, "
                            f"{peer['settings'][key]} for {peer['side']}")
    losses = zip(ours["losses"], peer["losses"], strict=True)
    loss_diff = None if kind == "rank" else max(abs(a - b) for a, b in losses)
    return {"peer": peer["side"], "same_token_ids": same, "speedup": peer["s_per_step"] / ours["s_per_step"],
            "epoch_speedup": peer["epoch_s_per_step"] / ours["epoch_s_per_step"],
            "tokens_per_s_ratio": ours["tokens_per_s"] / peer["tokens_per_s"],
            "peak_rss_ratio": ours["peak_rss_bytes"] / peer["peak_rss_bytes"], "max_abs_loss_diff": loss_diff}, problems


def size(n: float) -> str:
    return f"{n / 2**30:.2f} GiB" if n >= 2**30 else f"{n / 2**20:.0f} MiB"


def report(args, model: dict, ceiling: dict, results: dict) -> dict:
    from rich.console import Console
    from rich.table import Column, Table

    comparisons, problems = {}, []
    for kind, sides in results.items():
        for peer in (s for s in sides if s != "ours"):
            comparisons[f"{kind} vs {peer}"], found = compare(kind, sides["ours"], sides[peer])
            problems += found
    console = Console()
    if not console.is_terminal:
        console.width = 160  # piped into a file or a test: room for the whole table
    right = dict(justify="right")
    table = Table("ours vs peer", Column("s/step", **right), Column("peer", **right), Column("speed-up", **right),
                  Column("1 epoch", **right), Column("tok/s", **right), Column("peer", **right),
                  Column("peak RSS", **right), Column("peer", **right), Column("% ceiling", **right),
                  Column("peer", **right), Column("max |Δloss|", **right),
                  title=f"{model['preset']} model, {'nf4 (QLoRA)' if args.quantization == 'nf4' else 'fp32'} base: "
                        f"median over {args.steps - args.warmup} "
                        f"steps after {args.warmup} warm-up; 1 epoch: the reference precompute spread over the steps")
    for name, c in comparisons.items():
        kind = name.split()[0]
        ours, peer = results[kind]["ours"], results[kind][c["peer"]]
        table.add_row(f"{kind}: {ours['label']} vs {peer['label']}", f"{ours['s_per_step']:.3f}",
                      f"{peer['s_per_step']:.3f}", f"{c['speedup']:.2f}x", f"{c['epoch_speedup']:.2f}x",
                      f"{ours['tokens_per_s']:,.0f}", f"{peer['tokens_per_s']:,.0f}",
                      size(ours["peak_rss_bytes"]), size(peer["peak_rss_bytes"]),
                      f"{ours['ceiling_fraction']:.1%}", f"{peer['ceiling_fraction']:.1%}",
                      "n/a: other loss" if c["max_abs_loss_diff"] is None else f"{c['max_abs_loss_diff']:.1e}")
    console.print(table)
    sides = Table("side", Column("setup s", **right), Column("ref precompute s", **right),
                  Column("tokens/step", **right), Column("forward tokens/step", **right),
                  Column("model TFLOP/step", **right), Column("model TFLOP/s", **right),
                  Column("loss first → last", **right),
                  title="per side; setup: from the stage or trainer call to step 1, the reference precompute included")
    for kind, by_side in results.items():
        for r in by_side.values():
            pre = "-" if r["ref_precompute_s"] is None else f"{r['ref_precompute_s']:.2f}"
            sides.add_row(f"{kind}: {r['label']}", f"{r['setup_s']:.2f}", pre, f"{r['tokens_per_step']:,}",
                          f"{r['forward_tokens_per_step']:,}", f"{r['model_tflop_per_step']:.3f}",
                          f"{r['model_tflops']:.3f}", f"{r['losses'][0]:.4f} → {r['losses'][-1]:.4f}")
    console.print(sides)
    same = all(c["same_token_ids"] for c in comparisons.values())
    console.print(f"model: random Llama ({model['preset']}), {model['params'] / 1e6:.1f}M parameters, "
                  f"{model['non_embedding_params'] / 1e6:.1f}M without the tied embedding; "
                  f"LoRA {model['lora_params'] / 1e6:.2f}M")
    console.print(f"same token ids on both sides of every comparison: {'yes' if same else 'NO'}; tokens/step: "
                  + ", ".join(f"{k} {v['ours']['tokens_per_step']:,}" for k, v in results.items()))
    console.print(f"matmul ceiling: {ceiling['tflops']:.3f} TFLOP/s fp32 on {ceiling['threads']} threads ("
                  + ", ".join(f"{k}: {v:.3f}" for k, v in ceiling["by_shape"].items()) + ")")
    for problem in problems:
        console.print(f"[red]{problem}[/]")
    settings = {"model": args.model, "steps": args.steps, "warmup": args.warmup, "quantization": args.quantization,
                "which": list(results), "lr": LR, "beta": BETA, "lora": LORA, "seed": SEED, "prompt_tokens": PROMPT,
                "answer_tokens": ANSWER, "pairs_per_step": PAIRS_PER_STEP, "k": K, "machine": platform.machine()}
    return {"settings": settings, "model": model, "ceiling": ceiling, "results": results, "comparisons": comparisons,
            "problems": problems}


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", choices=sorted(SHAPES), default="100m")
    parser.add_argument("--steps", type=int, default=8, help="optimizer steps per side, warm-up included")
    parser.add_argument("--warmup", type=int, help="untimed first steps (default: min(2, steps // 3))")
    parser.add_argument("--which", default="dpo,sft,rank", help="comma-separated comparisons: dpo, sft, rank")
    parser.add_argument("--quantization", choices=["none", "nf4"], default="none",
                        help="none: LoRA on a frozen fp32 base; nf4: QLoRA (both sides)")
    parser.add_argument("--json", help="write every number to this file")
    parser.add_argument("--side", help=argparse.SUPPRESS)
    parser.add_argument("--work", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    args.which = args.which.split(",")
    if unknown := set(args.which) - set(SIDES):
        parser.error(f"--which: unknown {', '.join(sorted(unknown))}; choose from {', '.join(SIDES)}")
    args.warmup = min(2, args.steps // 3) if args.warmup is None else args.warmup
    if args.warmup < 1 or args.steps - args.warmup < 1:
        parser.error("--steps must leave at least one warm-up and one timed step (--steps >= 3 by default)")
    return args


def main(argv=None) -> dict:
    args = parse_args(argv)
    if args.side:
        print(json.dumps(child(args)))
        return {}
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        ceiling = matmul_ceiling()  # before anything else runs in this process
        model = build_model(args.model, work)
        (work / "data.json").write_text(json.dumps(make_data(args.steps, model["vocab_size"])))
        results = {}
        for kind in (k for k in SIDES if k in args.which):  # one side at a time: each has the machine to itself
            results[kind] = {side: summarize(args, model, ceiling, measure(args, kind, side, work))
                             for side in SIDES[kind]}
    out = report(args, model, ceiling, results)
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=2))
    if out["problems"]:
        raise SystemExit("bench_dpo: the sides did not run the same workload:\n" + "\n".join(out["problems"]))
    return out


if __name__ == "__main__":
    main()
