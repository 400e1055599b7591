"""The `label` stage: one round of the closed loop's annotation. Iterative (online) DPO samples new pairs from the
improved policy every round (Xiong et al. 2024, "Iterative Preference Learning from Human Feedback"; Xu et al. 2023,
"Some things are more CRINGE than others"); a round is a `label` stage and the `dpo` (or `rank`) stage that trains on
what it labelled, the next round's `label` stage sampling from that stage's adapter.

The stage takes its round's share of the prompt pool (`pool: new`: prompts the earlier rounds did not use; `all`: the
same prompts every round), samples `candidates` responses to each from the policy `init`, and makes every two distinct
responses to a prompt a candidate pair. Of those, `budget` go to the annotators, chosen by `select`
(align.stages.selection): `uncertainty` fits its ensemble on the `labelled` rows of the earlier rounds, `margin` asks
the policy against its `reference`; round 1, with nothing labelled, is random in every arm. The annotators here are a
judge standing in for people: a reward card, rule file or rm stage scores both responses and prefers the higher
(`annotator.judge`), seen by `annotator.people` simulated annotators who each flip a verdict with probability
`annotator.flip` (seeded): what a study of selection under annotator noise needs.

Agreement-aware labels: a pair's label is its annotators' majority (a tie of votes, or a tie of the judge's scores,
labels nothing); a pair whose majority is smaller than `annotator.min_agreement` is dropped. Where two or more people
judged, the stage measures how often two of them agree (p) and records the flip rate that would explain it: with
each person flipping independently with probability ε, p = ε² + (1 − ε)², so ε = (1 − √(2p − 1)) / 2, the
label smoothing of conservative DPO (cDPO, Mitchell 2023) that fits these labels (`flip_rate` in stage.json; a dpo
stage with `loss.smooth_by_agreement` trains with it).

The stage folder keeps the round: `candidates.jsonl` (every sampled response), `selection.jsonl` (every pair and its
selection score, `selected` in the order chosen), `verdicts.jsonl` (each annotator's verdict on each selected pair)
and `labels.jsonl` (`${<stage>.labels}`: preference rows the next stage trains on). Each is written once, whole; a
rerun of an interrupted stage reads back what it finds and does only the rest.
"""

from __future__ import annotations

import json
import random
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from align.annotation.store import Candidates, Collection
from align.data.collate import encode
from align.data.formats import load_examples
from align.errors import AlignError, require
from align.method_configs import ReplayOutConfig
from align.models import adapters
from align.models.features import completion_features
from align.models.generation import Decoding, generate
from align.models.logprobs import encoded_logprobs
from align.rewards.sources import load_reward
from align.run_folder import LABELS_FILE, read_jsonl, write_jsonl
from align.settings import StageConfig
from align.stages.agreement import agreement_counts, flip_rate
from align.stages.engine import StageContext, StageOutput
from align.stages.kind import StageKind, register
from align.stages.selection import STRATEGIES, BootstrapEnsemble, select
from align.ui import console, work_progress

POLICY, REFERENCE = "policy", "ref"


@dataclass(kw_only=True)
class AnnotatorConfig:
    """Who labels a round's pairs: people, through a collection file that `align collect serve` serves them from, or
    a judge that stands in for `people` annotators."""

    collection: str | None = None  # a collection file (made where there is none): the round waits for its verdicts
    overlap: int = 1  # collection: people per pair
    poll_seconds: float = 2.0  # collection: how often the waiting round looks for new verdicts
    judge: str | None = None  # a reward card, a rule file, or an rm stage's folder (${rm.adapter})
    people: int = 1  # judge: simulated annotators per pair
    flip: float = 0.0  # judge: the probability that a simulated annotator reverses the judge's verdict
    min_agreement: float = 0.0  # drop pairs whose majority is a smaller share of their annotators than this

    def __post_init__(self):
        require((self.collection is None) != (self.judge is None), "judge",
                "give a collection (people annotate) or a judge (it stands in for them), one of the two")
        require(self.overlap >= 1 and self.poll_seconds > 0, "overlap", "overlap must be >= 1, poll_seconds > 0")
        require(self.people >= 1, "people", f"must be >= 1, got {self.people}")
        require(self.judge is not None or (self.people, self.flip) == (1, 0.0), "people",
                "people and flip simulate annotators around a judge; a collection's people are real")
        require(0 <= self.flip < 0.5, "flip", f"must be in [0, 0.5), got {self.flip}")
        require(0 <= self.min_agreement <= 1, "min_agreement", f"must be in [0, 1], got {self.min_agreement}")


