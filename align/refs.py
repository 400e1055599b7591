"""`${stage.output}` references between a recipe's stages: parsed when a recipe is validated, resolved
by the pipeline once the earlier stage has produced its output."""

from __future__ import annotations

import dataclasses
import re

from align.errors import ConfigError
from align.yaml_binding import IDENTIFIER

_REF = re.compile(r"\$\{([^}]*)\}")


@dataclasses.dataclass(frozen=True)
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
        if not (IDENTIFIER.fullmatch(stage) and IDENTIFIER.fullmatch(output)):
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


def resolve_all_refs(value, outputs: dict[str, dict[str, str]]):
    """A copy of `value` (a stage config, or any dataclass, list or string) with every reference resolved."""
    if isinstance(value, str):
        return resolve_refs(value, outputs)
    if isinstance(value, list):
        return [resolve_all_refs(v, outputs) for v in value]
    if dataclasses.is_dataclass(value):
        changes = {f.name: resolve_all_refs(getattr(value, f.name), outputs)
                   for f in dataclasses.fields(value) if f.init}
        return dataclasses.replace(value, **changes)
    return value


