"""The evaluation report: one self-contained HTML page (inline CSS and SVG), PNG plots, and a rich table.

`render_html` and `summary_table` take one or several `eval.json` dicts (as written by `align eval`) and
render whatever subset of fields is present; matplotlib is imported only when a page is rendered.
"""
from __future__ import annotations

import re
from html import escape
from pathlib import Path

from rich import box
from rich.table import Table

from align.eval.plots import Plots, curves_plot, distribution_plot, stage_color, stage_colors, stage_rows, win_rate_plot

N_SAMPLES = 12
CSS = """
:root { --fg:#1f2328; --muted:#667085; --line:#e4e7ec; --card:#fff; --bg:#f5f6f8; --accent:#4269d0; }
* { box-sizing: border-box; }
body { margin:0; background:var(--bg); color:var(--fg); line-height:1.5;
  font:15px/1.5 -apple-system, "Segoe UI", "Helvetica Neue", "DejaVu Sans", Arial, sans-serif; }
main { max-width:1180px; margin:0 auto; padding:28px 24px 60px; }
header h1 { margin:0 0 4px; font-size:28px; letter-spacing:-.02em; }
header .meta { color:var(--muted); margin:2px 0; font-size:14px; }
header .meta b { color:var(--fg); font-weight:600; }
section { background:var(--card); border:1px solid var(--line); border-radius:12px; padding:18px 22px;
  margin:18px 0; box-shadow:0 1px 2px rgba(16,24,40,.04); }
h2 { font-size:18px; margin:0 0 12px; } h3 { font-size:15px; margin:18px 0 8px; color:var(--muted); }
.note { color:var(--muted); font-style:italic; margin:4px 0; }
table { border-collapse:collapse; width:100%; font-size:13.5px; font-variant-numeric:tabular-nums; }
.scroll { overflow-x:auto; }
th, td { padding:6px 9px; border-bottom:1px solid var(--line); text-align:left; vertical-align:top; }
th { font-weight:600; color:var(--muted); font-size:12px; text-transform:uppercase; letter-spacing:.03em; }
tbody tr:nth-child(even), table.forgetting tbody:nth-of-type(even) tr { background:#f8f9fb; }
table.forgetting tbody tr { background:none; } table.forgetting td { border:none; }
table.forgetting tbody { border-bottom:1px solid var(--line); } thead th.num { white-space:normal; }
td.num, th.num { text-align:right; white-space:nowrap; }
td.label { white-space:nowrap; } td.change { font-size:12px; color:#475467; } \
td.change span { display:block; white-space:nowrap; }
tr.ref td { color:var(--muted); }
.ci { display:block; color:var(--muted); font-size:11.5px; }
.dot { display:inline-block; width:10px; height:10px; border-radius:50%; margin-right:6px; vertical-align:0; }
.badge { display:inline-block; padding:1px 8px; border-radius:999px; font-size:11.5px; font-weight:600;
  color:#fff; background:#98a2b3; margin-left:6px; }
.badge.win { background:#12b76a; } .badge.loss { background:#f04438; } .badge.tie { background:#98a2b3; }
.badge.ref { background:#eaecf0; color:#475467; }
.up { color:#d92d20; } .down { color:#039855; }
figure.plot { margin:8px 0; text-align:center; }
figure.plot svg { max-width:100%; height:auto; }
.sample { border-top:1px solid var(--line); padding:12px 0; }
.prompt { font-weight:600; white-space:pre-wrap; margin-bottom:8px; }
.cat { color:var(--muted); font-weight:400; font-size:12px; margin-left:8px; }
.responses { display:grid; gap:10px; grid-template-columns:repeat(auto-fit, minmax(220px, 1fr)); }
.resp { border:1px solid var(--line); border-radius:8px; padding:8px 10px; background:#fcfcfd; font-size:13px; }
.resp .who { font-weight:600; font-size:12.5px; margin-bottom:4px; }
.resp pre { white-space:pre-wrap; word-wrap:break-word; margin:0; font:inherit; max-height:16em; overflow:auto; }
.resp .foot { color:var(--muted); font-size:12px; margin-top:6px; }
"""


# ---------------------------------------------------------------- formatting

def _num(x, digits: int = 3) -> str:
    return "–" if x is None else f"{x:.{digits}f}"


def _pct(x) -> str:
    return "–" if x is None else f"{100 * x:.1f}%"


def _rate(r: dict | None) -> tuple[str, str]:
    """(value, CI range) of a win-rate dict as percentages."""
    if not r or r.get("value") is None:
        return "–", ""
    ci = f"{100 * r['low']:.1f}–{100 * r['high']:.1f}" if r.get("low") is not None else ""
    return _pct(r["value"]), ci


