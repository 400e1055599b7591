"""Who decides which reply is better, and how often a scorer agrees with held-out preferences.

- A judge scores each reply to a prompt: a reward (`align.rewards`), either learned (an `rm` stage's adapter
  and head, frozen on the shared base) or a rule reward card (`align.rewards.cards()`); the higher score
  wins the pair.
- Human verdicts are preference rows (`{prompt, chosen, rejected}`, any preference format) over this
  evaluation's own replies, such as `pairs.jsonl` rated by people: a row whose prompt and two replies are
  a stage's and the reference's replies to a prompt decides that pair.
- Pair accuracy: the share of held-out pairs whose chosen reply a scorer ranks above the rejected one, for
  the judge (reward-model accuracy) and for a DPO-family stage's implicit reward.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from align.data.collate import encode
from align.data.formats import load_examples
from align.models import adapters
from align.models.generation import evaluating
from align.models.logprobs import encoded_logprobs
from align.rewards import ModelSource, Reward, RewardSource, load_reward, reward_source
from align.rewards.sources import DEFAULT_LENGTHS
from align.stages.kind import kind_of

JUDGE_ADAPTER = "__judge__"  # never a stage name in practice: stages keep their own names as adapters


class Judge:
    """A reward as eval reports it: its scores as plain floats, for eval.json."""

    def __init__(self, reward: Reward):
        self.reward, self.name, self.kind = reward, reward.name, reward.kind

    def score(self, prompts, replies: list[str], rules: list[dict]) -> list[float]:
        return self.reward.score(prompts, replies, rules).tolist()


def judge_source(spec: str, run) -> RewardSource:
    """What judge `spec` names: an rm stage of `run`, a reward card or rule file, or any rm stage's folder."""
    if spec in {s.name for s in run.recipe.stages}:
        return ModelSource(model=run.adapter(spec))
    return reward_source(spec, others=f"an rm stage of {run.dir}, ")


def judge_folder(spec: str, run) -> str | None:
    """The adapter folder of a learned judge, which the evaluation loads with its stages'; None for a rule."""
    return judge_source(spec, run).adapter_folder


def load_judge(spec: str, run, model, tokenizer) -> Judge:
    """The judge `spec` names; a learned one becomes the frozen adapter `JUDGE_ADAPTER` of `model` (a PeftModel)."""
    source = judge_source(spec, run)
    lengths = _trained_lengths(source.adapter_folder) if source.adapter_folder else DEFAULT_LENGTHS
    return Judge(load_reward(source, model, tokenizer, JUDGE_ADAPTER, lengths))


def _trained_lengths(folder: str) -> tuple[int, int]:
    """(max_length, max_prompt_length) the rm stage that wrote `folder` trained with, read from its run's
    recipe (`RUN/STAGE/adapter`), so that texts are truncated as in training; the defaults where unknown."""
    from align.run_folder import RECIPE_FILE
    from align.runs import open_run

    adapter = Path(folder).resolve()
    if (adapter.parents[1] / RECIPE_FILE).is_file():
        for stage in open_run(adapter.parents[1]).recipe.stages:
            if stage.name == adapter.parent.name:
                return stage.train.max_length, stage.train.max_prompt_length
    return DEFAULT_LENGTHS


def pair_key(prompt: list[dict], first: str, second: str) -> str:
    return json.dumps([prompt, sorted([first.strip(), second.strip()])], ensure_ascii=False)


def load_human_verdicts(section) -> dict[str, str]:
    """pair_key -> the reply people preferred, from the preference rows of `section` (a DataConfig)."""
    loaded = load_examples(section.path, "preference", section.format, section.skip_bad_rows, section.max_rows)
    out = {}
    for ex in loaded.examples:
        chosen, rejected = ex.chosen[-1]["content"], ex.rejected[-1]["content"]
        out[pair_key(ex.prompt, chosen, rejected)] = chosen.strip()
    return out


def human_verdict(verdicts: dict[str, str], prompt, stage_reply: str, reference_reply: str) -> str | None:
    """"win" / "loss" / "tie" (the same reply twice) of a stage's reply, or None where nobody judged it."""
    if stage_reply.strip() == reference_reply.strip():
        return "tie"
    preferred = verdicts.get(pair_key(prompt, stage_reply, reference_reply))
    return None if preferred is None else "win" if preferred == stage_reply.strip() else "loss"


# --- agreement with held-out preferences ----------------------------------------------------------------


def judge_accuracy(judge: Judge, pairs) -> float | None:
    """Share of pairs whose chosen reply the judge scores higher; None for a judge that needs task rules."""
    if judge.reward.needs_rules:
        return None
    prompts = [ex.prompt for ex in pairs]
    chosen = judge.score(prompts, [ex.chosen[-1]["content"] for ex in pairs], [{}] * len(pairs))
    rejected = judge.score(prompts, [ex.rejected[-1]["content"] for ex in pairs], [{}] * len(pairs))
    return sum(c > r for c, r in zip(chosen, rejected)) / len(pairs)


def _logps(model, tokenizer, pairs, side: str, train_cfg, batch_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """[N] summed completion log-probs and [N] token counts of each pair's `side` reply, as training encoded them."""
    rows = [encode(tokenizer, ex.prompt, getattr(ex, side), train_cfg.max_length, train_cfg.max_prompt_length)
            for ex in pairs]
    with evaluating(model):
        sums, counts = encoded_logprobs(model, [(r.prompt_ids, r.completion_ids) for r in rows],
                                        tokenizer.pad_token_id, batch_size)
    return sums, counts.clamp(min=1)


def implicit_reward_accuracy(model, tokenizer, stage, policy: str, reference: str | None, pairs,
                             batch_size: int) -> float:
    """Share of pairs whose chosen reply gets the higher implicit reward, as the stage's own loss defines it
    (`implicit_reward` of align.losses.preference: the object its training called)."""
    reward = kind_of(stage).implicit_reward(stage)
    sides = {}
    for side in ("chosen", "rejected"):
        with adapters.using(model, policy):
            logps, lengths = _logps(model, tokenizer, pairs, side, stage.train, batch_size)
        ref_logps = None
        if reward.needs_reference:
            with adapters.using(model, reference):
                ref_logps, _ = _logps(model, tokenizer, pairs, side, stage.train, batch_size)
            ref_logps = ref_logps[:, None]
        sides[side] = reward.implicit_reward(logps[:, None], ref_logps, lengths[:, None])[:, 0]  # [N]
    return float((sides["chosen"] > sides["rejected"]).float().mean())
