"""`align eval RUN`: did each stage make the model better, and what did it cost?

Every chosen stage (and the reference: by default the last sft stage, else the base) answers the same
prompts, greedy or sampled, as adapters on the one base. Then, per stage:
- win rate against the reference's replies, by the judge (an rm stage or a reward card) and by people
  (human verdicts over this evaluation's `pairs.jsonl`), with a Wilson interval, and the length-controlled
  win rate (`align.eval.metrics`);
- the judge's mean reward, the mean reply length, the exact per-token KL(stage || reference) along the
  stage's replies (`align.eval.kl`), rule-checked task accuracy on prompts that carry a rule;
- on held-out preference pairs: the judge's accuracy (reward-model accuracy) and each DPO-family stage's
  implicit-reward accuracy (`align.eval.judges`);
- what the stage forgot (measured by `align run`, read from its stage.json) and its training curves.

Everything lands in `RUN/eval/`: eval.json (the report's only input), report.html with plots/, and
pairs.jsonl, each stage's reply next to the reference's, for people to judge. Replies are cached by the
base model's identity (align.models.identity), the adapter's fingerprint, prompts and decoding, so evaluating
again after one stage changed regenerates only that stage; eval.json is reused as a whole while nothing it
depends on changed.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict
from pathlib import Path

from align.config import EvalConfig
from align.data.formats import load_examples
from align.eval import judges, metrics
from align.eval.forgetting import adapter_fingerprint
from align.eval.kl import kl_along
from align.eval.tasks import score_answers
from align.models.generation import Decoding, Reply, generate
from align.models.host import ModelHost
from align.models.identity import base_identity, machine
from align.refs import resolve_refs
from align.run_folder import StageFolder, identity_hash
from align.runs import BASE, Run, acting_as
from align.stages.kind import kind_of
from align.ui import console, work_progress


def _load(section, kind: str):
    return (load_examples(section.path, kind, section.format, section.skip_bad_rows, section.max_rows)
            if section else None)


def default_reference(recipe) -> str:
    """The last stage trained on demonstrations (SFT), else the base."""
    return next((s.name for s in reversed(recipe.stages) if kind_of(s).demonstrations), BASE)


def default_judge(run) -> str | None:
    """The last finished reward model."""
    return next((s.name for s in reversed(run.recipe.stages)
                 if kind_of(s).produces == "reward" and s.name in run.finished()), None)


def default_preferences(recipe):
    """The held-out pairs of the first stage that has them (an rm or dpo stage's)."""
    return next((s.eval_data for s in recipe.stages if kind_of(s).heldout_pairs and s.eval_data), None)


def prompt_text(prompt: list[dict]) -> str:
    """The prompt as a person reads it: the question, or the whole conversation when it has turns."""
    if len(prompt) == 1:
        return prompt[0]["content"]
    return "\n\n".join(f"{m['role']}: {m['content']}" for m in prompt)


def _curves(stage_dir: Path, keys: tuple[str, ...]) -> dict[str, list]:
    """The training curves of `keys` (what the stage's kind plots) that the stage logged."""
    curves: dict[str, list] = {}
    for row in StageFolder(stage_dir).metrics.records():
        for key in keys:
            if isinstance(row.get(key), (int, float)):
                curves.setdefault(key, []).append([row["step"], row[key]])
    return {key: points for key, points in curves.items() if len(points) > 1}  # one point (a final eval) is no curve


class Evaluation:
    """One run's evaluation with settings `cfg` (an EvalConfig); `run()` returns eval.json's dict."""

    def __init__(self, run: Run, cfg: EvalConfig, out_dir: Path, host: ModelHost | None = None, quiet: bool = False,
                 identity: dict | None = None):
        self.run_, self.cfg, self.out_dir, self.quiet = run, cfg, Path(out_dir), quiet
        recipe = run.recipe
        self.host = host or ModelHost(recipe.model)  # loads the base only if something is not cached
        cfg.check_stages(recipe.stages)
        self.reference = cfg.reference or default_reference(recipe)
        chosen = cfg.stages or [BASE, *(s for s in run.finished() if kind_of(run.stage(s)).policy)]
        self.stages = [self.reference] + [s for s in chosen if s != self.reference]
        for name in self.stages:
            run.adapter(name)  # unknown or unfinished stages fail here, before anything loads
        self.judge_spec = cfg.judge or default_judge(run)
        self.judge_folder = judges.judge_folder(self.judge_spec, run) if self.judge_spec else None
        self.tasks = _load(cfg.tasks, "task")
        self.prompts = _load(cfg.prompts, "prompt") or self.tasks
        self.preferences = _load(cfg.preferences or default_preferences(recipe), "preference")
        self.verdicts = judges.load_human_verdicts(cfg.verdicts) if cfg.verdicts else {}
        self.decoding = Decoding(cfg.max_new_tokens, cfg.do_sample, cfg.temperature, cfg.top_p, cfg.seed)
        self.identity = identity or base_identity(recipe.model, self.host.resolved)  # the caller's, where it has it
        self.key = identity_hash({
            "base": self.identity,
            "settings": asdict(cfg), "reference": self.reference, "stages": self.stages, "judge": self.judge_spec,
            "data": [d.fingerprint if d else None for d in (self.tasks, self.prompts, self.preferences)],
            "verdicts": sorted(self.verdicts.items()),
            "adapters": {s: adapter_fingerprint(run.adapter(s)) for s in self.stages},
            "judge_adapter": adapter_fingerprint(self.judge_folder),
        })

    # --- models -----------------------------------------------------------------------------------

    def _adapter_folders(self) -> dict[str, str]:
        """Every adapter this evaluation needs, by name: the stages', and the references of DPO-family stages."""
        folders = {s: self.run_.adapter(s) for s in self.stages if s != BASE}
        for name in self._implicit_stages():
            ref = self._stage_reference(name)
            if ref and ref not in folders.values():
                folders[f"__{name}_reference__"] = ref
        return folders

    def _stage_reference(self, name: str) -> str | None:
        stage = self.run_.stage(name)
        outputs = {s.name: self.run_.outputs(s.name) for s in self.run_.recipe.stages}
        ref = stage.reference or stage.init
        return resolve_refs(ref, outputs) if ref else None

    def _labels_before(self, name: str) -> dict | None:
        """The closed loop's budget by the time `name` trained: what the label stages before it in the recipe sent to
        annotators (`spent`) and got labels for (`kept`); None where none came before it."""
        if name == BASE:
            return None
        order = [s.name for s in self.run_.recipe.stages]
        rounds = [self.run_.state(s)["metrics"] for s in order[:order.index(name)]
                  if kind_of(self.run_.stage(s)).produces == "data"]
        if not rounds:
            return None
        return {"spent": sum(r["selected"] for r in rounds), "kept": sum(r["labels"] for r in rounds)}

    def _implicit_stages(self) -> list[str]:
        if self.preferences is None:
            return []
        return [s for s in self.stages if s != BASE and kind_of(self.run_.stage(s)).implicit_reward]

    def _adapter_name(self, folder: str | None, folders: dict[str, str]) -> str | None:
        return next((name for name, f in folders.items() if f == folder), None)

    @property
    def tokenizer(self):
        return self.host.tokenizer

    def _folders(self) -> dict[str, str]:
        folders = self._adapter_folders()
        if self.judge_folder:
            folders[judges.JUDGE_ADAPTER] = self.judge_folder
        return folders  # none, and the base alone, where rules judge the base

    # --- measurements ---------------------------------------------------------------------------------

    def _replies(self, model, name: str, examples) -> list[Reply]:
        """`name`'s replies to `examples`' prompts, from the cache when this adapter answered them before."""
        cache_path = self.out_dir / "cache" / "replies.json"
        cache = json.loads(cache_path.read_text()) if cache_path.is_file() else {}
        key = identity_hash([self.identity, adapter_fingerprint(self.run_.adapter(name)),
                             [ex.prompt for ex in examples], asdict(self.decoding)])
        if key not in cache:
            with work_progress(f"replies of {name}", len(examples), self.quiet) as advance, acting_as(model, name):
                replies = generate(model, self.tokenizer, [ex.prompt for ex in examples], self.decoding,
                                   self.cfg.batch_size, on_batch=advance)
            cache[key] = [asdict(r) for r in replies]
            cache_path.parent.mkdir(parents=True, exist_ok=True)
            cache_path.write_text(json.dumps(cache))
        return [Reply(**r) for r in cache[key]]

    def run(self) -> dict:
        cached_path = self.out_dir / "eval.json"
        if cached_path.is_file():
            cached = json.loads(cached_path.read_text())
            if cached.get("key") == self.key:
                console.print(f"[green]skip[/] eval of {self.run_.name}: results for these stages and settings exist")
                return cached
        folders = self._folders()
        with self.host.adapters(folders) as model:
            result = self._measure(model, folders)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        cached_path.write_text(json.dumps(result, indent=1))
        self._write_pairs(result)
        return result

    def _measure(self, model, folders: dict[str, str]) -> dict:
        examples = self.prompts.examples
        prompts = [ex.prompt for ex in examples]
        replies = {name: self._replies(model, name, examples) for name in self.stages}
        task_replies = replies
        if self.tasks and self.tasks is not self.prompts:
            task_replies = {name: self._replies(model, name, self.tasks.examples) for name in self.stages}
        judge = judges.load_judge(self.judge_spec, self.run_, model, self.tokenizer) if self.judge_spec else None
        rewards = self._judge_scores(judge, examples, replies) if judge else {}
        kls = self._kls(model, prompts, replies)
        implicit = self._implicit_accuracies(model, folders)
        graded = {name: score_answers(self.tasks.examples, [r.text for r in task_replies[name]]) if self.tasks else {}
                  for name in self.stages}
        stages = {}
        for name in self.stages:
            lengths = [len(r.ids) for r in replies[name]]
            forgetting = self.run_.state(name).get("forgetting") if name != BASE else None
            stages[name] = {
                "kind": BASE if name == BASE else self.run_.stage(name).kind,
                "is_reference": name == self.reference,
                "lengths": lengths,
                "mean_length": sum(lengths) / len(lengths),
                "rewards": rewards.get(name),
                "mean_reward": sum(rewards[name]) / len(rewards[name]) if name in rewards else None,
                **self._comparison(name, prompts, replies, rewards),
                "kl_to_reference": kls.get(name),
                "task_accuracy": graded[name].get("accuracy"),
                "task_accuracy_change": self._accuracy_change(graded, name),
                "task_correct": graded[name].get("correct"),  # per task prompt, for paired comparisons of any two
                "labels": self._labels_before(name),
                "task_per_family": graded[name].get("per_family") or None,
                "implicit_reward_accuracy": implicit.get(name),
                "forgetting": {k: v for k, v in forgetting.items() if k != "key"} if forgetting else None,
            }
        judge_info = None
        if judge:
            accuracy = None
            if self.preferences:
                accuracy = self._measured_in_training(self.judge_spec, "eval_accuracy")
                if accuracy is None:
                    accuracy = judges.judge_accuracy(judge, self.preferences.examples)
            judge_info = {"name": judge.name, "kind": judge.kind, "accuracy": accuracy,
                          "pairs": len(self.preferences.examples) if accuracy is not None else None}
        return {
            "key": self.key,
            "run": self.run_.name,
            "run_dir": str(self.run_.dir),
            "base": self.run_.state(self.run_.recipe.stages[0].name).get("base", self.run_.recipe.model.base),
            "identity": self.identity,
            "machine": machine(),
            "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
            "settings": {"prompts": self.prompts.source, "n_prompts": len(examples), "reference": self.reference,
                         "judge": judge.name if judge else None, **asdict(self.decoding),
                         "tasks": self.tasks.source if self.tasks else None,
                         "preferences": self.preferences.source if self.preferences else None},
            "judge": judge_info,
            "stages": stages,
            "samples": [self._sample(i, prompts[i], replies, stages) for i in range(len(examples))],
            "curves": {name: _curves(self.run_.dir / name, kind_of(self.run_.stage(name)).curves)
                       for name in self.stages if name != BASE},
        }

    def _accuracy_change(self, graded: dict, name: str) -> dict | None:
        """Task accuracy of `name` minus the reference's on the same prompts, with a paired-bootstrap 95% interval."""
        if name == self.reference or not graded[name].get("correct"):
            return None
        return metrics.paired_bootstrap(graded[name]["correct"], graded[self.reference]["correct"], self.cfg.bootstrap,
                                        self.cfg.seed)

    def _judge_scores(self, judge, examples, replies: dict) -> dict[str, list[float]]:
        prompts, rules = [ex.prompt for ex in examples], [ex.rule for ex in examples]
        scores = {}
        with work_progress(f"judging with {judge.name}", len(self.stages), self.quiet) as advance:
            for name in self.stages:
                scores[name] = judge.score(prompts, [r.text for r in replies[name]], rules)
                advance()
        return scores

    def _comparison(self, name: str, prompts, replies: dict, rewards: dict) -> dict:
        """Win rates of `name`'s replies against the reference's: by the judge, length-controlled, by people."""
        out = {"win_rate": None, "lc_win_rate": None, "human_win_rate": None}
        if name == self.reference:
            return out
        mine, theirs = replies[name], replies[self.reference]
        if rewards:
            outcome = metrics.verdicts(rewards[name], rewards[self.reference])
            out.update(verdicts=outcome, win_rate=metrics.win_rate(outcome),
                       lc_win_rate=metrics.length_controlled_win_rate(
                           outcome, [len(r.ids) for r in mine], [len(r.ids) for r in theirs], seed=self.cfg.seed))
        if self.verdicts:
            human = [judges.human_verdict(self.verdicts, p, m.text, t.text) for p, m, t in zip(prompts, mine, theirs)]
            out.update(human_verdicts=human, human_win_rate=metrics.win_rate([v for v in human if v is not None]))
        return out

    def _kls(self, model, prompts, replies: dict) -> dict[str, float]:
        """Per-token KL(stage || reference) along each stage's own replies."""
        others = [name for name in self.stages if name != self.reference]
        kls = {}
        with work_progress(f"KL to {self.reference}", len(others), self.quiet) as advance:
            for name in others:
                kls[name] = kl_along(model, self.tokenizer, prompts, [r.ids for r in replies[name]],
                                     None if name == BASE else name, None if self.reference == BASE else self.reference,
                                     self.cfg.batch_size)["kl"]
                advance()
        return kls

    def _implicit_accuracies(self, model, folders: dict[str, str]) -> dict[str, float]:
        names = self._implicit_stages()
        if not names:
            return {}
        out = {}
        with work_progress("implicit rewards on held-out pairs", len(names), self.quiet) as advance:
            for name in names:
                out[name] = self._measured_in_training(name, "eval_rewards/accuracies")
                if out[name] is None:
                    reference = self._adapter_name(self._stage_reference(name), folders)
                    out[name] = judges.implicit_reward_accuracy(model, self.tokenizer, self.run_.stage(name), name,
                                                                reference, self.preferences.examples,
                                                                self.cfg.batch_size)
                advance()
        return out

    def _measured_in_training(self, name: str, key: str) -> float | None:
        """Stage `name`'s own held-out `key` when the preferences are exactly its eval_data: the stage measured
        it after training with the same definition (a test checks they agree), on what can be thousands of pairs."""
        stage = next((s for s in self.run_.recipe.stages if s.name == name), None)
        section = self.cfg.preferences or default_preferences(self.run_.recipe)
        state = self.run_.state(name)
        if stage is None or stage.eval_data is None or asdict(stage.eval_data) != asdict(section):
            return None
        if state.get("data", {}).get("eval", {}).get("fingerprint") != self.preferences.fingerprint:
            return None
        return state.get("metrics", {}).get(key)

    def _sample(self, i: int, prompt, replies: dict, stages: dict) -> dict:
        def verdict(name):
            outcome = stages[name].get("verdicts") or stages[name].get("human_verdicts")
            return outcome[i] if outcome else None

        return {"prompt": prompt_text(prompt), "messages": prompt, "category": None, "responses": {
            name: {"text": replies[name][i].text, "reward": (stages[name]["rewards"] or [None] * (i + 1))[i],
                   "verdict": verdict(name)} for name in self.stages}}

    def _write_pairs(self, result: dict) -> None:
        """Each stage's reply next to the reference's, in random order, for people to judge (human verdicts)."""
        rows = []
        for i, sample in enumerate(result["samples"]):
            ref_text = sample["responses"][self.reference]["text"]
            for name in self.stages:
                text = sample["responses"][name]["text"]
                if name == self.reference or text.strip() == ref_text.strip():
                    continue
                a, b = (name, self.reference) if int(identity_hash([i, name]), 16) % 2 else (self.reference, name)
                rows.append({"prompt": sample["messages"], "a": sample["responses"][a]["text"],
                             "b": sample["responses"][b]["text"], "a_model": a, "b_model": b})
        (self.out_dir / "pairs.jsonl").write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))


def evaluate_run(run: Run, cfg: EvalConfig, out_dir: Path | None = None, host: ModelHost | None = None,
                 quiet: bool = False, identity: dict | None = None) -> dict:
    """Evaluate `run` with `cfg`, write eval.json, pairs.jsonl and report.html to `out_dir` (default
    RUN/eval/). `host` lends the base where the caller has one (the pipeline's); `identity` is the base's
    (align.models.identity), where the caller has it."""
    from align.eval.report import render_html

    evaluation = Evaluation(run, cfg, out_dir or run.dir / "eval", host, quiet, identity)
    result = evaluation.run()
    if cfg.report:
        render_html([result], evaluation.out_dir / "report.html")
    return result
