"""The settings every stage shares: the base model, a dataset, the optimisation, and the fields of a stage that
each stage kind's config (in `align/stages/<kind>.py`) extends. `align.config` puts them into a recipe; their
`__post_init__` checks raise `ConfigError(key=<field>)`, which the YAML binder points at the field's line.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from align import yaml_binding
from align.errors import require as _require
from align.method_configs import ReplayOutConfig

_IDENTIFIER = yaml_binding.IDENTIFIER  # so that `stages.<name>.key` and `${<name>.output}` can name a stage


@dataclass(kw_only=True)
class LoraConfig:
    """The LoRA adapter every stage trains (PEFT's LoraConfig)."""

    r: int = 16  # rank
    alpha: int = 32  # scaling is alpha / r
    dropout: float = 0.05
    target_modules: str | list[str] = "all-linear"  # "all-linear" or module names such as [q_proj, v_proj]

    def __post_init__(self):
        _require(self.r >= 1, "r", f"must be >= 1, got {self.r}")
        _require(0 <= self.dropout < 1, "dropout", f"must be in [0, 1), got {self.dropout}")


@dataclass(kw_only=True)
class ModelConfig:
    """The frozen base model that all stages' adapters share."""

    base: str  # required: hub id, local folder, .gguf file or builtin:<name>
    quantization: Literal["nf4", "none"] = "nf4"  # nf4 = QLoRA; none = plain LoRA
    precision: Literal["auto", "fp32", "bf16"] = "auto"  # auto = bf16 where the device has it
    chat_template: str | None = None  # a .jinja path or an inline template; None = the tokenizer's
    # nf4 only: generation dequantizes each 4-bit weight once per call instead of once per token, faster for a copy
    # of 2 (bf16) or 4 (fp32) bytes per parameter while it runs (align.models.decoding)
    dequantized_generation: bool = False
    lora: LoraConfig = field(default_factory=LoraConfig)


@dataclass(kw_only=True)
class DataConfig:
    """A dataset: a file, folder or `synthetic:<name>` (`path`), or what `datasets.load_dataset` loads (`dataset`)."""

    path: str | None = None  # this or `dataset`; with `dataset`, the spec it stands for (dataset:NAME?config=&split=)
    dataset: str | None = None  # a Hub name in the local cache, or a folder of JSONL/Parquet/CSV files or save_to_disk
    config: str | None = None  # the dataset's configuration (load_dataset's `name`)
    split: str | None = None  # None = train, else its only split
    format: str = "auto"  # auto-detected unless named (see align.data.formats)
    skip_bad_rows: bool = False  # False: the first bad row is an error naming file, row and field
    max_rows: int | None = None  # None = all rows
    # in a stage's list of sources (a mixture, align.data.mixture): this source's share of the stage's rows; weights
    # are relative (0.7 and 0.3, or 7 and 3); None in every source = the sources one after another
    weight: float | None = None

    def __post_init__(self):
        _require(self.max_rows is None or self.max_rows >= 1, "max_rows", f"must be >= 1, got {self.max_rows}")
        _require(self.weight is None or self.weight > 0, "weight", f"must be > 0, got {self.weight}")
        if self.dataset is None:
            _require(self.path is not None, "path", "give the data's path (or a `dataset` for datasets.load_dataset)")
            _require(self.config is None and self.split is None, "config" if self.config else "split",
                     "config and split belong to a `dataset` source")
            return
        spec = dataset_path(self.dataset, self.config, self.split)
        _require(self.path in (None, spec), "path", "give a path or a dataset, not both")
        self.path = spec  # what every reader takes: align.data.sources reads it through align.data.hub


DATASET_PREFIX = "dataset:"


def dataset_path(name: str, config: str | None, split: str | None) -> str:
    """The path that stands for a `datasets` source: dataset:NAME?config=C&split=S."""
    from urllib.parse import urlencode

    query = urlencode({k: v for k, v in (("config", config), ("split", split)) if v is not None})
    return DATASET_PREFIX + name + (f"?{query}" if query else "")


@dataclass(kw_only=True)
class EarlyStoppingConfig:
    """Stop a stage once its held-out metric stops improving, and hand on the adapter of its best evaluation
    (align.stages.early_stopping). The stage evaluates every `train.eval_steps` steps and checkpoints there too."""

    metric: str  # required: a held-out metric the stage logs, e.g. eval_rewards/accuracies or eval_objective/scores
    mode: Literal["max", "min"] = "max"  # whether larger values are better
    patience: int = 3  # evaluations in a row without an improvement before the stage stops
    min_delta: float = 0.0  # an improvement must beat the best so far by more than this

    def __post_init__(self):
        _require(self.metric.startswith("eval_"), "metric",
                 f"must be a held-out metric (eval_...): the stage's training metrics are not, got '{self.metric}'")
        _require(self.patience >= 1, "patience", f"must be >= 1, got {self.patience}")
        _require(self.min_delta >= 0, "min_delta", f"must be >= 0, got {self.min_delta}")


@dataclass(kw_only=True)
class TrainConfig:
    """Optimisation settings of one stage (they map onto transformers' TrainingArguments)."""

    epochs: float = 1.0
    max_steps: int = -1  # > 0 overrides epochs
    lr: float = 2.0e-4
    batch_size: int = 8  # global: a launch's processes take equal shares of it (align.stages.engine)
    grad_accum: int = 1
    warmup_ratio: float = 0.0
    weight_decay: float = 0.0
    lr_scheduler: Literal["linear", "cosine", "constant"] = "linear"
    max_length: int = 512  # tokens, prompt + completion
    max_prompt_length: int = 256
    save_steps: int = 50  # checkpoint every N optimizer steps
    logging_steps: int = 1
    eval_steps: int | None = None  # None = no periodic eval
    seed: int | None = None  # None = the recipe's seed (filled in by Recipe)
    gradient_checkpointing: bool = False
    group_by_length: bool = False  # batches of similar lengths (shuffled in groups of 50 batches) pad less
    early_stopping: EarlyStoppingConfig | None = None  # None = train every step

    def __post_init__(self):
        _require(self.lr > 0, "lr", f"must be > 0, got {self.lr}")
        _require(self.batch_size >= 1, "batch_size", f"must be >= 1, got {self.batch_size}")
        _require(self.grad_accum >= 1, "grad_accum", f"must be >= 1, got {self.grad_accum}")
        _require(self.max_prompt_length >= 1, "max_prompt_length", f"must be >= 1, got {self.max_prompt_length}")
        _require(self.max_length > self.max_prompt_length, "max_length",
                 f"must be greater than max_prompt_length ({self.max_prompt_length}), got {self.max_length}")
        _require(self.early_stopping is None or bool(self.eval_steps), "early_stopping",
                 "needs train.eval_steps: how often the stage evaluates the metric it watches")


@dataclass(kw_only=True)
class StageConfig:
    """Fields every stage has; each kind subclasses it in its own file (align.stages.<kind>) and registers it."""

    name: str  # required; unique, identifier-like, not "base" (eval's name for the untrained model)
    kind: str  # required; a registered stage kind (align.stages.kind)
    data: DataConfig | list[DataConfig]  # required; a list: a mixture of sources (align.data.mixture)
    eval_data: DataConfig | None = None
    init: str | None = None  # adapter to start from, e.g. ${sft.adapter}; None = a fresh adapter
    train: TrainConfig = field(default_factory=TrainConfig)
    replay_out: ReplayOutConfig | None = field(default_factory=ReplayOutConfig)  # None = keep no sample

    @property
    def sources(self) -> list[DataConfig]:
        """The sources of `data`: itself, or each source of a mixture."""
        return self.data if isinstance(self.data, list) else [self.data]

    def __post_init__(self):
        _require(_IDENTIFIER.fullmatch(self.name) is not None, "name",
                 f"stage names must look like identifiers ([A-Za-z_][A-Za-z0-9_]*), got '{self.name}'")
        _require(self.name != "base", "name", "'base' is reserved for the untrained model in eval")
        _require(isinstance(self.data, DataConfig) or len(self.data) >= 1, "data", "give at least one source")
        _require(not isinstance(self.data, DataConfig) or self.data.weight is None, "data.weight",
                 "a weight is a share of a mixture: give data as a list of sources")
        for i, source in enumerate(self.data if isinstance(self.data, list) else []):
            _require((source.weight is None) == (self.data[0].weight is None), f"data[{i}].weight",
                     "in a mixture either every source has a weight or none does")
        _require(self.train.early_stopping is None or self.eval_data is not None, "train.early_stopping",
                 "needs eval_data: the held-out data its metric is measured on")