def _forgetting_change(f: dict | None) -> list[str]:
    change = (f or {}).get("change") or {}
    return [f"{k} {v:+.3f}" for k, v in change.items() if isinstance(v, (int, float))]


def _cells(st: dict) -> list[tuple[str, str]]:
    """The summary columns after the label, as (value, CI) strings."""
    return [_rate(st.get("win_rate")), _rate(st.get("lc_win_rate")), (_num(st.get("mean_reward")), ""),
            (_num(st.get("mean_length"), 1), ""), (_num(st.get("kl_to_reference")), ""),
            (_pct(st.get("task_accuracy")), ""), _change(st.get("task_accuracy_change")),
            (_pct(st.get("implicit_reward_accuracy")), ""),
            (", ".join(_forgetting_change(st.get("forgetting"))) or "–", "")]


COLUMNS = ["win rate ± CI", "LC win rate", "mean reward", "length", "KL", "task acc", "task acc vs ref ± CI",
           "implicit-reward acc", "forgetting change"]


TERMINAL_COLUMNS = ["win", "95% CI", "LC win", "reward", "length", "KL", "task", "implicit"]


def _change(r: dict | None) -> tuple[str, str]:
    """(change, paired-bootstrap CI) of a difference of rates, in percentage points."""
    if not r:
        return "–", ""
    return f"{100 * r['value']:+.1f} pt", f"{100 * r['low']:+.1f} to {100 * r['high']:+.1f}"


def _terminal_ci(r: dict | None) -> str:
    return f"{100 * r['low']:.0f}–{100 * r['high']:.0f}" if r and r.get("low") is not None else ""


def summary_table(evals: list[dict]) -> Table:
    """The terminal summary, narrow enough for 80 columns: a row per run/stage with the win rate and its
    interval, the LC win rate, mean reward, length, KL, task and implicit-reward accuracy (forgetting has
    its own table at the end of `align run`, and a column in the HTML report)."""
    ref = next((ev.get("settings", {}).get("reference") for ev in evals if ev.get("settings")), None)
    table = Table(title="evaluation" + (f" against {ref}" if ref else ""), box=box.SIMPLE_HEAD, pad_edge=False,
                  collapse_padding=True)
    table.add_column("run/stage" if len(evals) > 1 else "stage")
    for c in TERMINAL_COLUMNS:
        table.add_column(c, justify="right")
    for label, _, _, st in stage_rows(evals):
        ref_row = bool(st.get("is_reference"))
        table.add_row(label + (" (ref)" if ref_row else ""), _pct(st.get("win_rate", {}) and st["win_rate"]["value"]),
                      _terminal_ci(st.get("win_rate")), _pct((st.get("lc_win_rate") or {}).get("value")),
                      _num(st.get("mean_reward")), _num(st.get("mean_length"), 1), _num(st.get("kl_to_reference")),
                      _pct(st.get("task_accuracy")), _pct(st.get("implicit_reward_accuracy")),
                      style="dim" if ref_row else None)
    return table


# ---------------------------------------------------------------- HTML sections

def _section(sid: str, title: str, body: str) -> str:
    return f'<section id="{sid}"><h2>{escape(title)}</h2>{body}</section>'


def _note(text: str) -> str:
    return f'<p class="note">{escape(text)}</p>'


def _header(evals: list[dict]) -> str:
    runs = ", ".join(f"<b>{escape(str(ev.get('run', '?')))}</b>"
                     + (f" ({escape(str(ev['run_dir']))})" if ev.get("run_dir") else "")
                     for ev in evals)
    lines = [f'<p class="meta">Runs compared: {runs}</p>']
    for base in dict.fromkeys(str(ev["base"]) for ev in evals if ev.get("base")):
        lines.append(f'<p class="meta">Base model: <b>{escape(base)}</b></p>')
    # the numbers hold for this dtype and processor kind: precision `auto` computes in bf16 on some CPUs, fp32 on others
    for dtype, machine in dict.fromkeys(((ev.get("identity") or {}).get("dtype"), ev.get("machine")) for ev in evals):
        if dtype and machine:
            lines.append(f'<p class="meta">Computed in <b>{escape(dtype)}</b> on <b>{escape(machine)}</b></p>')
    for ev in evals:
        s, j = ev.get("settings") or {}, ev.get("judge") or {}
        judge = j.get("name") or s.get("judge") or "none"
        if j.get("kind"):
            judge += (f" ({j['kind']}" + (f", accuracy {_pct(j['accuracy'])}" if j.get("accuracy") is not None else "")
                      + ")")
        dec = "sampling" + "".join(f", {k} {s[k]}" for k in ("temperature", "top_p") if s.get(k) is not None) \
            if s.get("do_sample") else "greedy"
        parts = [("prompts", s.get("prompts")), ("n", s.get("n_prompts")), ("reference", s.get("reference")),
                 ("judge", judge),
                 ("decoding", f"{dec}, max {s['max_new_tokens']} new tokens" if s.get("max_new_tokens") else dec),
                 ("seed", s.get("seed")), ("created", ev.get("created"))]
        who = f"<b>{escape(str(ev.get('run', '?')))}</b>: " if len(evals) > 1 else ""
        lines.append(f'<p class="meta">{who}'
                     + " · ".join(f"{k} <b>{escape(str(v))}</b>" for k, v in parts if v is not None) + "</p>")
    return f'<header><h1>align evaluation</h1>{"".join(lines)}</header>'


