"""The one frozen base of a run, an evaluation or a chat: loaded at most once, lent out with adapters on top, and
always handed back bare, whatever happens while it is lent.

Whoever needs the model borrows it in a `with` block: `host.policy(lora, init)` for a stage that trains a new
adapter (or a copy of `init`), `host.adapters({name: folder})` for frozen adapters (evaluation, forgetting,
judges), `host.bare()` for the base alone. On leaving the block the LoRA layers come out and the base is back in
inference mode with its KV cache on (`give_back`), so what one borrower did cannot change what the next computes.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager

from align.models import adapters, load
from align.models.load import ResolvedBase, give_back
from align.settings import ModelConfig

Loader = Callable[[ModelConfig, ResolvedBase], tuple]


class ModelHost:
    def __init__(self, model_cfg: ModelConfig, resolved: ResolvedBase | None = None, loader: Loader | None = None):
        self.model_cfg = model_cfg
        self.resolved = resolved or load.resolve_base(model_cfg.base)
        # (model config, resolved base) -> (base, tokenizer); load_base, or a wrapper that also reports or measures
        self.loader = loader or load.load_base
        self._base = self._tokenizer = None

    @property
    def tokenizer(self):
        self.load()
        return self._tokenizer

    def load(self):
        """Load the base now if it is not loaded yet (borrowing loads it anyway). Loading may draw random numbers
        (the tiny fallback model is random weights), so a caller that seeds a stage loads first."""
        if self._base is None:
            self._base, self._tokenizer = self.loader(self.model_cfg, self.resolved)
        return self._base

    @contextmanager
    def _lent(self, model) -> Iterator:
        try:
            yield model
        finally:
            self._base = give_back(model)

    def bare(self):
        """The base alone, as loaded."""
        return self._lent(self.load())

    def policy(self, init: str | None = None):
        """A PeftModel whose trainable `policy` adapter is new (the model config's LoRA), or a copy of the adapter
        folder `init`."""
        return self._lent(adapters.with_policy(self.load(), self.model_cfg.lora, init=init))

    def adapters(self, folders: dict[str, str]):
        """The base with each folder's adapter frozen under its name (a PeftModel), or the base alone for none."""
        return self._lent(adapters.with_frozen(self.load(), folders))