@dataclass(kw_only=True)
class LabelStageConfig(StageConfig):
    """One round of the closed loop: sample candidates from `init`, choose `budget` pairs, have them judged. Its
    `train` section's batch_size, max_length and max_prompt_length batch and truncate the sampling and scoring."""

    kind: str = "label"
    round: int = 1  # which round: its share of the prompt pool; round 1 selects at random
    prompts: int = 64  # prompts a round samples candidates for
    pool: str = "new"  # new: each round the next `prompts` prompts of `data`; all: the first `prompts` every round
    candidates: int = 4  # responses sampled per prompt
    budget: int = 64  # pairs labelled this round
    select: str = "random"  # random | uncertainty | margin | diverse (align.stages.selection)
    labelled: list[str] = field(default_factory=list)  # the earlier rounds' labels (${r1_labels.labels}, ...)
    reference: str | None = None  # margin: the implicit reward's reference adapter; None = the bare base
    beta: float = 0.1  # margin: the implicit reward's β
    members: int = 8  # uncertainty: bootstrap heads in the ensemble
    temperature: float = 1.0
    max_new_tokens: int = 32
    annotator: AnnotatorConfig  # required
    replay_out: ReplayOutConfig | None = None  # its data are prompts, which no later stage replays

    def __post_init__(self):
        super().__post_init__()
        require(self.init is not None, "init", "a label stage samples from a policy: give its adapter (${sft.adapter})")
        require(self.round >= 1, "round", f"must be >= 1, got {self.round}")
        require(self.prompts >= 1 and self.budget >= 1, "budget", "prompts and budget must be >= 1")
        require(self.candidates >= 2, "candidates", f"a pair needs two responses: got {self.candidates}")
        require(self.pool in ("new", "all"), "pool", f"must be 'new' or 'all', got {self.pool!r}")
        require(self.select in STRATEGIES, "select", f"must be one of {', '.join(STRATEGIES)}, got {self.select!r}")


def round_prompts(stage, examples: list) -> list:
    """The round's share of the prompt pool."""
    start = (stage.round - 1) * stage.prompts if stage.pool == "new" else 0
    if len(examples) < start + stage.prompts:
        raise AlignError(f"stage '{stage.name}': round {stage.round} takes prompts {start + 1}-{start + stage.prompts}"
                         f" of its data, which has {len(examples)}: give more prompts, or fewer per round")
    return examples[start : start + stage.prompts]


def sample_candidates(model, ctx: StageContext, stage, prompts: list, seed: int) -> list[dict]:
    """[{prompt, rule, responses}]: each prompt's distinct, non-empty sampled responses."""
    decoding = Decoding(max_new_tokens=stage.max_new_tokens, do_sample=True, temperature=stage.temperature, seed=seed)
    repeated = [ex.prompt for ex in prompts for _ in range(stage.candidates)]
    with adapters.using(model, POLICY):
        replies = generate(model, ctx.tokenizer, repeated, decoding, stage.train.batch_size)
    out = []
    for i, ex in enumerate(prompts):
        texts = [r.text for r in replies[i * stage.candidates : (i + 1) * stage.candidates] if r.text.strip()]
        out.append({"prompt": ex.prompt, "rule": ex.rule, "responses": list(dict.fromkeys(texts))})
    return out


