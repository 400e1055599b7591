"""`align collect judge`: AI feedback on every pair of a collection, from a reward model.

The judge is an `rm` stage (`RUN/STAGE`, its adapter and head on its run's base) or a reward card in
`reward_models/` (a rule; cards that check task answers need prompts that carry a rule, such as the
embedded task's). It scores each response once; the higher reward wins the pair, and a gap of at most
`tie_margin` is a tie. The verdicts are stored as an annotator of their own (`rm:RUN/STAGE` or
`card:NAME`, kind "ai"), so the admin page and `align collect status` set them beside people's, and
`align collect export --who ai` turns them into training pairs (RLAIF). Judging again replaces that
judge's earlier verdicts.
"""

from __future__ import annotations

from align.collect.store import Collection
from align.errors import AlignError


def load_collect_judge(spec: str):
    """(annotator name, Judge) for a reward card or an rm stage `RUN/STAGE`; errors before loading a model
    where the spec is wrong."""
    from align.eval.judges import JUDGE_ADAPTER, Judge, load_judge
    from align.rewards import find_rule_file, load_reward

    rule_file = find_rule_file(spec)
    if rule_file:
        return f"card:{rule_file.stem}", Judge(rule_file.stem, "rule", load_reward(str(rule_file)))
    from align.collect.generate import parse_source
    from align.models.load import load_base
    from align.runs import with_adapters

    source = parse_source(spec)
    if source.run is None or source.run.stage(source.stage).kind != "rm":
        raise AlignError(f"judge '{spec}': not a reward card in reward_models/ nor an rm stage (RUN/STAGE, "
                         "e.g. runs/my_recipe/rm)")
    base, tokenizer = load_base(source.run.recipe.model)
    model = with_adapters(base, {JUDGE_ADAPTER: source.run.adapter(source.stage)})
    return f"rm:{source.label}", load_judge(source.stage, source.run, model, tokenizer)


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
    if judge.kind == "rule" and judge.reward.needs_rules and not all(rule for _, _, rule in responses.values()):
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