def _summary(evals: list[dict], colors) -> str:
    head = "".join(f'<th class="{"" if c == "forgetting change" else "num"}">{escape(c)}</th>' for c in COLUMNS)
    rows = []
    for label, _, n, st in stage_rows(evals):
        ref = st.get("is_reference")
        cells = "".join(f'<td class="num">{escape(v)}' + (f'<span class="ci">{escape(ci)}</span>' if ci else "")
                        + "</td>" for v, ci in _cells(st)[:-1])
        cells += ('<td class="change">'
                  + ("".join(f"<span>{escape(c)}</span>" for c in _forgetting_change(st.get("forgetting"))) or "–")
                  + "</td>")
        tip = escape(" ".join(f"{k} {st['win_rate'][k]}" for k in ("n", "wins", "ties", "losses")
                              if k in (st.get("win_rate") or {})))
        mark = ' <span class="badge ref">reference</span>' if ref else ""
        rows.append(f'<tr class="{"ref" if ref else "stage"}" title="{tip}"><td class="label">'
                    f'<span class="dot" style="background:{stage_color(colors, n, st)}"></span>'
                    f'{escape(label)}{mark}</td>{cells}</tr>')
    return (f'<div class="scroll"><table class="summary"><thead><tr>'
            f'<th>{"run/stage" if len(evals) > 1 else "stage"}</th>'
            f'{head}</tr></thead><tbody>{"".join(rows)}</tbody></table></div>')


def _forgetting(evals: list[dict]) -> str:
    groups = []
    for label, _, _, st in stage_rows(evals):
        f, rows = st.get("forgetting"), []
        if not f:
            continue
        before, after, change = f.get("before") or {}, f.get("after") or {}, f.get("change") or {}
        metrics = [k for k in dict.fromkeys([*before, *after, *change])
                   if isinstance(after.get(k, change.get(k)), (int, float))] or ["–"]
        for i, k in enumerate(metrics):
            d = change.get(k)
            worse = d is not None and (d > 0 if re.search("nll|perplexity|loss", k) else d < 0)
            first = f'<td rowspan="{len(metrics)}">{escape(label)}</td>' if i == 0 else ""
            kl = f'<td class="num" rowspan="{len(metrics)}">{_num(f.get("kl_to_start"))}</td>' if i == 0 else ""
            rows.append(f'<tr>{first}<td>{escape(k)}</td><td class="num">{_num(before.get(k))}</td>'
                        f'<td class="num">{_num(after.get(k))}</td><td class="num {"up" if worse else "down"}">'
                        f'{"–" if d is None else f"{d:+.3f}"}</td>{kl}</tr>')
        groups.append(f'<tbody>{"".join(rows)}</tbody>')
    return ('<div class="scroll"><table class="forgetting"><thead><tr><th>stage</th><th>metric</th>'
            '<th class="num">before</th><th class="num">after</th><th class="num">change</th>'
            '<th class="num">KL to start</th></tr></thead>'
            f'{"".join(groups)}</table></div>') if groups else ""


def _rounds(evals: list[dict]) -> str:
    """The closed loop: each policy with the labels spent on it so far, its task accuracy and win rate."""
    rows = [(lb, st) for lb, _, _, st in stage_rows(evals) if st.get("labels")]
    if not rows:
        return ""
    body = "".join(f'<tr><td>{escape(lb)}</td><td class="num">{st["labels"]["spent"]}</td>'
                   f'<td class="num">{st["labels"]["kept"]}</td><td class="num">{_pct(st.get("task_accuracy"))}</td>'
                   f'<td class="num">{" ".join(_change(st.get("task_accuracy_change")))}</td>'
                   f'<td class="num">{" ".join(_rate(st.get("win_rate")))}</td></tr>' for lb, st in rows)
    return ('<div class="scroll"><table class="rounds"><thead><tr><th>policy</th><th class="num">labels spent</th>'
            '<th class="num">labels kept</th><th class="num">task acc</th><th class="num">vs ref ± CI</th>'
            f'<th class="num">win rate ± CI</th></tr></thead><tbody>{body}</tbody></table></div>')


