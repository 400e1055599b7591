"""Forgetting: what a stage cost the policy it started from, measured on held-out data it did not train on.

Preference stages move a policy towards what their data rewards and nothing holds the rest in place
(InstructGPT's "alignment tax"). Every stage's starting policy (its `init`, or the bare base) and the
policy it made are measured on the recipe's `forgetting` sets:
- `retention`: held-out SFT data, NLL per completion token (and perplexity): how likely the answers the
  model was taught still are;
- `tasks`: held-out prompts whose answers a rule checks (`align.data.rules`), accuracy of greedy answers;
- `prompts`: general prompts, the exact per-token KL(trained || start) of the next-token distributions
  along the trained policy's own greedy replies: how far the stage moved the model where it was not asked to.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import asdict, dataclass

import torch

from align.data.collate import encode
from align.data.formats import LoadedData, load_examples
from align.data.sources import fingerprint
from align.eval.kl import kl_to_reference
from align.eval.tasks import task_accuracy
from align.models import adapters
from align.models.generation import evaluating
from align.models.host import ModelHost
from align.models.logprobs import encoded_logprobs
from align.stages.kind import kind_of
from align.ui import work_progress


@torch.no_grad()
def retention_nll(model, tokenizer, examples, max_length: int, max_prompt_length: int, batch_size: int) -> dict:
    """Mean NLL per completion token of SFT examples under the model as it is (each token weighs the same)."""
    rows = [encode(tokenizer, ex.prompt, ex.completion, max_length, max_prompt_length) for ex in examples]
    with evaluating(model):
        logps, counts = encoded_logprobs(model, [(r.prompt_ids, r.completion_ids) for r in rows],
                                         tokenizer.pad_token_id, batch_size)
    total, tokens = -float(logps.double().sum()), int(counts.sum())
    nll = total / max(tokens, 1)
    return {"nll": nll, "perplexity": math.exp(nll), "tokens": tokens}


# --- per stage: the policy a stage starts from against the one it produces ---------------------------


@dataclass
class ForgettingSets:
    """The held-out sets a recipe's stages are measured on (each None where the recipe gives none)."""

    retention: LoadedData | None  # SFT examples: NLL
    tasks: LoadedData | None  # rule-checked tasks: accuracy
    prompts: list[list[dict]]  # chat prompts: KL of the stage's policy to its start
    fingerprint: str  # of all three and the settings: measurements are cached under it


def load_sets(recipe) -> ForgettingSets | None:
    """The sets of `recipe.forgetting`, with their fallbacks; None when there is nothing to measure on."""
    cfg = recipe.forgetting
    if not cfg.enabled:
        return None
    first_sft = next((s for s in recipe.stages if kind_of(s).demonstrations and s.eval_data), None)
    retention_cfg = cfg.retention or (first_sft.eval_data if first_sft else None)
    tasks_cfg = cfg.tasks or (recipe.eval.tasks if recipe.eval else None)

    def load(section, kind):
        if section is None:
            return None
        rows = min(cfg.max_rows, section.max_rows or cfg.max_rows)
        return load_examples(section.path, kind, section.format, section.skip_bad_rows, rows)

    retention, tasks = load(retention_cfg, "sft"), load(tasks_cfg, "task")
    prompts = load(cfg.prompts, "prompt") or retention or tasks
    if prompts is None:
        return None
    fingerprint = hashlib.sha256(json.dumps(
        [asdict(cfg), *(d.fingerprint if d else None for d in (retention, tasks, prompts))], default=str
    ).encode()).hexdigest()[:16]
    return ForgettingSets(retention, tasks, [ex.prompt for ex in prompts.examples], fingerprint)


def measure_policy(model, tokenizer, sets: ForgettingSets, cfg, train_cfg) -> dict:
    """Retention NLL and perplexity, and task accuracy, of the model as it is."""
    out: dict = {}
    if sets.retention:
        nll = retention_nll(model, tokenizer, sets.retention.examples, train_cfg.max_length,
                            train_cfg.max_prompt_length, cfg.batch_size)
        out.update(retention_nll=nll["nll"], retention_perplexity=nll["perplexity"])
    if sets.tasks:
        acc = task_accuracy(model, tokenizer, sets.tasks.examples, cfg.max_new_tokens, cfg.batch_size)
        out.update(task_accuracy=acc["accuracy"], task_per_family=acc["per_family"])
    return out


def adapter_fingerprint(path: str | None) -> str:
    return fingerprint(path) if path else "base"


def stage_forgetting(host: ModelHost, stage, start: str | None, trained: str, sets: ForgettingSets, cfg, cache: dict,
                     quiet: bool = False) -> dict:
    """{"before", "after", "change", "kl_to_start"} for a stage that turned adapter `start` (None: the
    bare base) into `trained`. `cache` maps a measurement's key to its result, so that a policy that ends
    one stage and starts the next is measured once."""
    lengths = f"{stage.train.max_length}:{stage.train.max_prompt_length}"  # the retention NLL's truncation
    keys = {name: f"{sets.fingerprint}:{lengths}:{adapter_fingerprint(path)}"
            for name, path in (("before", start), ("after", trained))}
    result = {}
    kl_key = f"kl:{keys['after']}:{keys['before']}"
    folders = {"after": trained, **({"before": start} if start else {})}
    # before, after, and the KL between them
    with host.adapters(folders) as model, work_progress(f"forgetting of {stage.name}", 3, quiet) as advance:
        for name in ("before", "after"):
            if keys[name] not in cache:
                with adapters.using(model, name if name == "after" or start else None):
                    cache[keys[name]] = measure_policy(model, host.tokenizer, sets, cfg, stage.train)
            result[name] = cache[keys[name]]
            advance()
        if kl_key not in cache:
            cache[kl_key] = kl_to_reference(model, host.tokenizer, sets.prompts, "after", "before" if start else None,
                                            cfg.max_new_tokens, cfg.batch_size)
        advance()
    result["kl_to_start"] = cache[kl_key]["kl"]
    result["change"] = {k: result["after"][k] - result["before"][k] for k in result["after"]
                        if isinstance(result["after"][k], float)}
    return result