def candidate_pairs(candidates: list[dict]) -> list[dict]:
    return [{"prompt": p, "a": i, "b": j} for p, c in enumerate(candidates)
            for i in range(len(c["responses"])) for j in range(i + 1, len(c["responses"]))]


def _encoded(ctx: StageContext, stage, prompt: list[dict], text: str):
    e = encode(ctx.tokenizer, prompt, [{"role": "assistant", "content": text}], stage.train.max_length,
               stage.train.max_prompt_length)
    return e.prompt_ids, e.completion_ids


def _encoded_responses(ctx: StageContext, stage, candidates: list[dict]) -> tuple[list, dict]:
    """Every candidate response encoded, and where (prompt, response) is in that list."""
    encoded, index = [], {}
    for p, c in enumerate(candidates):
        for i, text in enumerate(c["responses"]):
            index[p, i] = len(encoded)
            encoded.append(_encoded(ctx, stage, c["prompt"], text))
    return encoded, index


def preference_ensemble(model, ctx: StageContext, stage, candidates: list[dict], pairs: list[dict],
                        labelled: list, seed: int = 0) -> tuple[BootstrapEnsemble, torch.Tensor]:
    """The ensemble fitted on the `labelled` preference examples, and the feature differences f_a − f_b [P, H] of
    `pairs`, all under the policy."""
    encoded, index = _encoded_responses(ctx, stage, candidates)
    known = [(_encoded(ctx, stage, ex.prompt, ex.chosen[-1]["content"]),
              _encoded(ctx, stage, ex.prompt, ex.rejected[-1]["content"])) for ex in labelled]
    pad, batch = ctx.tokenizer.pad_token_id, stage.train.batch_size
    with adapters.using(model, POLICY):
        features = completion_features(model, encoded, pad, batch)  # [N, H]
        chosen = completion_features(model, [c for c, _ in known], pad, batch)  # [L, H]
        rejected = completion_features(model, [r for _, r in known], pad, batch)  # [L, H]
    ensemble = BootstrapEnsemble(chosen - rejected, torch.ones(len(known)), members=stage.members, seed=seed)
    a = [index[q["prompt"], q["a"]] for q in pairs]
    b = [index[q["prompt"], q["b"]] for q in pairs]
    return ensemble, features[a] - features[b]


def selection_scores(model, ctx: StageContext, stage, candidates: list[dict], pairs: list[dict],
                     labelled: list, seed: int = 0) -> list[float]:
    """Each pair's worth of a label under the stage's strategy (higher: more), or zeros where it needs none."""
    if stage.select == "uncertainty":
        ensemble, differences = preference_ensemble(model, ctx, stage, candidates, pairs, labelled, seed)
        return ensemble.disagreement(differences).tolist()
    if stage.select != "margin":
        return [0.0] * len(pairs)
    encoded, index = _encoded_responses(ctx, stage, candidates)
    pad, batch = ctx.tokenizer.pad_token_id, stage.train.batch_size
    with adapters.using(model, POLICY):
        policy = encoded_logprobs(model, encoded, pad, batch)[0]  # [N]
    with adapters.using(model, REFERENCE if stage.reference else None):
        reference = encoded_logprobs(model, encoded, pad, batch)[0]  # [N]
    reward = stage.beta * (policy - reference)  # [N] the implicit reward of every response
    a = torch.tensor([index[q["prompt"], q["a"]] for q in pairs])
    b = torch.tensor([index[q["prompt"], q["b"]] for q in pairs])
    return (-(reward[a] - reward[b]).abs()).tolist()