def _tasks(evals: list[dict]) -> str:
    rows = [(lb, st) for lb, _, _, st in stage_rows(evals)
            if st.get("task_per_family") or st.get("task_accuracy") is not None]
    if not rows:
        return ""
    fams = list(dict.fromkeys(f for _, st in rows for f in (st.get("task_per_family") or {})))
    head = "".join(f'<th class="num">{escape(f)}</th>' for f in fams)
    body = "".join(f"<tr><td>{escape(lb)}</td><td class=\"num\">{_pct(st.get('task_accuracy'))}</td>"
                   + "".join(f'<td class="num">{_pct((st.get("task_per_family") or {}).get(f))}</td>' for f in fams)
                   + "</tr>" for lb, st in rows)
    return (f'<div class="scroll"><table class="tasks"><thead><tr><th>stage</th><th class="num">all</th>{head}</tr>'
            f'</thead><tbody>{body}</tbody></table></div>')


def _samples(ev: dict, colors) -> str:
    stages = ev.get("stages") or {}
    out = []
    for smp in (ev.get("samples") or [])[:N_SAMPLES]:
        cat = f'<span class="cat">{escape(str(smp["category"]))}</span>' if smp.get("category") else ""
        cols = []
        for name, r in (smp.get("responses") or {}).items():
            r, st = r or {}, stages.get(name) or {}
            verdict = r.get("verdict")
            badge = (f'<span class="badge {escape(verdict)}">{escape(verdict)}</span>'
                     if verdict in ("win", "tie", "loss") else "")
            foot = f'reward {_num(r["reward"])}' if r.get("reward") is not None else ""
            cols.append(f'<div class="resp"><div class="who">'
                        f'<span class="dot" style="background:{stage_color(colors, name, st)}"></span>'
                        f'{escape(name)}{" (ref)" if st.get("is_reference") else ""}{badge}</div>'
                        f'<pre>{escape(str(r.get("text", "")))}</pre><div class="foot">{foot}</div></div>')
        out.append(f'<div class="sample"><div class="prompt">{escape(str(smp.get("prompt", "")))}{cat}</div>'
                   f'<div class="responses">{"".join(cols)}</div></div>')
    return "".join(out)


def render_html(evals: list[dict], out: Path) -> Path:
    """One self-contained HTML page (inline CSS and inline SVG plots; no external URLs, no JS needed) for
    one or several eval.json dicts; also writes each plot as PNG into out.parent / "plots" /. Returns out."""
    import matplotlib
    out = Path(out)
    plots, colors = Plots(out.parent / "plots"), stage_colors(evals)
    with matplotlib.rc_context(plots.rc):
        page = _page(evals, plots, colors)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(page, encoding="utf-8")
    return out


def _page(evals: list[dict], plots: Plots, colors: dict) -> str:
    many = len(evals) > 1
    parts = [_header(evals), _section("summary", "Summary", _summary(evals, colors)),
             _section("win-rate", "Win rate against the reference", win_rate_plot(plots, evals, colors))]
    curves = "".join((f"<h3>{escape(str(ev.get('run', '?')))}</h3>" if many else "") + fig
                     for ev in evals if (fig := curves_plot(plots, ev, colors)))
    parts.append(_section("curves", "Training curves", curves or _note("No training curves recorded.")))
    parts.append(_section("rewards", "Reward distribution",
                          distribution_plot(plots, evals, colors, "rewards", "judge reward")
                          or _note("No rewards (no judge).")))
    parts.append(_section("lengths", "Response length",
                          distribution_plot(plots, evals, colors, "lengths", "tokens")
                          or _note("No responses recorded.")))
    if forgetting := _forgetting(evals):
        parts.append(_section("forgetting", "Forgetting: each stage against the policy it started from", forgetting))
    if rounds := _rounds(evals):
        parts.append(_section("rounds", "Closed loop: each round's policy by the labels spent so far", rounds))
    if tasks := _tasks(evals):
        parts.append(_section("tasks", "Task accuracy per family", tasks))
    samples = "".join((f"<h3>{escape(str(ev.get('run', '?')))}</h3>" if many else "") + s
                      for ev in evals if (s := _samples(ev, colors)))
    parts.append(_section("samples", f"Samples (first {N_SAMPLES} prompts)", samples or _note("No samples recorded.")))
    title = "align evaluation: " + ", ".join(str(ev.get("run", "?")) for ev in evals)
    return (f'<!DOCTYPE html><html lang="en"><head><meta charset="utf-8"><title>{escape(title)}</title>'
            f'<meta name="viewport" content="width=device-width, initial-scale=1"><style>{CSS}</style></head>'
            f'<body><main>{"".join(parts)}</main></body></html>\n')
