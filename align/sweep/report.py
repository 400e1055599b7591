"""What a sweep leaves in `<output_dir>/<study>/`: trials.csv and a table of every trial, the best recipe as YAML
ready for `align run` (a multi-objective study: one per trial on the Pareto front), and report.html in the eval
report's style: the objective per trial, each parameter against the objective, parameter importances where there
are enough finished trials to mean anything; pruned trials marked."""

from __future__ import annotations

import csv
import math
from html import escape
from pathlib import Path

import yaml
from rich.table import Table

from align import yaml_binding
from align.eval.plots import PALETTE, REF_GREY, Plots
from align.eval.report import CSS
from align.ui import console

MIN_TRIALS_FOR_IMPORTANCE = 6  # fANOVA on fewer complete trials ranks noise
STATE_COLORS = {"COMPLETE": PALETTE[0], "PRUNED": REF_GREY, "FAIL": PALETTE[3], "RUNNING": PALETTE[7],
                "WAITING": PALETTE[7]}


def _value(v) -> str:
    if isinstance(v, float):
        return f"{v:.3g}"
    return "" if v is None else str(v)


def trial_rows(sweep, study) -> list[dict]:
    keys = [p.key for p in sweep.sweep.space]
    rows = []
    for t in study.get_trials(deepcopy=False):
        # Optuna gives a pruned trial its last reported value as its value: that is the pruning metric, not the
        # objective, so it goes in a column of its own
        values = t.values if t.state.name == "COMPLETE" else [None] * len(sweep.sweep.objective)
        pruned = t.state.name == "PRUNED"
        rows.append({"trial": t.number, "run": t.user_attrs.get("run", ""), "state": t.state.name,
                     **{o.metric: v for o, v in zip(sweep.sweep.objective, values)},
                     "pruned_at_step": t.last_step if pruned else None,
                     "pruned_value": t.intermediate_values.get(t.last_step) if pruned else None,
                     **{k: t.params.get(k) for k in keys},
                     "seconds": round(t.duration.total_seconds()) if t.duration else None})
    return rows


def trials_table(sweep, rows: list[dict], best: set[int]) -> Table:
    table = Table(title=f"sweep {sweep.name}: {len(rows)} trials", title_justify="left")
    # the run folder (trial_NNN, or the one a retry resumes) and the seconds are in trials.csv
    columns = [c for c in (rows[0] if rows else []) if c not in ("run", "seconds")]
    headers = {"pruned_at_step": "pruned\nat step", "pruned_value": "its\nvalue"}
    for c in columns:  # headers over two lines, so that an 80-column terminal shows every number whole
        table.add_column(headers.get(c, c.split(".")[-1].replace("_", "\n", 1)),
                         justify="left" if c == "state" else "right", no_wrap=True)
    for row in rows:
        style = "bold green" if row["trial"] in best else ("dim" if row["state"] != "COMPLETE" else None)
        table.add_row(*(row[c].lower() if c == "state" else _value(row[c]) for c in columns), style=style)
    return table


def best_recipe(sweep, params: dict, header: str) -> str:
    """The recipe as the user wrote it (their overrides applied), with the trial's parameters set, renamed so that its
    run gets a folder of its own; comments do not survive the round trip, so the header says where it came from."""
    root = yaml_binding.compose(sweep.recipe_text, sweep.recipe_path)
    for override in [*sweep.overrides, *sweep.sweep.param_overrides(params),
                     f"name={sweep.recipe.name}_{sweep.name}_best"]:
        yaml_binding.apply_override(root, override)
    return header + yaml.serialize(root)


