"""`align collect judge`: AI feedback on every pair of a collection, from a reward model.

The judge is an `rm` stage (`RUN/STAGE`, its adapter and head on its run's base) or a reward card
(`align.rewards.cards()`) or rule file (cards that check task answers need prompts that carry a rule,
such as the embedded task's). It scores each response once; the higher reward wins the pair, and a gap of
at most `tie_margin` is a tie. The verdicts are stored as an annotator of their own (`rm:RUN/STAGE` or
`card:NAME`, kind "ai"), so the admin page and `align collect status` set them beside people's, and
`align collect export --who ai` turns them into training pairs (RLAIF). Judging again replaces that
judge's earlier verdicts.
"""

from __future__ import annotations

from align.annotation.store import Collection
from align.errors import AlignError
from align.stages.kind import kind_of

RM_STAGE = "an rm stage (RUN/STAGE, e.g. runs/my_recipe/rm), "  # what a judge may be besides a reward card


def load_collect_judge(spec: str):
    """(annotator name, Judge) for a reward card or rule file, or an rm stage `RUN/STAGE`; errors before
    loading a model where the spec is wrong."""
    from align.collect.generate import parse_source
    from align.eval.judges import Judge
    from align.rewards import load_reward, reward_source, rule_file

    target = None if rule_file(spec) else parse_source(spec)  # a card's name is no RUN/STAGE, whatever the cwd
    if target and target.run and kind_of(target.run.stage(target.stage)).produces == "reward":
        return f"rm:{target.label}", _rm_judge(target)
    source = reward_source(spec, others=RM_STAGE)
    if source.adapter_folder:
        raise AlignError(f"judge '{spec}': give its rm stage as RUN/STAGE, so that its run's base model loads")
    judge = Judge(load_reward(source))
    return f"card:{judge.name}", judge


def _rm_judge(target):
    """The Judge of an rm stage (an `align.collect.generate.Source`), its adapter loaded on its run's base."""
    from align.eval.judges import JUDGE_ADAPTER, load_judge
    from align.models.adapters import with_frozen
    from align.models.load import load_base

    base, tokenizer = load_base(target.run.recipe.model)
    model = with_frozen(base, {JUDGE_ADAPTER: target.run.adapter(target.stage)})
    return load_judge(target.stage, target.run, model, tokenizer)


def judge_collection(collection: Collection, spec: str, tie_margin: float = 0.0, quiet: bool = False) -> dict:
    """Judge every pair with `spec`; returns {judge, pairs, a, b, tie}."""
    from align.ui import work_progress

    if tie_margin < 0:
        raise AlignError(f"tie margin must be >= 0, got {tie_margin}")
    pairs = collection.pairs()
    if not pairs:
        raise AlignError(f"{collection.path}: no pairs to judge yet; add some with `align collect generate`")
    name, judge = load_collect_judge(spec)
    responses = {}  # response id -> (prompt, text, rule): each is scored once, however many pairs it is in
    for pair in pairs:
        for side in ("a", "b"):
            responses[pair[side]["id"]] = (pair["prompt"], pair[side]["text"], pair["rule"])
    if judge.reward.needs_rules and not all(rule for _, _, rule in responses.values()):
        raise AlignError(f"reward card '{judge.name}' checks task answers, but some prompts of {collection.path} "
                         "carry no rule; judge with an rm stage, or a card without task checks")
    ids, batch = list(responses), 32
    scores = {}
    with work_progress(f"judging with {name}", len(ids), quiet) as advance:
        for start in range(0, len(ids), batch):
            chunk = [responses[i] for i in ids[start:start + batch]]
            values = judge.score([c[0] for c in chunk], [c[1] for c in chunk], [c[2] for c in chunk])
            scores.update(zip(ids[start:start + batch], values))
            advance(len(chunk))
    verdicts = []
    for pair in pairs:
        ra, rb = scores[pair["a"]["id"]], scores[pair["b"]["id"]]
        choice = "tie" if abs(ra - rb) <= tie_margin else "a" if ra > rb else "b"
        verdicts.append((pair["pair_id"], choice, f"reward A {ra:.3f}, B {rb:.3f}"))
    collection.record_ai_verdicts(collection.add_annotator(name, kind="ai"), verdicts)
    counts = {c: sum(v[1] == c for v in verdicts) for c in ("a", "b", "tie")}
    return {"judge": name, "pairs": len(verdicts), **counts}
