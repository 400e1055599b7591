"""What the dataset-pass stages (sft, rm, dpo, rank, kto) share: transformers' Trainer, with our
loss supplied by a thin subclass. Checkpointing, resume, gradient accumulation, mixed precision and
multi-process training come from the Trainer; this file only maps a recipe's `train` section onto it, writes
`metrics.jsonl`, and averages per-step metrics the way TRL logs them.

Under a launcher (`accelerate launch`, `torchrun`; see align.distributed) a recipe's `train.batch_size` is the global
batch: each of W processes takes batch_size / W examples of every micro-step, so a run trains on the same batches
whatever W is, and an optimizer step sees batch_size * grad_accum examples. Logged and evaluated metrics are combined
over all processes, so they mean what they mean in one process.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch.utils.data import DataLoader
from transformers import PrinterCallback, Trainer, TrainerCallback, TrainingArguments
from transformers.trainer_pt_utils import LengthGroupedSampler

from align import distributed
from align.errors import AlignError
from align.models import adapters
from align.models.host import ModelHost
from align.replay import ReplayMixer
from align.run_folder import DONE, STOPPED_EARLY, StageFolder
from align.stages.early_stopping import EarlyStopping, StopWhenNoBetter
from align.ui import StageProgress, StepObserver

# Metrics that count what a batch holds: the processes' shares add up, where the other metrics are averaged.
COUNTS = {"num_tokens"}


@dataclass
class StageContext:
    """What the pipeline hands a stage: the host that lends it the run's base, where to write, the run's seed."""

    host: ModelHost  # borrow the base with `with ctx.host.policy(init=stage.init) as model:`
    stage_dir: Path
    seed: int = 0  # the recipe's; a stage's own `train.seed` comes first
    dtype: torch.dtype = torch.float32
    quiet: bool = False
    replay: ReplayMixer | None = None  # earlier data to mix into this stage's steps (align.replay)
    # `fit` calls it once the stage is ready to train, caches on disk included: with several processes the main one
    # prepares first and the others only then, so that they read what it wrote (align.pipeline supplies it)
    prepared: Callable[[], None] = lambda: None
    trackers: list[StepObserver] = field(default_factory=list)  # the recipe's experiment trackers (align.tracking)
    # a folder the stages of every run on this base (and dtype) share, for what is costly to compute and depends only
    # on content it is keyed by; None = none
    shared_cache: Path | None = None

    @property
    def tokenizer(self):
        return self.host.tokenizer

    def observers(self, stage_name: str) -> list[StepObserver]:
        """Who watches the stage train, besides its metrics.jsonl: its progress bar and the trackers."""
        return [StageProgress(stage_name, quiet=self.quiet), *self.trackers]


@dataclass
class StageOutput:
    adapter: Path
    metrics: dict
    resumed_from: str | None = None
    extra: dict = field(default_factory=dict)
    status: str = DONE  # or STOPPED_EARLY: early stopping ended it before its last step

    @classmethod
    def stopped(cls, adapter: Path, metrics: dict, resumed_from: str | None, stopping: EarlyStopping | None,
                last_step: int) -> StageOutput:
        """The output of a stage that may have stopped early: its early-stopping record in stage.json."""
        if stopping is None:
            return cls(adapter, metrics, resumed_from)
        return cls(adapter, metrics, resumed_from, {"early_stopping": stopping.report(last_step)},
                   STOPPED_EARLY if stopping.should_stop else DONE)


def device_batch_size(stage) -> int:
    """Each process's share of the stage's global `train.batch_size`."""
    processes = distributed.world_size()
    if stage.train.batch_size % processes:
        raise AlignError(f"stages.{stage.name}.train.batch_size: {stage.train.batch_size} is the global batch of all "
                         f"{processes} processes and must divide evenly among them; make it a multiple of {processes}")
    return stage.train.batch_size // processes


def training_arguments(stage, ctx: StageContext) -> TrainingArguments:
    t = stage.train
    seed = t.seed if t.seed is not None else ctx.seed
    cuda = torch.cuda.is_available()
    return TrainingArguments(
        output_dir=str(ctx.stage_dir / "checkpoints"),
        num_train_epochs=t.epochs,
        max_steps=t.max_steps,
        learning_rate=t.lr,
        per_device_train_batch_size=device_batch_size(stage),
        per_device_eval_batch_size=device_batch_size(stage),
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
        train_sampling_strategy="group_by_length" if t.group_by_length else "random",
        gradient_checkpointing_kwargs={"use_reentrant": False},
        use_cpu=not cuda,
        report_to=[],
        disable_tqdm=True,
        remove_unused_columns=False,
        dataloader_num_workers=0,
        ddp_find_unused_parameters=False,  # every trainable parameter (adapter, score head) is in every loss
    )


def checkpoint_step(path: str | Path) -> int:
    return int(Path(path).name.split("-")[-1])


def last_checkpoint(stage_dir: Path) -> str | None:
    ckpts = sorted((stage_dir / "checkpoints").glob("checkpoint-*"), key=checkpoint_step)
    complete = [p for p in ckpts if (p / "trainer_state.json").is_file()]  # a kill can leave a half-written one
    return str(complete[-1]) if complete else None


class Observed(TrainerCallback):
    """The Trainer's events told to StepObservers (align.ui), so that Trainer stages report as the online loop does.
    The Trainer's end-of-training summary (runtime, mean loss) is not a step: it goes to stage.json only."""

    def __init__(self, *observers: StepObserver):
        self.observers = observers

    def on_train_begin(self, args, state, control, **kwargs):
        for observer in self.observers:
            observer.begin(state.global_step, state.max_steps)

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs and "train_runtime" not in logs:
            for observer in self.observers:
                observer.logged(state.global_step, logs)

    def on_step_end(self, args, state, control, **kwargs):
        for observer in self.observers:
            observer.stepped(state.global_step)

    def on_train_end(self, args, state, control, **kwargs):
        for observer in self.observers:
            observer.end()


