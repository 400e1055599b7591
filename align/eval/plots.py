"""The report's plots (matplotlib, imported only when a page is rendered): each saved as PNG and embedded as SVG,
with one colour per stage name across every plot and run."""

from __future__ import annotations

import io
import re
from html import escape
from pathlib import Path

REF_GREY = "#9aa0a6"
PALETTE = ["#4269d0", "#ef7f3a", "#3ca951", "#ff725c", "#a463f2", "#97bbf5", "#9c6b4e", "#e6b800", "#38b2ac", "#ff8ab7"]


def tint(color: str, alpha: float | None) -> str:
    """`color` mixed with white (alpha 1: itself; None: white), opaque so that hatches and error bars stay crisp."""
    rgb = [int(color[i:i + 2], 16) for i in (1, 3, 5)]
    a = 0.0 if alpha is None else alpha
    return "#" + "".join(f"{round(255 - a * (255 - c)):02x}" for c in rgb)


def stage_rows(evals: list[dict]):
    """(label, run, stage name, stage dict) per run/stage, the label "run/stage" when several runs."""
    for ev in evals:
        for name, st in (ev.get("stages") or {}).items():
            yield (f"{ev.get('run', '?')}/{name}" if len(evals) > 1 else name), ev, name, st or {}


def stage_colors(evals: list[dict]) -> dict[str, str]:
    """A colour per stage name, the same in every plot and run; reference stages get grey."""
    names = [n for _, _, n, st in stage_rows(evals) if not st.get("is_reference")]
    return {n: PALETTE[i % len(PALETTE)] for i, n in enumerate(dict.fromkeys(names))}


def stage_color(colors: dict, name: str, st: dict) -> str:
    return REF_GREY if st.get("is_reference") else colors.get(name, REF_GREY)


class Plots:
    """Saves each figure once as PNG under `plots_dir` and once as SVG for inline embedding."""

    def __init__(self, plots_dir: Path):
        self.dir, self.names = plots_dir, set()
        self.rc = {"svg.fonttype": "none", "svg.hashsalt": None, "font.size": 9, "axes.spines.top": False,
                   "axes.spines.right": False, "axes.grid": True, "grid.color": "#e4e7ec", "axes.axisbelow": True,
                   "axes.edgecolor": "#98a2b3", "font.family": "DejaVu Sans"}

    @staticmethod
    def new(w: float, h: float):
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
        fig = Figure(figsize=(w, h), layout="constrained")
        FigureCanvasAgg(fig)  # the Agg canvas: no display, no pyplot state to close
        return fig

    def embed(self, fig, name: str, kind: str) -> str:
        slug = re.sub(r"[^A-Za-z0-9_.-]+", "-", name).strip("-") or "plot"
        while slug in self.names:
            slug += "-x"
        self.names.add(slug)
        self.dir.mkdir(parents=True, exist_ok=True)
        buf = io.StringIO()
        fig.savefig(self.dir / f"{slug}.png", dpi=150)
        fig.savefig(buf, format="svg")
        fig.clear()
        svg = buf.getvalue()
        return f'<figure class="plot" data-plot="{escape(kind)}">{svg[svg.index("<svg"):]}</figure>'


