"""What the dataset-pass stages (sft, dpo; later rm and rank) share: transformers' Trainer, with our
loss supplied by a thin subclass. Checkpointing, resume, gradient accumulation, mixed precision and
DeepSpeed/FSDP come from the Trainer; this file only maps a recipe's `train` section onto it, writes
`metrics.jsonl`, and averages per-step metrics the way TRL logs them.
"""

from __future__ import annotations

import json
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import torch
from transformers import PrinterCallback, Trainer, TrainerCallback, TrainingArguments

from align.models import adapters
from align.replay import ReplayMixer
from align.ui import StageProgress


@dataclass
class StageContext:
    """What the pipeline hands a stage: the shared base, where to write, and earlier stages' outputs."""

    recipe: object
    base: object  # the frozen base model (nf4 or plain), shared by every stage of the run
    tokenizer: object
    stage_dir: Path
    dtype: torch.dtype = torch.float32
    quiet: bool = False
    replay: ReplayMixer | None = None  # earlier data to mix into this stage's steps (align.replay)


@dataclass
class StageOutput:
    adapter: Path
    metrics: dict
    resumed_from: str | None = None
    extra: dict = field(default_factory=dict)


def training_arguments(stage, ctx: StageContext) -> TrainingArguments:
    t = stage.train
    seed = t.seed if t.seed is not None else ctx.recipe.seed
    cuda = torch.cuda.is_available()
    return TrainingArguments(
        output_dir=str(ctx.stage_dir / "checkpoints"),
        num_train_epochs=t.epochs,
        max_steps=t.max_steps,
        learning_rate=t.lr,
        per_device_train_batch_size=t.batch_size,
        per_device_eval_batch_size=t.batch_size,
        gradient_accumulation_steps=t.grad_accum,
        warmup_steps=t.warmup_ratio,  # a float in [0, 1) is a ratio of the total steps
        weight_decay=t.weight_decay,
        lr_scheduler_type=t.lr_scheduler,
        logging_steps=t.logging_steps,
        save_strategy="steps",
        save_steps=t.save_steps,
        save_total_limit=2,
        eval_strategy="steps" if t.eval_steps else "no",
        eval_steps=t.eval_steps,
        seed=seed,
        data_seed=seed,
        bf16=ctx.dtype == torch.bfloat16,
        gradient_checkpointing=t.gradient_checkpointing,
        gradient_checkpointing_kwargs={"use_reentrant": False},
        use_cpu=not cuda,
        report_to=[],
        disable_tqdm=True,
        remove_unused_columns=False,
        dataloader_num_workers=0,
    )


def last_checkpoint(stage_dir: Path) -> str | None:
    ckpts = sorted((stage_dir / "checkpoints").glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[-1]))
    complete = [p for p in ckpts if (p / "trainer_state.json").is_file()]  # a kill can leave a half-written one
    return str(complete[-1]) if complete else None


class MetricsFile(TrainerCallback):
    """Every logged dict, one JSON line, appended (a resumed stage continues the same file)."""

    def __init__(self, path: Path):
        self.path = path

    def on_log(self, args, state, control, logs=None, **kwargs):
        with self.path.open("a") as f:
            f.write(json.dumps({"step": state.global_step, **(logs or {})}) + "\n")


class AlignTrainer(Trainer):
    """Trainer whose subclasses implement `loss_and_metrics(model, batch) -> (loss, {name: float})`.
    Training metrics are averaged over the steps between two logs, as TRL does; `evaluate` runs the
    same function over the eval set (the Trainer's own evaluation needs labels we do not have). With a
    `replay` mixer, every training micro-step adds the NLL of its share of buffer sequences."""

    def __init__(self, *args, replay: ReplayMixer | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        self._stored: dict[str, list[float]] = defaultdict(list)
        self.replay = replay
        self._micro_step = (-1, 0)  # (global step, micro-steps taken in it)

    def loss_and_metrics(self, model, batch):
        raise NotImplementedError

    def _replay_position(self) -> int:
        """The micro-step's index in the whole stage: restored with the global step on resume."""
        step, taken = self._micro_step
        taken = taken if step == self.state.global_step else 0
        self._micro_step = (self.state.global_step, taken + 1)
        return self.state.global_step * self.args.gradient_accumulation_steps + taken

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        loss, metrics = self.loss_and_metrics(model, inputs)
        if self.replay is not None and model.training:
            replay_loss, replay_metrics = self.replay.loss(model, self._replay_position(), len(inputs["input_ids"]))
            loss = loss + replay_loss
            metrics.update(replay_metrics)
        for k, v in metrics.items():
            self._stored[k].append(v)
        return (loss, None) if return_outputs else loss

    def log(self, logs: dict, start_time=None) -> None:
        if not any(k.startswith("eval_") for k in logs):
            logs.update({k: sum(v) / len(v) for k, v in self._stored.items()})
            self._stored.clear()
        super().log(logs, start_time)

    @torch.no_grad()
    def evaluate(self, eval_dataset=None, ignore_keys=None, metric_key_prefix="eval") -> dict:
        """The loss and the stage's metrics over the eval set, averaged per example."""
        was_training = self.model.training
        self.model.eval()
        totals: dict[str, float] = defaultdict(float)
        count = 0
        for batch in self.get_eval_dataloader(eval_dataset):
            batch = self._prepare_inputs(batch)
            loss, metrics = self.loss_and_metrics(self.model, batch)
            size = self.batch_size_of(batch)
            for k, v in {"loss": float(loss), **metrics}.items():
                totals[k] += v * size
            count += size
        self.model.train(was_training)
        out = {f"{metric_key_prefix}_{k}": v / count for k, v in totals.items()}
        self.log(out)
        return out

    def batch_size_of(self, batch) -> int:
        return len(batch["input_ids"])


def fit(trainer_cls: type[AlignTrainer], model, stage, ctx: StageContext, train_rows, eval_rows, collator, **kwargs) -> StageOutput:
    """Train the `policy` adapter of `model` (resuming from the stage's last checkpoint), evaluate it,
    save it to `adapter/`, and give the pipeline back the bare base for the next stage."""
    trainer = trainer_cls(
        model=model,
        args=training_arguments(stage, ctx),
        train_dataset=train_rows,
        eval_dataset=eval_rows,
        data_collator=collator,
        replay=ctx.replay,
        **kwargs,
    )
    trainer.remove_callback(PrinterCallback)  # it prints raw dicts when tqdm is off; the progress bar shows them
    trainer.add_callback(MetricsFile(ctx.stage_dir / "metrics.jsonl"))
    trainer.add_callback(StageProgress(stage.name, quiet=ctx.quiet))
    resume = last_checkpoint(ctx.stage_dir)
    result = trainer.train(resume_from_checkpoint=resume)
    metrics = dict(result.metrics)
    for entry in trainer.state.log_history:  # the last value of each logged metric
        metrics.update({k: v for k, v in entry.items() if isinstance(v, (int, float))})
    metrics["global_step"] = trainer.state.global_step
    if eval_rows:
        metrics.update(trainer.evaluate())
    adapter = adapters.save(model, ctx.stage_dir / "adapter")
    ctx.base = model.unload()  # take the LoRA layers out again: the next stage starts from the bare base
    return StageOutput(adapter, metrics, resume)
