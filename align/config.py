"""Recipes: a YAML file becomes typed dataclasses, and every mistake in it names its file, line and key.

The YAML is read as a node tree (`yaml.compose`) rather than plain dicts so that each value keeps the
line it came from. Command-line overrides (`stages.dpo.loss.beta=0.05`) are spliced into that tree
before the dataclasses are built, so a bad override fails exactly like a bad line in the file.

Checks of values live in each dataclass's `__post_init__`, which raises `ConfigError(key=<field>)`
without a location; the builder catches it and points it at the field's node. Built by hand in Python,
the dataclasses validate the same way.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, Union

import yaml
from yaml.nodes import MappingNode, Node, ScalarNode, SequenceNode

from align.errors import ConfigError

STAGE_OUTPUTS = {"adapter", "dir"}  # what `${stage.output}` may name: runs/<recipe>/<stage>/{adapter/,}
_REF = re.compile(r"\$\{([^}]*)\}")
_IDENTIFIER = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_RECIPE_NAME = re.compile(r"[A-Za-z0-9_.-]+")
_NULL, _MAP = "tag:yaml.org,2002:null", "tag:yaml.org,2002:map"
_NUMBER = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?")  # PyYAML reads `2e-4` as a string


def _require(ok: bool, key: str, message: str) -> None:
    if not ok:
        raise ConfigError(message, key=key)


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
    lora: LoraConfig = field(default_factory=LoraConfig)


@dataclass(kw_only=True)
class DataConfig:
    """A dataset: a file, folder, hub id or `synthetic:<name>`."""

    path: str  # required
    format: str = "auto"  # auto-detected unless named (see align.data.formats)
    skip_bad_rows: bool = False  # False: the first bad row is an error naming file, row and field
    max_rows: int | None = None  # None = all rows

    def __post_init__(self):
        _require(self.max_rows is None or self.max_rows >= 1, "max_rows", f"must be >= 1, got {self.max_rows}")


@dataclass(kw_only=True)
class TrainConfig:
    """Optimisation settings of one stage (they map onto transformers' TrainingArguments)."""

    epochs: float = 1.0
    max_steps: int = -1  # > 0 overrides epochs
    lr: float = 2.0e-4
    batch_size: int = 8  # per device
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

    def __post_init__(self):
        _require(self.lr > 0, "lr", f"must be > 0, got {self.lr}")
        _require(self.batch_size >= 1, "batch_size", f"must be >= 1, got {self.batch_size}")
        _require(self.grad_accum >= 1, "grad_accum", f"must be >= 1, got {self.grad_accum}")
        _require(self.max_prompt_length >= 1, "max_prompt_length", f"must be >= 1, got {self.max_prompt_length}")
        _require(self.max_length > self.max_prompt_length, "max_length",
                 f"must be greater than max_prompt_length ({self.max_prompt_length}), got {self.max_length}")


@dataclass(kw_only=True)
class DPOLossConfig:
    """The DPO-family loss (TRL's names: sigmoid is the DPO paper's loss)."""

    type: Literal["sigmoid", "ipo", "hinge"] = "sigmoid"
    beta: float = 0.1  # strength of the pull towards the reference
    label_smoothing: float = 0.0  # assumed fraction of flipped preference labels (cDPO)
    # Weight of an NLL term on the chosen answer (RPO, Pang et al. 2024, arXiv 2404.19733; TRL's
    # rpo_alpha). It keeps DPO from lowering the chosen answer's likelihood along with the rejected one.
    rpo_alpha: float = 0.0

    def __post_init__(self):
        _require(self.beta > 0, "beta", f"must be > 0, got {self.beta}")
        _require(self.rpo_alpha >= 0, "rpo_alpha", f"must be >= 0, got {self.rpo_alpha}")
        _require(0 <= self.label_smoothing < 0.5, "label_smoothing", f"must be in [0, 0.5), got {self.label_smoothing}")


@dataclass(kw_only=True)
class StageConfig:
    """Fields every stage has; each kind subclasses it and is registered in STAGE_KINDS."""

    name: str  # required; unique, identifier-like, not "base" (eval's name for the untrained model)
    kind: str  # required; a key of STAGE_KINDS
    data: DataConfig  # required
    eval_data: DataConfig | None = None
    init: str | None = None  # adapter to start from, e.g. ${sft.adapter}; None = a fresh adapter
    train: TrainConfig = field(default_factory=TrainConfig)

    def __post_init__(self):
        _require(_IDENTIFIER.fullmatch(self.name) is not None, "name",
                 f"stage names must look like identifiers ([A-Za-z_][A-Za-z0-9_]*), got '{self.name}'")
        _require(self.name != "base", "name", "'base' is reserved for the untrained model in eval")


@dataclass(kw_only=True)
class SFTStageConfig(StageConfig):
    """Supervised fine-tuning on conversations; the loss is on completions only."""

    kind: str = "sft"


@dataclass(kw_only=True)
class DPOStageConfig(StageConfig):
    """Direct preference optimisation on (prompt, chosen, rejected) pairs."""

    kind: str = "dpo"
    reference: str | None = None  # frozen reference adapter, e.g. ${sft.adapter}; None = the bare base
    precompute_ref: bool = True  # reference log-probs once before training, not every step
    loss: DPOLossConfig = field(default_factory=DPOLossConfig)


STAGE_KINDS: dict[str, type[StageConfig]] = {"sft": SFTStageConfig, "dpo": DPOStageConfig}


@dataclass(kw_only=True)
class EvalConfig:
    """Held-out evaluation of the base model and of chosen stages' adapters."""

    tasks: DataConfig  # required
    stages: list[str] | None = None  # "base" and/or stage names; None = base and every stage
    max_new_tokens: int = 32
    batch_size: int = 16

    def __post_init__(self):
        _require(self.max_new_tokens >= 1, "max_new_tokens", f"must be >= 1, got {self.max_new_tokens}")
        _require(self.batch_size >= 1, "batch_size", f"must be >= 1, got {self.batch_size}")


@dataclass(kw_only=True)
class Recipe:
    """A whole pipeline: one base model and a chain of stages, each writing runs/<name>/<stage>/."""

    name: str  # required; [A-Za-z0-9_.-]+
    output_dir: str = "runs"  # relative to the current directory
    seed: int = 0
    model: ModelConfig  # required
    stages: list[StageConfig]  # required, non-empty
    eval: EvalConfig | None = None
    path: str | None = field(default=None, init=False)  # the file it was loaded from

    def __post_init__(self):
        _require(_RECIPE_NAME.fullmatch(self.name) is not None, "name",
                 f"must contain only letters, digits, '_', '.' and '-', got '{self.name}'")
        _require(bool(self.stages), "stages", "a recipe needs at least one stage")
        names = [s.name for s in self.stages]
        for i, name in enumerate(names):
            _require(name not in names[:i], f"stages[{i}].name", f"duplicate stage name '{name}'")
        for stage in self.stages:
            if stage.train.seed is None:
                stage.train.seed = self.seed  # filled so that a stage's config hash covers its seed
        if self.eval is not None:
            if self.eval.stages is None:
                self.eval.stages = ["base", *names]
            for i, name in enumerate(self.eval.stages):
                _require(name == "base" or name in names, f"eval.stages[{i}]",
                         f"unknown stage '{name}'; choose from: base, {', '.join(names)}")
        self._check_refs(names)

    def _check_refs(self, names: list[str]) -> None:
        # A stage may use the outputs of the stages before it, eval those of all, the model none.
        scopes = [(f"stages.{s.name}", s, names[:i]) for i, s in enumerate(self.stages)]
        scopes += [("output_dir", self.output_dir, []), ("model", self.model, []), ("eval", self.eval, names)]
        for scope, value, earlier in scopes:
            for key, text in _strings(value, scope):
                try:
                    refs = parse_refs(text)
                except ConfigError as e:
                    raise ConfigError(e.message, key=key) from None
                for ref in refs:
                    if ref.stage not in names:
                        problem = f"there is no stage '{ref.stage}' (stages: {', '.join(names)})"
                    elif ref.stage not in earlier:
                        problem = f"only outputs of stages that run before {scope} can be used"
                    elif ref.output not in STAGE_OUTPUTS:
                        problem = f"unknown output '{ref.output}' (outputs: {', '.join(sorted(STAGE_OUTPUTS))})"
                    else:
                        continue
                    raise ConfigError(f"'{ref}': {problem}", key=key)

    def stage(self, name: str) -> StageConfig:
        """The stage called `name`."""
        for s in self.stages:
            if s.name == name:
                return s
        raise ConfigError(f"no stage named '{name}'; stages: {', '.join(s.name for s in self.stages)}",
                          file=self.path, key="stages")


def _strings(value, key: str):
    """(dotted key, text) for every string inside `value`, a dataclass or what `asdict` makes of one."""
    if dataclasses.is_dataclass(value):
        value = dataclasses.asdict(value)
    if isinstance(value, str):
        yield key, value
    elif isinstance(value, dict):
        for k, v in value.items():
            yield from _strings(v, f"{key}.{k}")
    elif isinstance(value, list):
        for i, v in enumerate(value):
            yield from _strings(v, f"{key}[{i}]")


# --- references between stages --------------------------------------------------------------------


@dataclass(frozen=True)
class StageRef:
    """`${stage.output}`: an output of an earlier stage, resolved by the pipeline at run time."""

    stage: str
    output: str

    def __str__(self) -> str:
        return f"${{{self.stage}.{self.output}}}"


def parse_refs(text: str) -> list[StageRef]:
    """The `${stage.output}` references in `text`, in order."""
    refs = []
    for match in _REF.finditer(text):
        stage, _, output = match.group(1).partition(".")
        if not (_IDENTIFIER.fullmatch(stage) and _IDENTIFIER.fullmatch(output)):
            raise ConfigError(f"malformed reference '{match.group(0)}'; expected ${{stage.output}}")
        refs.append(StageRef(stage, output))
    return refs


def resolve_refs(text: str, outputs: dict[str, dict[str, str]]) -> str:
    """`text` with each `${stage.output}` replaced by `outputs[stage][output]`."""
    def substitute(match: re.Match) -> str:
        (ref,) = parse_refs(match.group(0))
        try:
            return outputs[ref.stage][ref.output]
        except KeyError:
            raise ConfigError(f"'{ref}' is not available: stage '{ref.stage}' has not produced it") from None

    return _REF.sub(substitute, text)


# --- loading --------------------------------------------------------------------------------------


def load_recipe(path: str | Path, overrides: typing.Sequence[str] = ()) -> Recipe:
    """Read and validate the recipe at `path`, with `dotted.key=value` overrides applied."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError("recipe file not found", file=str(path)) from None
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"cannot read the recipe: {e}", file=str(path)) from None
    recipe = parse_recipe(text, source=str(path), overrides=overrides)
    recipe.path = str(path)
    return recipe


def parse_recipe(text: str, source: str = "<string>", overrides: typing.Sequence[str] = ()) -> Recipe:
    """Validate recipe YAML `text`; `source` names it in errors."""
    try:
        loader = yaml.SafeLoader(text)
        loader.name = source  # marks carry this name, so errors name the file
        try:
            root = loader.get_single_node()
        finally:
            loader.dispose()
    except yaml.MarkedYAMLError as e:
        mark = e.problem_mark or e.context_mark
        raise ConfigError(f"YAML syntax: {e.problem or e.context}", file=source,
                          line=mark.line + 1 if mark else None) from None
    except yaml.YAMLError as e:
        raise ConfigError(str(e), file=source) from None
    if root is None:
        raise ConfigError("the recipe is empty", file=source)
    if not isinstance(root, MappingNode):
        raise ConfigError("the recipe must be a mapping of keys (name, model, stages, ...)",
                          file=source, line=root.start_mark.line + 1)
    for override in overrides:
        _apply_override(root, override)
    return _build(Recipe, root, "")


class _CommandLine(yaml.Mark):
    """Stands in for a file position on nodes that a command-line override put into the tree."""

    def __init__(self, override: str):
        super().__init__("command line", 0, 0, 0, None, None)
        self.override = override


def _error(node: Node, key: str, message: str) -> ConfigError:
    mark = node.start_mark
    if isinstance(mark, _CommandLine):
        return ConfigError(f"{message} (override '{mark.override}')", file=mark.name, key=key)
    return ConfigError(message, file=mark.name, line=mark.line + 1, key=key)


def _split_key(key: str) -> list[str]:
    return re.findall(r"[^.\[\]]+", key)  # stages[1].loss.beta and stages.1.loss.beta alike


def _child(node: Node, part: str) -> Node | None:
    """The value under `part`: a mapping's key, or a list item by index or by its `name`."""
    if isinstance(node, MappingNode):
        return next((v for k, v in node.value if k.value == part), None)
    if isinstance(node, SequenceNode):
        for item in node.value:
            if isinstance(item, MappingNode) and any(
                    k.value == "name" and getattr(v, "value", None) == part for k, v in item.value):
                return item
        if part.isdigit() and int(part) < len(node.value):
            return node.value[int(part)]
    return None


def _locate(node: Node, key: str) -> Node:
    """The node at relative `key`, or the deepest one on the way (a field left at its default has none)."""
    for part in _split_key(key):
        child = _child(node, part)
        if child is None:
            break
        node = child
    return node


def _apply_override(root: MappingNode, override: str) -> None:
    mark = _CommandLine(override)
    key, eq, text = override.partition("=")
    parts = _split_key(key)
    if not eq or not parts:
        raise ConfigError(f"expected key=value, got '{override}'", file=mark.name)
    try:
        value = yaml.compose(text, Loader=yaml.SafeLoader) or _null(mark)
    except yaml.YAMLError as e:
        problem = getattr(e, "problem", None) or e
        raise ConfigError(f"cannot parse the value of '{override}': {problem}", file=mark.name, key=key) from None
    for n in _walk(value):
        n.start_mark = n.end_mark = mark
    node = root
    for i, part in enumerate(parts):
        last, here = i == len(parts) - 1, ".".join(parts[:i]) or "the recipe"
        if isinstance(node, SequenceNode):
            child = _child(node, part)
            if child is None:
                raise _error(value, key, f"{here} has no item named or numbered '{part}'")
            if last:
                node.value[node.value.index(child)] = value
            node = child
        elif isinstance(node, MappingNode):
            pairs = node.value
            index = next((j for j, (k, _) in enumerate(pairs) if k.value == part), None)
            if index is None:
                pairs.append((ScalarNode("tag:yaml.org,2002:str", part, mark, mark), _null(mark)))
                index = len(pairs) - 1
            if last or _is_null(pairs[index][1]):  # a null or new section (eval_data: null) gets keys
                pairs[index] = (pairs[index][0], value if last else MappingNode(_MAP, [], mark, mark))
            node = pairs[index][1]
        else:
            raise _error(value, key, f"cannot set '{part}': {here} is not a mapping")


def _walk(node: Node):
    yield node
    children = node.value if isinstance(node, SequenceNode) else [] if isinstance(node, ScalarNode) else [
        n for pair in node.value for n in pair]
    for child in children:
        yield from _walk(child)


def _null(mark: yaml.Mark) -> ScalarNode:
    return ScalarNode(_NULL, "", mark, mark)


def _is_null(node: Node) -> bool:
    return isinstance(node, ScalarNode) and node.tag == _NULL


def _describe(node: Node) -> str:
    if isinstance(node, ScalarNode):
        return f"'{node.value}'" if node.value else "nothing"
    return "a list" if isinstance(node, SequenceNode) else "a mapping"


def _build(cls: type, node: Node, key: str):
    """An instance of dataclass `cls` from mapping `node` found at dotted `key`."""
    if not isinstance(node, MappingNode):
        raise _error(node, key, f"expected a mapping of keys, got {_describe(node)}")
    if cls is StageConfig:  # the kind picks the dataclass, so it is read first
        kind = _child(node, "kind")
        if not isinstance(kind, ScalarNode) or kind.value not in STAGE_KINDS:
            raise _error(kind or node, f"{key}.kind", ("missing required key 'kind'" if kind is None else
                         f"unknown stage kind {_describe(kind)}") + f"; choose from: {', '.join(STAGE_KINDS)}")
        cls = STAGE_KINDS[kind.value]
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    hints = typing.get_type_hints(cls)
    values, prefix = {}, f"{key}." if key else ""
    for key_node, value_node in node.value:
        name = key_node.value
        if name in values:
            raise _error(key_node, prefix + name, f"duplicate key '{name}'")
        if name not in fields:
            raise _error(key_node, prefix + name, _unknown_key(cls, name, list(fields)))
        values[name] = _convert(hints[name], value_node, prefix + name)
    for name, f in fields.items():
        if name not in values and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            raise _error(node, prefix + name, f"missing required key '{name}'")
    try:
        return cls(**values)
    except ConfigError as e:
        if e.file is not None:
            raise
        raise _error(_locate(node, e.key), prefix + e.key, e.message) from None


def _unknown_key(cls: type, name: str, valid: list[str]) -> str:
    if issubclass(cls, StageConfig):
        kinds = [k for k, c in STAGE_KINDS.items() if name in {f.name for f in dataclasses.fields(c)}]
        if kinds:
            return f"'{name}' is not valid for kind {cls.kind}, only for kind {', '.join(kinds)}"
    close = difflib.get_close_matches(name, valid, n=1)
    return f"unknown key '{name}'; " + (f"did you mean '{close[0]}'?" if close else f"valid keys: {', '.join(valid)}")


def _convert(tp, node: Node, key: str):
    """The value of type `tp` held by `node`."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (Union, types.UnionType):
        if _is_null(node) and type(None) in args:
            return None
        options = [a for a in args if a is not type(None)]
        if len(options) == 1:
            return _convert(options[0], node, key)
        # str | list[str]: the node's shape picks the type
        shape = {ScalarNode: str, SequenceNode: list, MappingNode: dict}[type(node)]
        for option in options:
            if (typing.get_origin(option) or option) is shape:
                return _convert(option, node, key)
        raise _error(node, key, f"expected a string or a list of strings, got {_describe(node)}")
    if dataclasses.is_dataclass(tp):
        return _build(tp, node, key)
    if origin is list:
        if not isinstance(node, SequenceNode):
            raise _error(node, key, f"expected a list, got {_describe(node)}")
        return [_convert(args[0], item, _item_key(key, i, item)) for i, item in enumerate(node.value)]
    if isinstance(node, ScalarNode):
        try:
            value = yaml.constructor.SafeConstructor().construct_document(node)
        except (yaml.YAMLError, ValueError):  # an unknown !tag, or a date like 2024-13-45
            value = node.value
        if origin is Literal and value in args:
            return value
        if tp is str and value is not None and not isinstance(value, bool):
            return node.value  # `name: 2024` is a name, not a number
        if tp is float and isinstance(value, str) and _NUMBER.fullmatch(value):
            value = float(value)
        if tp is float and type(value) in (int, float) and math.isfinite(value):  # a bool is no number
            return float(value)
        if tp in (int, bool) and type(value) is tp:
            return value
    raise _error(node, key, f"expected {_expected(tp)}, got {_describe(node)}")


def _item_key(key: str, i: int, item: Node) -> str:
    # stages.dpo.loss.beta reads better than stages[1].loss.beta, and is how overrides spell it
    name = _child(item, "name") if isinstance(item, MappingNode) else None
    if isinstance(name, ScalarNode) and _IDENTIFIER.fullmatch(name.value):
        return f"{key}.{name.value}"
    return f"{key}[{i}]"


def _expected(tp) -> str:
    if typing.get_origin(tp) is Literal:
        return "one of " + ", ".join(typing.get_args(tp))
    return {str: "a string", int: "an integer", float: "a number", bool: "true or false"}[tp]