class LogAtCheckpoints(TrainerCallback):
    """Log at every checkpoint and at the last step, whatever `logging_steps` says. Metrics are averaged over the
    steps since the last log, and a resumed run starts averaging at its checkpoint: so a resumed stage logs exactly
    what an uninterrupted one does only when every checkpoint closes a logging window; and no step goes unlogged."""

    def on_step_end(self, args, state, control, **kwargs):
        if control.should_save or state.global_step >= state.max_steps:
            control.should_log = True


class AlignTrainer(Trainer):
    """Trainer whose subclasses implement `loss_and_metrics(model, batch) -> (loss, {name: float})`.
    Training metrics are averaged over the steps between two logs, as TRL does, and over the processes; `evaluate`
    runs the same function over the eval set (the Trainer's own evaluation needs labels we do not have). With a
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

    def _step_loss(self, model, inputs):
        loss, metrics = self.loss_and_metrics(model, inputs)
        if self.replay is not None and model.training:
            # Every process scores the buffer sequences that one process would add to the whole micro-step: DDP
            # averages the gradients, so the replay term stays what it is in one process, at the price of W forwards.
            sequences = self.sequences_in(inputs) * distributed.world_size()
            replay_loss, replay_metrics = self.replay.loss(model, self._replay_position(), sequences)
            loss = loss + replay_loss
            metrics.update(replay_metrics)
        return loss, metrics

    def _forward(self, model, inputs):
        """`_step_loss` on the bare model, run inside the forward of the wrapper that the Trainer put around it (DDP,
        DeepSpeed) if there is one: the losses call the decoder directly, and a wrapper prepares its gradient sync in
        its own forward, which a direct call would skip (gradients left unsynced, processes drifting apart)."""
        inner = self.accelerator.unwrap_model(model)
        if inner is model:
            return self._step_loss(model, inputs)
        own = inner.__dict__.get("forward")  # accelerate may keep a mixed-precision forward there; it comes back after
        inner.forward = lambda batch: self._step_loss(inner, batch)
        try:
            return model(inputs)
        finally:
            if own is None:
                del inner.forward
            else:
                inner.forward = own

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        loss, metrics = self._forward(model, inputs)
        for k, v in metrics.items():
            self._stored[k].append(v)
        return (loss, None) if return_outputs else loss

    def log(self, logs: dict, start_time=None) -> None:
        if not any(k.startswith("eval_") for k in logs):
            # Each process holds the metrics of its share of the batches; every process logs at the same steps.
            parts = distributed.gather({k: sum(v) / len(v) for k, v in self._stored.items()})
            self._stored.clear()
            for key in dict.fromkeys(k for part in parts for k in part):
                values = [part[key] for part in parts if key in part]
                logs[key] = sum(values) if key in COUNTS else sum(values) / len(values)
        super().log(logs, start_time)

    @torch.no_grad()
    def evaluate(self, eval_dataset=None, ignore_keys=None, metric_key_prefix="eval") -> dict:
        """The loss and the stage's metrics over the eval set, averaged per example. Each of W processes scores every
        W-th example with the bare model (nothing to synchronise: nothing trains) and the sums are added up, so every
        process gets the averages of one process over the whole set."""
        rows = eval_dataset if eval_dataset is not None else self.eval_dataset
        loader = DataLoader(rows[distributed.rank() :: distributed.world_size()],
                            batch_size=self.args.per_device_eval_batch_size, collate_fn=self.data_collator)
        model = self.accelerator.unwrap_model(self.model)
        was_training = model.training
        model.eval()
        totals: dict[str, float] = defaultdict(float)
        count = 0
        with self._progress("held-out evaluation", len(loader)) as advance:
            for batch in loader:
                batch = self._prepare_inputs(batch)
                loss, metrics = self.loss_and_metrics(model, batch)
                size = self.batch_size_of(batch)
                for k, v in {"loss": float(loss), **metrics}.items():
                    totals[k] += v * size
                count += size
                advance()
        model.train(was_training)
        parts = distributed.gather((dict(totals), count))
        count = sum(n for _, n in parts)
        keys = dict.fromkeys(k for sums, _ in parts for k in sums)
        out = {f"{metric_key_prefix}_{k}": sum(sums.get(k, 0.0) for sums, _ in parts) / count for k in keys}
        self.log(out)
        # the Trainer's own evaluate says so to the callbacks; without it the Trainer evaluates the last step again
        self.control = self.callback_handler.on_evaluate(self.args, self.state, self.control, out)
        return out

    def _progress(self, description: str, total: int):
        """A bar under the stage's progress, in the process that shows it; nothing in the others."""
        observers = (o for cb in self.callback_handler.callbacks if isinstance(cb, Observed) for o in cb.observers)
        bar = next((o for o in observers if isinstance(o, StageProgress)), None)
        return bar.subtask(description, total) if bar else nullcontext(lambda n=1: None)

    def _get_train_sampler(self, train_dataset=None):
        """transformers' length-grouped sampler, told the lengths: it would look for `input_ids` in the rows."""
        if self.args.train_sampling_strategy != "group_by_length":
            return super()._get_train_sampler(train_dataset)
        rows = train_dataset if train_dataset is not None else self.train_dataset
        return LengthGroupedSampler(self.args.train_batch_size * self.args.gradient_accumulation_steps,
                                    lengths=[row_tokens(row) for row in rows])

    def batch_size_of(self, batch) -> int:
        return len(batch["input_ids"])

    def sequences_in(self, batch) -> int:
        """(prompt, completion) sequences the batch trains on: what a replay fraction is a fraction of."""
        return len(batch["input_ids"])


