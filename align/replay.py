"""Replay buffers: earlier data mixed back into later stages so that the model keeps what it knew.

Preference training moves a policy towards what the preference data rewards, and nothing holds the
rest in place: skills learned in SFT erode (InstructGPT's "alignment tax"). InstructGPT's answer was
the "ptx" term, pretraining log-likelihood added to the PPO objective. Here every stage that trains on
answers keeps a reservoir sample of its training data in `replay/buffer.jsonl` (`replay_out.size`
examples, with `replay/buffer.json` saying where they came from), and a later `dpo`, `rank`, `kto` or
`ppo` stage names one (`replay.source: ${sft.replay}`, the default) or any SFT-format corpus. Each
optimizer micro-step of that stage then adds

    L = L_stage + coef * NLL(buffer sequences)

over exactly `round(fraction * n / (1 - fraction))` buffer sequences next to the step's n training
sequences, so that buffer sequences are `fraction` of all the step's sequences. Which buffer
examples a step takes depends only on the seed and the step's position, so a resumed stage replays the
same examples as an uninterrupted one; while steps are of one size, no example repeats within a pass
over the buffer. The stage keeps the buffer it mixes in (`replay/mixed.jsonl`, with its provenance)
and a resumed stage reads that file back rather than sampling again.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path

import torch

from align.data.collate import encode
from align.data.formats import load_examples
from align.data.schemas import PreferenceExample, RankedExample, SFTExample, UnpairedExample
from align.losses.sft import sft_loss
from align.models.logprobs import completion_logprobs
from align.models.tokens import pad_sequences
from align.run_folder import REPLAY_BUFFER, REPLAY_DIR, REPLAY_MIXED, write_atomic


def as_sft(example) -> SFTExample | None:
    """The answer an example teaches, as an SFT example; None where it teaches none (prompts, bad answers)."""
    if isinstance(example, SFTExample):
        return example
    if isinstance(example, PreferenceExample):
        return SFTExample(example.prompt, example.chosen)
    if isinstance(example, RankedExample):
        return SFTExample(example.prompt, example.responses[example.scores.index(max(example.scores))])
    if isinstance(example, UnpairedExample) and example.desirable:
        return SFTExample(example.prompt, example.completion)
    return None


def reservoir_sample(items, size: int, seed) -> tuple[list, int]:
    """A uniform sample of `size` items from a stream of unknown length (Vitter's algorithm R), in
    stream order, and the number of items seen."""
    rng = random.Random(f"reservoir:{seed}")
    kept: list[tuple[int, object]] = []
    seen = 0
    for seen, item in enumerate(items, 1):
        if len(kept) < size:
            kept.append((seen, item))
        else:
            slot = rng.randrange(seen)
            if slot < size:
                kept[slot] = (seen, item)
    return [item for _, item in sorted(kept, key=lambda pair: pair[0])], seen


def write_buffer(folder: Path, name: str, examples: list[SFTExample], provenance: dict) -> Path:
    """`folder/<name>.jsonl` in the `messages` format (any SFT stage can read it) and its provenance in
    `folder/<name>.json`; written to temporary files and renamed, so a kill never leaves half a buffer."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{name}.jsonl"
    lines = [json.dumps({"messages": ex.prompt + ex.completion}) + "\n" for ex in examples]
    write_atomic(path, "".join(lines))
    write_atomic(folder / f"{name}.json", json.dumps(provenance, indent=2))
    return path


def read_provenance(buffer_path: str | Path) -> dict:
    meta = Path(buffer_path).with_suffix(".json")
    return json.loads(meta.read_text()) if meta.is_file() else {}


def keep_stage_sample(stage_dir: Path, stage_name: str, loaded, size: int, seed) -> Path | None:
    """Reservoir-sample the answers of a stage's training data into its `replay/buffer.jsonl`."""
    answers = (sft for sft in map(as_sft, loaded.examples) if sft is not None)
    sample, seen = reservoir_sample(answers, size, seed)
    if not sample:
        return None
    provenance = {"stage": stage_name, "source": loaded.source, "format": loaded.format,
                  "fingerprint": loaded.fingerprint, "seen": seen, "size": len(sample), "seed": seed}
    return write_buffer(stage_dir / REPLAY_DIR, REPLAY_BUFFER, sample, provenance)


def replay_count(fraction: float, sequences: int) -> int:
    """Buffer sequences to add to `sequences` training sequences so that they make up `fraction` of all."""
    return round(fraction * sequences / (1 - fraction))


@dataclass
class ReplayMixer:
    """Draws a stage's buffer sequences, step by step, and scores them.

    `rows` are encoded (prompt_ids, completion_ids); `position` counts the stage's micro-steps from 0.
    Position p takes the buffer slots p*n ... p*n + n - 1 of an endless stream of shuffled passes over
    the buffer, each pass shuffled by (seed, pass number): the draw is a pure function of the seed and
    the position, which is what makes it survive a resume.
    """

    rows: list[tuple[list[int], list[int]]]
    fraction: float
    coef: float
    seed: int
    pad_id: int

    def __post_init__(self):
        self._orders: dict[int, list[int]] = {}

    def _order(self, epoch: int) -> list[int]:
        if epoch not in self._orders:
            order = list(range(len(self.rows)))
            random.Random(f"replay:{self.seed}:{epoch}").shuffle(order)
            self._orders = {epoch: order}  # positions only move forward: one pass is enough to keep
        return self._orders[epoch]

    def indices(self, position: int, count: int) -> list[int]:
        slots = range(position * count, (position + 1) * count)
        return [self._order(slot // len(self.rows))[slot % len(self.rows)] for slot in slots]

    def loss(self, model, position: int, sequences: int) -> tuple[torch.Tensor, dict[str, float]]:
        """coef * NLL of this position's buffer sequences, next to `sequences` training sequences."""
        count = replay_count(self.fraction, sequences)
        if count == 0:
            return torch.zeros((), device=model.device), {}
        batch = pad_sequences([self.rows[i] for i in self.indices(position, count)], self.pad_id)
        batch = {k: v.to(model.device) for k, v in batch.items()}
        logps, tokens = completion_logprobs(model, batch["input_ids"], batch["attention_mask"],
                                            batch["completion_mask"])
        nll = sft_loss(logps, tokens)
        return self.coef * nll, {"replay/nll": float(nll.detach()), "replay/sequences": float(count),
                                 "replay/fraction": count / (count + sequences)}


def stage_mixer(stage, stage_dir: Path, tokenizer, loaded) -> ReplayMixer:
    """The mixer of a stage with `replay`, over the buffer it keeps in `replay/mixed.jsonl`: sampled from
    the source (`loaded`) on the stage's first start, read back from disk when it resumes."""
    cfg, seed = stage.replay, stage.train.seed
    path = stage_dir / REPLAY_DIR / f"{REPLAY_MIXED}.jsonl"
    if not path.is_file():
        examples, seen = loaded.examples, len(loaded.examples)
        if cfg.size is not None:
            examples, seen = reservoir_sample(examples, cfg.size, seed)
        provenance = {"source": loaded.source, "format": loaded.format, "fingerprint": loaded.fingerprint,
                      "source_provenance": read_provenance(loaded.source), "seen": seen, "size": len(examples),
                      "seed": seed, "fraction": cfg.fraction, "coef": cfg.coef}
        write_buffer(path.parent, REPLAY_MIXED, examples, provenance)
    examples = load_examples(str(path), "sft").examples
    encoded = [encode(tokenizer, ex.prompt, ex.completion, stage.train.max_length, stage.train.max_prompt_length)
               for ex in examples]
    return ReplayMixer([(e.prompt_ids, e.completion_ids) for e in encoded], cfg.fraction, cfg.coef, seed,
                       tokenizer.pad_token_id)