def win_rate_plot(plots: Plots, evals, colors) -> str:
    rows = [(lb, n, st) for lb, _, n, st in stage_rows(evals) if not st.get("is_reference")
            and any((st.get(k) or {}).get("value") is not None for k in ("win_rate", "lc_win_rate", "human_win_rate"))]
    if not rows:
        return '<p class="note">No stage has a win rate (no judge, or only the reference was evaluated).</p>'
    kinds = [("win_rate", "raw", 1.0, ""), ("lc_win_rate", "length-controlled", 0.5, ""),
             ("human_win_rate", "human", None, "////")]
    kinds = [k for k in kinds if any((st.get(k[0]) or {}).get("value") is not None for _, _, st in rows)]
    fig = plots.new(min(11, max(6, 1.6 * len(rows) + 3)), 3.6)
    ax, width = fig.add_subplot(), 0.8 / len(kinds)
    for j, (key, _label, alpha, hatch) in enumerate(kinds):
        for i, (_, n, st) in enumerate(rows):
            r = st.get(key) or {}
            if r.get("value") is None:
                continue
            x, v = i + (j - (len(kinds) - 1) / 2) * width, r["value"]
            err = [[v - r.get("low", v)], [r.get("high", v) - v]]
            c = colors.get(n, REF_GREY)
            ax.bar(x, v, width * 0.92, color=tint(c, alpha), hatch=hatch, edgecolor=c, yerr=err, capsize=3,
                   error_kw={"elinewidth": 1, "ecolor": "#344054"})
    from matplotlib.patches import Patch
    ax.legend([Patch(facecolor=tint("#667085", a), hatch=h, edgecolor="#667085") for _, _, a, h in kinds],
              [lb for _, lb, _, _ in kinds], frameon=False, fontsize=8, loc="upper left", ncols=len(kinds))
    ax.axhline(0.5, color="#475467", ls="--", lw=1)
    ax.set(xticks=range(len(rows)), ylim=(0, 1.12), ylabel="win rate vs reference")
    ax.set_xticklabels([lb for lb, _, _ in rows])
    ax.yaxis.set_major_formatter(lambda y, _: f"{100 * y:.0f}%")
    ax.grid(axis="x", visible=False)
    return plots.embed(fig, "win-rate", "win-rate")


def curves_plot(plots: Plots, ev: dict, colors) -> str:
    curves = {s: c for s, c in (ev.get("curves") or {}).items() if c}
    keys = list(dict.fromkeys(k for c in curves.values() for k, pts in c.items() if pts))
    keys = sorted(keys, key=lambda k: (k != "loss", k))[:12]
    if not keys:
        return ""
    ncols = min(4, len(keys))
    nrows = -(-len(keys) // ncols)
    fig = plots.new(3.4 * ncols, 2.4 * nrows + 0.4)
    axes = fig.subplots(nrows, ncols, squeeze=False).ravel()
    stages = ev.get("stages") or {}
    for ax, key in zip(axes, keys):
        for s, c in curves.items():
            if c.get(key):
                xs, ys = zip(*c[key])
                ax.plot(xs, ys, lw=1.4, label=s, color=stage_color(colors, s, stages.get(s) or {}))
        ax.set_title(key, fontsize=9)
        ax.set_xlabel("step", fontsize=8)
    for ax in axes[len(keys):]:
        ax.set_visible(False)
    fig.legend(*axes[0].get_legend_handles_labels(), loc="outside upper right", frameon=False, ncols=len(curves))
    return plots.embed(fig, f"curves-{ev.get('run', 'run')}", "curves")


def distribution_plot(plots: Plots, evals, colors, key: str, ylabel: str) -> str:
    rows = [(lb, n, st) for lb, _, n, st in stage_rows(evals) if st.get(key)]
    if not rows:
        return ""
    fig = plots.new(min(11, max(6, 1.3 * len(rows) + 2.5)), 3.4)
    ax = fig.add_subplot()
    data = [[x for x in st[key] if x is not None] or [0.0] for _, _, st in rows]
    spread = [i for i, d in enumerate(data) if len(set(d)) > 1]  # a violin needs some spread for its KDE
    bodies = ax.violinplot([data[i] for i in spread], [i + 1 for i in spread], showextrema=False,
                           widths=0.8)["bodies"] if spread else []
    boxplot = ax.boxplot(data, widths=0.18, patch_artist=True, showfliers=False,
                     medianprops={"color": "#1f2328"}, whiskerprops={"color": "#667085"}, capprops={"color": "#667085"})
    for i, (patch, (_, n, st)) in enumerate(zip(boxplot["boxes"], rows)):
        c = stage_color(colors, n, st)
        patch.set(facecolor=c, edgecolor="#475467")
        if i in spread:
            bodies[spread.index(i)].set(facecolor=c, edgecolor=c, alpha=0.35)
        jitter = [((k * 0.618) % 1 - 0.5) * 0.3 for k in range(len(data[i]))]  # deterministic, spread evenly
        ax.scatter([i + 1 + j for j in jitter], data[i], s=6, color=c, alpha=0.6, linewidths=0, zorder=3)
    ax.set_xticks(range(1, len(rows) + 1), [lb for lb, _, _ in rows])
    ax.set_ylabel(ylabel)
    ax.grid(axis="x", visible=False)
    return plots.embed(fig, key, key)