def judge_pairs(model, ctx: StageContext, stage, candidates: list[dict], chosen: list[dict], seed: int) -> list[dict]:
    """Each selected pair's verdicts: the judge's, as each simulated annotator gives it ('a', 'b' or 'tie')."""
    reward = load_reward(stage.annotator.judge, model, ctx.tokenizer,
                         lengths=(stage.train.max_length, stage.train.max_prompt_length))
    prompts, texts, rules = [], [], []
    for pair in chosen:
        c = candidates[pair["prompt"]]
        for side in ("a", "b"):
            prompts.append(c["prompt"]), texts.append(c["responses"][pair[side]]), rules.append(c["rule"])
    scores = reward.score(prompts, texts, rules).tolist()
    rng = random.Random(seed)
    out = []
    for n, pair in enumerate(chosen):
        s_a, s_b = scores[2 * n], scores[2 * n + 1]
        truth = "tie" if s_a == s_b else ("a" if s_a > s_b else "b")
        people = [truth if truth == "tie" or rng.random() >= stage.annotator.flip else {"a": "b", "b": "a"}[truth]
                  for _ in range(stage.annotator.people)]
        out.append({**pair, "scores": [s_a, s_b], "verdicts": people})
    return out


def collect_verdicts(stage, candidates: list[dict], chosen: list[dict], quiet: bool) -> list[dict]:
    """Each selected pair's verdicts from people: the pairs go into the collection file (those in it already keep their
    verdicts), and the round waits until each has `overlap` of them. A run killed meanwhile loses nothing: the
    verdicts are the collection's, and the rerun adds nothing new and waits for the rest."""
    annotator, key = stage.annotator, lambda prompt: json.dumps(prompt, ensure_ascii=False, sort_keys=True)
    collection = Collection.create(annotator.collection)
    if collection.overlap != annotator.overlap:
        collection.set_overlap(annotator.overlap)
    texts = [(candidates[p["prompt"]], p["a"], p["b"]) for p in chosen]
    collection.add([Candidates(c["prompt"], [(c["responses"][a], stage.name), (c["responses"][b], stage.name)],
                               c["rule"] or None) for c, a, b in texts], pairs="within")
    stored = {(key(q["prompt"]), q["a"]["text"], q["b"]["text"]): q["pair_id"] for q in collection.pairs()}
    ids = []  # each chosen pair's id in the collection, and whether the collection's `a` is its `a`
    for c, a, b in texts:
        ours = (key(c["prompt"]), c["responses"][a], c["responses"][b])
        swapped = (ours[0], ours[2], ours[1])
        ids.append((stored[ours], True) if ours in stored else (stored[swapped], False))
    wanted = {pair_id for pair_id, _ in ids}
    console.print(f"round {stage.round}: {len(wanted)} pairs wait for {annotator.overlap} verdict(s) each in "
                  f"{annotator.collection} (`align collect serve {annotator.collection} --annotator NAME`)",
                  soft_wrap=True)
    with work_progress(f"round {stage.round}: pairs judged", len(wanted), quiet) as advance:
        done = 0
        while True:
            complete = len(collection.complete_pairs() & wanted)
            advance(complete - done)
            done = complete
            if done == len(wanted):
                break
            time.sleep(annotator.poll_seconds)
    given: dict[int, list[dict]] = {}
    for v in collection.verdicts():
        if v["kind"] == "human" and v["pair_id"] in wanted:
            given.setdefault(v["pair_id"], []).append(v)
    in_our_order = {True: {"a": "a", "b": "b"}, False: {"a": "b", "b": "a"}}  # tie and both bad prefer neither
    return [{**pair, "scores": None, "annotators": [v["annotator"] for v in given[pair_id]],
             "verdicts": [in_our_order[same].get(v["choice"], "tie") for v in given[pair_id]]}
            for pair, (pair_id, same) in zip(chosen, ids)]