def write(sweep, study) -> dict:
    from optuna.trial import TrialState

    rows = trial_rows(sweep, study)
    complete = [t for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))]
    single = len(sweep.sweep.objective) == 1
    best = ([study.best_trial] if single else study.best_trials) if complete else []
    best_numbers = {t.number for t in best}
    with (sweep.dir / "trials.csv").open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]) if rows else ["trial"])
        writer.writeheader()
        writer.writerows(rows)
    console.print(trials_table(sweep, rows, best_numbers))
    recipes = []
    for t in best:
        name = "best.yaml" if single else f"pareto_trial_{t.number:03d}.yaml"
        scores = ", ".join(f"{o.metric} = {v:.4g}" for o, v in zip(sweep.sweep.objective, t.values))
        header = (f"# align sweep {sweep.name}: trial {t.number} ({t.user_attrs.get('run')}), {scores} on the trials' "
                  f"scoring data.\n# From {sweep.recipe_path}; run it with: align run {sweep.dir / name}\n")
        (sweep.dir / name).write_text(best_recipe(sweep, t.params, header), encoding="utf-8")
        recipes.append(str(sweep.dir / name))
    page = render_html(sweep, study, rows, best_numbers, sweep.dir / "report.html")
    counts = {state.name.lower(): sum(r["state"] == state.name for r in rows) for state in TrialState}
    result = {"study": sweep.name, "dir": str(sweep.dir), "trials": counts, "best": recipes, "report": str(page),
              "best_trials": [{"trial": t.number, "run": t.user_attrs.get("run"), "values": t.values,
                               "params": t.params} for t in best]}
    console.print(f"best recipe: {', '.join(recipes) or 'none (no trial completed)'}\nreport: {page}")
    return result


def importances(study, sweep) -> dict[str, float]:
    from optuna.importance import get_param_importances
    from optuna.trial import TrialState

    complete = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    if len(sweep.sweep.objective) > 1 or len(complete) < MIN_TRIALS_FOR_IMPORTANCE or len(sweep.sweep.space) < 2:
        return {}
    return get_param_importances(study)


def render_html(sweep, study, rows: list[dict], best: set[int], out: Path) -> Path:
    import matplotlib

    plots = Plots(out.parent / "plots")
    with matplotlib.rc_context(plots.rc):
        parts = [_header(sweep, rows), _section("trials", "Trials", _table(sweep, rows, best)),
                 _section("objective", "Objective per trial", _objective_plot(plots, sweep, rows)),
                 _section("params", "Each parameter against the objective", _param_plots(plots, sweep, rows))]
        weights = importances(study, sweep)
        few = _note(f"Shown from {MIN_TRIALS_FOR_IMPORTANCE} complete trials of a single-objective study over two or "
                    "more parameters: fewer rank noise.")
        parts.append(_section("importance", "Parameter importance (fANOVA)",
                              _importance_plot(plots, weights) if weights else few))
    title = f"align sweep: {sweep.name}"
    page = (f'<!DOCTYPE html><html lang="en"><head><meta charset="utf-8"><title>{escape(title)}</title>'
            f'<meta name="viewport" content="width=device-width, initial-scale=1"><style>{CSS}</style></head>'
            f'<body><main>{"".join(parts)}</main></body></html>\n')
    out.write_text(page, encoding="utf-8")
    return out


def _section(sid: str, title: str, body: str) -> str:
    return f'<section id="{sid}"><h2>{escape(title)}</h2>{body}</section>'


def _note(text: str) -> str:
    return f'<p class="note">{escape(text)}</p>'


def _header(sweep, rows) -> str:
    objective = ", ".join(f"{o.direction} {o.metric}" for o in sweep.sweep.objective)
    states = {s: sum(r["state"] == s for r in rows) for s in ("COMPLETE", "PRUNED", "FAIL", "RUNNING")}
    counts = ", ".join(f"{n} {s.lower()}" for s, n in states.items() if n)
    return (f"<header><h1>{escape(f'align sweep: {sweep.name}')}</h1>"
            f'<p class="meta">recipe <b>{escape(sweep.recipe_path)}</b>, objective <b>{escape(objective)}</b></p>'
            f'<p class="meta">{len(rows)} trials: {escape(counts)}; sampler {escape(sweep.sweep.sampler.type)}'
            + (f", pruning on {escape(sweep.sweep.pruning.stage)}'s {escape(sweep.sweep.pruning.metric)}"
               if sweep.sweep.pruning else "") + "</p></header>")


