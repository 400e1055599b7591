"""The evaluation report: the HTML page (checked in headless Chromium), its PNG plots, and the rich table."""
import math
import random
import re
import shutil
import subprocess
from pathlib import Path

import pytest
from rich.console import Console

from align.eval.report import render_html, summary_table

CHROMIUM = "/usr/bin/chromium" if Path("/usr/bin/chromium").exists() else shutil.which("chromium")
needs_chromium = pytest.mark.skipif(CHROMIUM is None, reason="headless Chromium (/usr/bin/chromium) is not installed")
XSS = "<script>alert(1)</script>"


def _rate(rng, value, n):
    half = 1.96 * math.sqrt(value * (1 - value) / n)
    wins = round(value * n * 0.85)
    ties = round(n * 0.12)
    return {"value": value, "low": max(0.0, value - half), "high": min(1.0, value + half), "n": n,
            "wins": wins, "ties": ties, "losses": n - wins - ties}


def _curve(rng, steps, start, end, noise=0.05):
    return [[s, start + (end - start) * s / steps + rng.gauss(0, noise)]
            for s in range(0, steps + 1, max(1, steps // 30))]


def fake_eval(run="quickstart", stages=("dpo", "ppo"), n=20, seed=0) -> dict:
    """A realistic eval.json: reference "sft", then `stages`, with rewards, curves, forgetting and samples."""
    rng = random.Random(seed)
    verdicts = ["win", "tie", "loss"]
    out = {"run": run, "run_dir": f"runs/{run}", "base": "SmolLM2-135M-Instruct (GGUF Q8_0, dequantised to nf4)",
           "created": "2026-11-21T22:40:00",
           "settings": {"prompts": "../shared/data/eval/vicuna_bench_question.jsonl", "n_prompts": n,
                        "reference": "sft", "judge": "rm", "max_new_tokens": 64, "do_sample": False,
                        "temperature": 0.7, "top_p": 1.0, "seed": 0},
           "judge": {"name": "rm", "kind": "learned", "accuracy": 0.71, "pairs": 200},
           "stages": {}, "samples": [], "curves": {}}
    for i, name in enumerate(("sft", *stages)):
        ref = name == "sft"
        lengths = [rng.randint(20, 64) + 6 * i for _ in range(n)]
        rewards = [rng.gauss(0.4 * i, 0.8) for _ in range(n)]
        wr = None if ref else 0.5 + 0.08 * i
        out["stages"][name] = {
            "kind": name, "is_reference": ref, "lengths": lengths, "mean_length": sum(lengths) / n,
            "rewards": rewards, "mean_reward": sum(rewards) / n,
            "win_rate": None if ref else _rate(rng, wr, n),
            "lc_win_rate": None if ref else _rate(rng, wr - 0.05, n),
            "human_win_rate": _rate(rng, 0.6, 8) if name == "dpo" else None,
            "kl_to_reference": None if ref else 0.05 * i,
            "task_accuracy": 0.7 - 0.03 * i, "task_per_family": {"json": 0.8 - 0.05 * i, "math": 0.6, "format": 0.75},
            "implicit_reward_accuracy": 0.68 if name == "dpo" else None,
            "forgetting": None if ref else {
                "before": {"retention_nll": 2.1, "retention_perplexity": 8.17, "task_accuracy": 0.7,
                           "task_per_family": {"json": 0.8}},
                "after": {"retention_nll": 2.1 + 0.06 * i, "retention_perplexity": 8.17 + 0.5 * i,
                          "task_accuracy": 0.7 - 0.03 * i, "task_per_family": {"json": 0.75}},
                "change": {"retention_nll": 0.06 * i, "retention_perplexity": 0.5 * i, "task_accuracy": -0.03 * i},
                "kl_to_start": 0.1 * i, "start": "sft"},
        }
        out["curves"][name] = {"loss": _curve(rng, 100, 2.0, 0.7 - 0.1 * i)}
        if name != "sft":
            out["curves"][name]["rewards/margins"] = _curve(rng, 100, 0.0, 1.5)
        if name == "ppo":
            out["curves"][name]["objective/kl"] = _curve(rng, 100, 0.0, 0.3, 0.02)
    for p in range(n):
        prompt = (f"How can I improve my time management skills? (#{p})" if p
                  else f"Explain this HTML: {XSS}\n  keep   spaces")
        out["samples"].append({"prompt": prompt, "category": "generic" if p % 2 else None, "responses": {
            name: {"text": f"{name} answer {p}: first, plan the day.\n  - then <b>do</b> it & rest.",
                   "reward": out["stages"][name]["rewards"][p],
                   "verdict": None if name == "sft" else verdicts[(p + i) % 3]}
            for i, name in enumerate(("sft", *stages))}})
    return out


def minimal_eval() -> dict:
    """No judge, no curves, no forgetting, no task metrics: only lengths and samples."""
    return {"run": "bare", "settings": {"reference": "sft", "judge": None, "n_prompts": 2},
            "judge": None,
            "stages": {"sft": {"kind": "sft", "is_reference": True, "lengths": [10, 12], "mean_length": 11.0},
                       "dpo": {"kind": "dpo", "is_reference": False, "lengths": [12, 12], "mean_length": 12.0,
                               "rewards": None, "win_rate": None}},
            "samples": [{"prompt": "hi",
                         "responses": {"sft": {"text": "hello"}, "dpo": {"text": "hey", "verdict": None}}}],
            "curves": {}}


def _chromium(tmp_path: Path, page: Path, *args: str) -> subprocess.CompletedProcess:
    cmd = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
           "--disable-background-networking", "--disable-component-update", "--disable-sync",
           f"--user-data-dir={tmp_path / 'chromium-profile'}", *args, page.resolve().as_uri()]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=60, check=True)


def _plots(dom: str) -> dict[str, int]:
    """data-plot name -> the number of inline <svg> plots inside figure.plot elements of that name."""
    counts: dict[str, int] = {}
    for name, body in re.findall(r'<figure class="plot" data-plot="([^"]+)">(.*?)</figure>', dom, re.S):
        counts[name] = counts.get(name, 0) + body.count("<svg")
    return counts


def _section(dom: str, sid: str) -> str:
    m = re.search(rf'<section id="{sid}">(.*?)</section>', dom, re.S)
    assert m, f"section {sid} missing"
    return m.group(1)


@needs_chromium
def test_report_in_chromium(tmp_path):
    evals = [fake_eval(), fake_eval("beta-sweep", stages=("dpo",), seed=1)]
    page = render_html(evals, tmp_path / "report" / "index.html")
    assert page == tmp_path / "report" / "index.html"
    html = page.read_text()
    assert not re.search(r"(src|href)=\"?https?:", html) and "<script" not in html  # self-contained, no JS
    pngs = sorted(p.name for p in (tmp_path / "report" / "plots").glob("*.png"))
    assert pngs == ["curves-beta-sweep.png", "curves-quickstart.png", "lengths.png", "rewards.png", "win-rate.png"]

    dom = _chromium(tmp_path, page, "--dump-dom").stdout
    for sid in ("summary", "win-rate", "curves", "rewards", "lengths", "forgetting", "tasks", "samples"):
        _section(dom, sid)
    assert _plots(dom) == {"win-rate": 1, "curves": 2, "rewards": 1, "lengths": 1}
    summary = _section(dom, "summary")
    body = re.search(r"<tbody>(.*?)</tbody>", summary, re.S).group(1)
    assert body.count("<tr") == 5  # quickstart/{sft,dpo,ppo} + beta-sweep/{sft,dpo}
    assert body.count('class="ref"') == 2 and "quickstart/ppo" in body and "beta-sweep/dpo" in body
    assert re.search(r"6[0-9]\.\d%", body)  # win rates as percentages
    samples = _section(dom, "samples")
    for verdict in ("win", "tie", "loss"):
        assert f'class="badge {verdict}"' in samples
    assert samples.count('class="sample"') == 2 * 12  # the first 12 prompts of each run
    # The prompt's <script> is text, not an element: no script in the page at all.
    assert "<script" not in dom and "&lt;script&gt;alert(1)&lt;/script&gt;" in samples
    forgetting = _section(dom, "forgetting")
    assert "retention_nll" in forgetting and "+0.120" in forgetting and "task_per_family" not in forgetting

    shot = tmp_path / "shot.png"
    _chromium(tmp_path, page, f"--screenshot={shot}", "--window-size=1280,2400", "--hide-scrollbars")
    assert shot.exists() and shot.stat().st_size > 10_000
    import matplotlib.image
    img = matplotlib.image.imread(shot)
    assert img.shape[:2] == (2400, 1280)
    rgb = (img[..., :3].reshape(-1, 3) * 255).round().astype(int)
    assert len({tuple(c) for c in rgb[::37]}) > 50  # text, plots and colours, not a blank page
    shutil.copy(shot, "/tmp/report_shot.png")


def test_minimal_eval_renders(tmp_path):
    page = render_html([minimal_eval()], tmp_path / "report.html")
    html = page.read_text()
    for sid in ("summary", "win-rate", "curves", "rewards", "lengths", "samples"):
        assert f'id="{sid}"' in html
    assert 'id="forgetting"' not in html and 'id="tasks"' not in html
    assert "No stage has a win rate" in html and "No training curves" in html and "No rewards" in html
    assert _plots(html) == {"lengths": 1}
    assert [p.name for p in (tmp_path / "plots").iterdir()] == ["lengths.png"]
    assert "badge win" not in html


def test_bare_eval_without_optional_fields(tmp_path):
    html = render_html([{"run": "x", "stages": {"sft": {"is_reference": True}}}], tmp_path / "r.html").read_text()
    assert 'id="summary"' in html and "No samples recorded" in html and "No responses recorded" in html


def test_summary_table_columns():
    console = Console(record=True, width=250)
    console.print(summary_table([fake_eval()]))
    text = console.export_text()
    for col in ("stage", "win", "95% CI", "LC win", "reward", "length", "KL", "task", "implicit"):
        assert col in text
    rows = [line for line in text.splitlines() if re.match(r"\s*(sft|dpo|ppo)", line)]
    assert len(rows) == 3 and "(ref)" in rows[0]
    dpo = next(r for r in rows if "dpo" in r)
    assert re.search(r"\d+\.\d%\s+\d+–\d+", dpo) and "68.0%" in dpo
    narrow = Console(record=True, width=80)
    narrow.print(summary_table([fake_eval()]))
    assert "…" not in narrow.export_text()  # nothing cut off in an 80-column log

    console = Console(record=True, width=250)
    console.print(summary_table([fake_eval(), fake_eval("other", stages=("dpo",))]))
    text = console.export_text()
    assert "run/stage" in text and "other/dpo" in text and "quickstart/ppo" in text