def labels_from(verdicts: list[dict], candidates: list[dict], stage) -> tuple[list[dict], dict]:
    """Preference rows of the pairs with a clear enough majority, and what became of the others."""
    rows, counts = [], {"ties": 0, "split": 0, "low_agreement": 0}
    for v in verdicts:
        votes = [x for x in v["verdicts"] if x != "tie"]
        n_a, n_b = votes.count("a"), votes.count("b")
        if not votes:
            counts["ties"] += 1
        elif n_a == n_b:
            counts["split"] += 1
        elif max(n_a, n_b) / len(v["verdicts"]) < stage.annotator.min_agreement:
            counts["low_agreement"] += 1
        else:
            c = candidates[v["prompt"]]
            win, lose = (v["a"], v["b"]) if n_a > n_b else (v["b"], v["a"])
            rows.append({"prompt": c["prompt"], "chosen": [{"role": "assistant", "content": c["responses"][win]}],
                         "rejected": [{"role": "assistant", "content": c["responses"][lose]}],
                         "round": stage.round, "agreement": max(n_a, n_b) / len(v["verdicts"])})
    return rows, counts


def run(stage, ctx: StageContext, data) -> StageOutput:
    seed = (stage.train.seed if stage.train.seed is not None else ctx.seed) * 1000 + stage.round
    prompts = round_prompts(stage, data["train"].examples)
    labelled = [ex for path in stage.labelled for ex in load_examples(path, "preference").examples]
    strategy = stage.select if labelled else "random"  # nothing labelled yet: every strategy's first round
    if strategy != stage.select and stage.round > 1:
        console.print(f"[yellow]{stage.name}[/]: select {stage.select} needs the earlier rounds' labels "
                      "(`labelled`), and there are none: this round selects at random")
    folders = {POLICY: stage.init, **({REFERENCE: stage.reference} if strategy == "margin" and stage.reference else {})}
    files = {name: ctx.stage_dir / f"{name}.jsonl" for name in ("candidates", "selection", "verdicts")}
    with ctx.host.adapters(folders) as model:
        candidates = read_jsonl(files["candidates"])
        if candidates is None:
            console.print(f"round {stage.round}: sampling {stage.candidates} responses to {len(prompts)} prompts")
            candidates = sample_candidates(model, ctx, stage, prompts, seed)
            write_jsonl(files["candidates"], candidates)
        pairs = read_jsonl(files["selection"])
        if pairs is None:
            pairs = candidate_pairs(candidates)
            scores = selection_scores(model, ctx, stage, candidates, pairs, labelled, seed)
            order = select(scores, [p["prompt"] for p in pairs], stage.budget, strategy, seed)
            rank = {i: n for n, i in enumerate(order)}
            pairs = [{**p, "score": s, "selected": rank.get(i)} for i, (p, s) in enumerate(zip(pairs, scores))]
            write_jsonl(files["selection"], pairs)
        verdicts = read_jsonl(files["verdicts"])
        if verdicts is None:
            chosen = sorted((p for p in pairs if p["selected"] is not None), key=lambda p: p["selected"])
            verdicts = (judge_pairs(model, ctx, stage, candidates, chosen, seed) if stage.annotator.judge
                        else collect_verdicts(stage, candidates, chosen, ctx.quiet))
            write_jsonl(files["verdicts"], verdicts)
    rows, dropped = labels_from(verdicts, candidates, stage)
    write_jsonl(ctx.stage_dir / LABELS_FILE, rows)
    agree, comparisons = agreement_counts(verdicts)
    metrics = {"pairs": len(pairs), "selected": len(verdicts), "labels": len(rows), **dropped}
    extra = {"round": stage.round, "selection": strategy, "agreement": {
        "agreeing": agree, "comparisons": comparisons, "pairwise": agree / comparisons,
        "flip_rate": flip_rate(agree / comparisons)} if comparisons else None}
    console.print(f"round {stage.round}: {len(rows)} labels from {len(verdicts)} pairs chosen ({strategy}) of "
                  f"{len(pairs)}")
    return StageOutput(Path(stage.init), metrics, extra=extra)


register(StageKind("label", LabelStageConfig, run, data="prompt", produces="data", multi_process=False))