def _table(sweep, rows, best) -> str:
    if not rows:
        return _note("No trials yet.")
    columns = list(rows[0])
    head = "".join(f'<th class="num">{escape(c)}</th>' for c in columns)
    body = "".join(f'<tr class="{"best" if r["trial"] in best else r["state"].lower()}">'
                   + "".join(f'<td class="num">{escape(_value(r[c]))}'
                             + ('<span class="badge win">best</span>' if c == "trial" and r["trial"] in best else "")
                             + "</td>" for c in columns) + "</tr>" for r in rows)
    table = f'<table class="trials"><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>'
    return f'<div class="scroll">{table}</div>'


def _points(sweep, rows, x_key: str):
    """(x, objective, state) of each trial with an objective value (pruned trials have none)."""
    metric = sweep.sweep.objective[0].metric
    for r in rows:
        if r[metric] is not None and r.get(x_key) is not None:
            yield r[x_key], r[metric], r["state"]


def _objective_plot(plots, sweep, rows) -> str:
    metric = sweep.sweep.objective[0].metric
    done = [r for r in rows if r[metric] is not None]
    if not done:
        return _note("No trial has finished yet.")
    fig = plots.new(7.5, 3.2)
    ax = fig.add_subplot()
    ax.scatter([r["trial"] for r in done], [r[metric] for r in done], color=PALETTE[0], label="complete", zorder=3)
    pruned = [r["trial"] for r in rows if r["state"] == "PRUNED"]
    for x in pruned:
        ax.axvline(x, color=REF_GREY, lw=1, ls=":")
    if pruned:
        ax.plot([], [], color=REF_GREY, ls=":", label="pruned")
    ys = [r[metric] for r in done]
    best_so_far = [max(ys[: i + 1]) if sweep.sweep.directions[0] == "maximize" else min(ys[: i + 1])
                   for i in range(len(ys))]
    ax.step([r["trial"] for r in done], best_so_far, where="post", color=PALETTE[2], lw=1.2, label="best so far")
    ax.set_xlabel("trial")
    ax.set_ylabel(metric.split(".")[-1])
    ax.legend(frameon=False, fontsize=8)
    return plots.embed(fig, "objective", "objective")


def _param_plots(plots, sweep, rows) -> str:
    metric = sweep.sweep.objective[0].metric
    params = [p for p in sweep.sweep.space if any(r[metric] is not None for r in rows)]
    if not params:
        return _note("No trial has finished yet.")
    ncols = min(3, len(params))
    nrows = math.ceil(len(params) / ncols)
    fig = plots.new(3.6 * ncols, 2.8 * nrows)
    axes = fig.subplots(nrows, ncols, squeeze=False).ravel()
    for ax, p in zip(axes, params):
        points = list(_points(sweep, rows, p.key))
        if p.kind == "choices":
            labels = [str(c) for c in p.choices]
            points = [(labels.index(str(x)), y, s) for x, y, s in points]
            ax.set_xticks(range(len(labels)), labels)
        for x, y, _ in points:
            ax.scatter([x], [y], color=PALETTE[0], zorder=3)
        if p.kind == "log_uniform":
            ax.set_xscale("log")
        ax.set_title(p.key, fontsize=9)
        ax.set_ylabel(metric.split(".")[-1], fontsize=8)
    for ax in axes[len(params):]:
        ax.set_visible(False)
    return plots.embed(fig, "params", "params")


def _importance_plot(plots, weights: dict[str, float]) -> str:
    fig = plots.new(7.5, 0.5 * len(weights) + 1)
    ax = fig.add_subplot()
    names = list(weights)[::-1]
    ax.barh(names, [weights[n] for n in names], color=PALETTE[0])
    ax.set_xlabel("importance (share of the objective's variance)")
    return plots.embed(fig, "importance", "importance")
