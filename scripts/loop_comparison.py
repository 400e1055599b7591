"""Active selection in the closed loop against random selection and against one offline DPO pass, at equal labels.

Three arms, each run as a recipe with `align run` (in a subprocess each, so an interrupted comparison resumes: its
finished stages are skipped, an interrupted one resumes from its checkpoint, a finished evaluation is read back):

- `uncertainty`: recipes/loop_quickstart.yaml as it is: three rounds, rounds 2 and 3 sending the pairs its ensemble
  disagrees on most;
- `random`: the same recipe with rounds 2 and 3 selecting at random (round 1 is random in both, and the same: its
  label stage and DPO stage are built once and reused by hash);
- `offline`: recipes/loop_quickstart_offline.yaml: the same prompts and label budget sampled once from the SFT policy,
  one DPO pass of the rounds' steps together.

Each arm runs with every `--seeds` (the recipe's seed: SFT, sampling, selection and DPO all follow it). All runs go to
one output folder (`--output`), so a seed's SFT stage trains once for its three arms. Held-out task accuracy is the
recipes' eval: greedy answers to 336 held-out prompts. Printed at the end: per arm and seed, the labels each round
spent and kept and the accuracy after each round, with each round's change (paired bootstrap over the prompts, 95%);
then the arms against each other after their last round, the prompts of both seeds paired. `--json` writes it all.

    .venv/bin/python scripts/loop_comparison.py                   # 2 seeds x 3 arms; about an hour and a half
    .venv/bin/python scripts/loop_comparison.py --seeds 0 --arms uncertainty random
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

from rich.console import Console
from rich.table import Table

from align.eval.metrics import paired_bootstrap

REPO = Path(__file__).resolve().parents[1]
ARMS = {
    "uncertainty": ("recipes/loop_quickstart.yaml", [], ["r1", "r2", "r3"]),
    "random": ("recipes/loop_quickstart.yaml", ["stages.r2_labels.select=random", "stages.r3_labels.select=random"],
               ["r1", "r2", "r3"]),
    "offline": ("recipes/loop_quickstart_offline.yaml", [], ["offline"]),
}


def run_arm(arm: str, seed: int, output: Path) -> Path:
    recipe, overrides, _ = ARMS[arm]
    name = f"loop_{arm}_s{seed}"
    cmd = [sys.executable, "-m", "align.cli", "run", str(REPO / recipe), f"name={name}", f"seed={seed}",
           f"output_dir={output}", *overrides, "--quiet"]
    subprocess.run(cmd, check=True, cwd=REPO)
    return output / name


def arm_result(run: Path, rounds: list[str], resamples: int) -> dict:
    evaluation = json.loads((run / "eval" / "eval.json").read_text())["stages"]
    correct = {name: evaluation[name]["task_correct"] for name in ["sft", *rounds]}
    out, spent, kept, before = [], 0, 0, "sft"
    for name in rounds:
        labels = json.loads((run / f"{name}_labels" / "stage.json").read_text())["metrics"]
        spent, kept = spent + labels["selected"], kept + labels["labels"]
        out.append({"round": name, "labels_spent": spent, "labels_kept": kept,
                    "accuracy": evaluation[name]["task_accuracy"],
                    "change": paired_bootstrap(correct[name], correct[before], resamples)})
        before = name
    return {"sft": evaluation["sft"]["task_accuracy"], "rounds": out, "correct": correct, "last": rounds[-1]}


def _interval(change: dict | None) -> str:
    if change is None:
        return "—"
    return f"{100 * change['value']:+.1f} [{100 * change['low']:+.1f}, {100 * change['high']:+.1f}]"


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    p.add_argument("--arms", nargs="+", choices=list(ARMS), default=list(ARMS))
    p.add_argument("--output", type=Path, default=REPO / "runs" / "loop_comparison")
    p.add_argument("--resamples", type=int, default=2000, help="paired-bootstrap resamples")
    p.add_argument("--json", type=Path, help="write the results here")
    args = p.parse_args(argv)
    console = Console()
    results, started = {}, time.time()
    for seed in args.seeds:
        for arm in args.arms:
            console.print(f"[bold]{arm}[/], seed {seed}")
            results[arm, seed] = arm_result(run_arm(arm, seed, args.output), ARMS[arm][2], args.resamples)

    table = Table(title="held-out task accuracy (336 prompts) after each round, and the round's change "
                        "(paired bootstrap, 95%)")
    for column in ("arm", "seed", "round", "labels spent", "labels kept", "accuracy", "change (points)"):
        table.add_column(column, justify="left" if column in ("arm", "round") else "right")
    for (arm, seed), result in results.items():
        table.add_row(arm, str(seed), "sft", "0", "0", f"{100 * result['sft']:.1f}%", "")
        for r in result["rounds"]:
            table.add_row(arm, str(seed), r["round"], str(r["labels_spent"]), str(r["labels_kept"]),
                          f"{100 * r['accuracy']:.1f}%", _interval(r["change"]))
    console.print(table)

    versus = Table(title="after the last round, arm against arm, the prompts of every seed paired (points, 95%)")
    versus.add_column("comparison")
    versus.add_column("difference", justify="right")
    comparisons = {}
    for i, first in enumerate(args.arms):
        for second in args.arms[i + 1:]:
            mine = [c for s in args.seeds for c in results[first, s]["correct"][results[first, s]["last"]]]
            theirs = [c for s in args.seeds for c in results[second, s]["correct"][results[second, s]["last"]]]
            comparisons[f"{first} - {second}"] = paired_bootstrap(mine, theirs, args.resamples)
            versus.add_row(f"{first} − {second}", _interval(comparisons[f"{first} - {second}"]))
    console.print(versus)
    console.print(f"{time.time() - started:.0f} s")
    if args.json:
        args.json.write_text(json.dumps({"results": {f"{a}/s{s}": {k: v for k, v in r.items() if k != "correct"}
                                                     for (a, s), r in results.items()},
                                         "comparisons": comparisons, "seconds": time.time() - started}, indent=2))


if __name__ == "__main__":
    main()