def row_tokens(row: dict) -> int:
    """The tokens of a training row: every list of ids in it (a group's responses are a list of them)."""
    total = 0
    for value in row.values():
        if isinstance(value, list) and value and isinstance(value[0], list):
            total += sum(map(len, value))
        elif isinstance(value, list) and value and isinstance(value[0], int):
            total += len(value)
    return total


def evaluated_at_end(state) -> bool:
    """Whether periodic evaluation already scored the final adapter (its record is at the last step)."""
    return any(entry.get("step") == state.global_step and any(k.startswith("eval_") for k in entry)
               for entry in state.log_history)


def fit(trainer_cls: type[AlignTrainer], model, stage, ctx: StageContext, train_rows, eval_rows, collator,
        **kwargs) -> StageOutput:
    """Train the `policy` adapter of `model` (resuming from the stage's last checkpoint), evaluate it,
    save it to `adapter/`, and give the pipeline back the bare base for the next stage."""
    ctx.prepared()
    resume = last_checkpoint(ctx.stage_dir)
    args = training_arguments(stage, ctx)
    stopping = None
    if stage.train.early_stopping:
        # the evaluations the stage logged up to its checkpoint; every process decides alike from the main one's log
        logged = StageFolder(ctx.stage_dir).metrics
        records = distributed.broadcast([r for r in logged.records() if r["step"] <= checkpoint_step(resume)]
                                        if resume and distributed.is_main() else [])
        stopping = EarlyStopping.from_log(stage.train.early_stopping, records)
        if stopping.should_stop:  # killed after it stopped, before it was recorded done: nothing left to train
            args.max_steps = checkpoint_step(resume)
    trainer = trainer_cls(
        model=model,
        args=args,
        train_dataset=train_rows,
        eval_dataset=eval_rows,
        data_collator=collator,
        replay=ctx.replay,
        **kwargs,
    )
    deepspeed = getattr(trainer.accelerator.state, "deepspeed_plugin", None)
    if trainer.is_fsdp_enabled or (deepspeed is not None and deepspeed.zero_stage == 3):
        raise AlignError("FSDP and DeepSpeed ZeRO-3 shard the weights among the processes, and align saves adapters, "
                         "evaluates and hands the base on to the next stage from whole weights: launch with several "
                         "processes and no sharding (DDP), or DeepSpeed ZeRO-2 (recipes/accelerate/)")
    trainer.remove_callback(PrinterCallback)  # it prints raw dicts when tqdm is off; the progress bar shows them
    trainer.add_callback(LogAtCheckpoints())  # in every process: each takes part in gathering the logged metrics
    if stopping:
        trainer.add_callback(StopWhenNoBetter(stopping))
    if distributed.is_main():  # one process writes and shows the stage's progress for all
        metrics_log = StageFolder(ctx.stage_dir).metrics
        metrics_log.keep_until(checkpoint_step(resume) if resume else 0)
        trainer.add_callback(Observed(metrics_log, *ctx.observers(stage.name)))
    result = trainer.train(resume_from_checkpoint=resume)
    metrics = dict(result.metrics)
    for entry in trainer.state.log_history:  # the last value of each logged metric
        metrics.update({k: v for k, v in entry.items() if isinstance(v, (int, float))})
    metrics["global_step"] = trainer.state.global_step
    best = stopping.best() if stopping else None
    if best:
        trainer.remove_callback(StopWhenNoBetter)
        if best[0] != trainer.state.global_step:  # hand on the best evaluation's adapter, and its held-out metrics
            adapters.restore(model, ctx.stage_dir / "checkpoints" / f"checkpoint-{best[0]}" / adapters.POLICY)
        for entry in trainer.state.log_history:
            if entry.get("step") == best[0]:
                metrics.update({k: v for k, v in entry.items() if k.startswith("eval_")})
        metrics["best_step"] = best[0]
    elif eval_rows and not evaluated_at_end(trainer.state):
        metrics.update(trainer.evaluate())
    adapter = ctx.stage_dir / "adapter"
    if distributed.is_main():  # every process holds the same trained adapter
        adapters.save(model, adapter)
    return StageOutput.stopped(adapter, metrics, resume, stopping, trainer.state.global_step)
