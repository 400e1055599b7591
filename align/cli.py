"""`align` command line: run, sweep, validate, data inspect, eval, report, chat, export, serve, collect.

User mistakes (recipes, data, model paths) are `AlignError`s and print as one message naming the
file, line/row and key/field; anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import warnings

from align.collect import commands as collect_commands
from align.data.formats import KINDS
from align.errors import AlignError
from align.rewards import cards

DEFAULT_INSPECT_MODEL = "builtin:smollm2-135m-instruct"


def _cmd_validate(args) -> int:
    from align.config import load_recipe
    from align.ui import console

    recipe = load_recipe(args.recipe, args.overrides)
    stages = " → ".join(f"{s.name} ({s.kind})" for s in recipe.stages)
    console.print(f"[green]ok[/] {args.recipe}: recipe '{recipe.name}', stages {stages}")
    return 0


def _cmd_run(args) -> int:
    from align import distributed
    from align.config import load_recipe
    from align.pipeline import run_recipe

    recipe = load_recipe(args.recipe, args.overrides)
    run_recipe(recipe, quiet=args.quiet)
    distributed.finish()
    return 0


def _cmd_sweep(args) -> int:
    from align.sweep.study import sweep_command

    sweep_command(args.space, args.recipe, args.overrides, args.trials, args.study, args.quiet)
    return 0


def _eval_settings(recipe_eval, args):
    """The run's recipe `eval` section with the command line's choices over it."""
    from dataclasses import replace

    from align.config import EvalConfig
    from align.settings import DataConfig

    given = {name: DataConfig(path=getattr(args, name)) for name in ("prompts", "tasks", "preferences", "verdicts")
             if getattr(args, name)}
    if "prompts" in given and "tasks" not in given:
        given["tasks"] = None  # the prompts asked for replace the recipe's tasks, rather than add to the work
    if args.max_prompts:
        field = "prompts" if given.get("prompts") or (recipe_eval and recipe_eval.prompts) else "tasks"
        section = given.get(field) or getattr(recipe_eval, field, None)
        if section:
            given[field] = replace(section, max_rows=args.max_prompts)
    for name in ("stages", "reference", "judge", "max_new_tokens", "batch_size", "temperature", "top_p", "seed",
                 "bootstrap"):
        if getattr(args, name) is not None:
            given[name] = getattr(args, name)
    if args.sample:
        given["do_sample"] = True
    if recipe_eval is None:
        if "prompts" not in given and "tasks" not in given:
            from align.errors import AlignError

            raise AlignError("the run's recipe has no eval section: "
                             "give the prompts to evaluate on with --prompts FILE")
        return EvalConfig(**given)
    return replace(recipe_eval, **given)


def _cmd_eval(args) -> int:
    from pathlib import Path

    from align.eval.evaluate import evaluate_run
    from align.eval.report import render_html, summary_table
    from align.runs import open_run
    from align.ui import console

    results = []
    for path in args.runs:
        run = open_run(path)
        out = Path(args.out) / run.name if args.out and len(args.runs) > 1 else Path(args.out) if args.out else None
        result = evaluate_run(run, _eval_settings(run.recipe.eval, args), out, quiet=args.quiet)
        console.print(summary_table([result]))
        console.print(f"report: {(out or run.dir / 'eval') / 'report.html'}")
        results.append(result)
    if len(results) > 1:
        page = render_html(results, Path(args.compare))
        print(f"comparison of {len(results)} runs: {page}")
    return 0


def _cmd_report(args) -> int:
    import json
    from pathlib import Path

    from align.errors import AlignError
    from align.eval.report import render_html, summary_table
    from align.ui import console

    evals = []
    for given in args.results:
        path = Path(given) / "eval" / "eval.json" if Path(given).is_dir() else Path(given)
        if not path.is_file():
            raise AlignError(f"{given}: no eval.json there; run `align eval {given}` first")
        evals.append(json.loads(path.read_text()))
    console.print(summary_table(evals))
    print(f"report: {render_html(evals, Path(args.out))}")
    return 0


def _cmd_chat(args) -> int:
    from align.chat import chat

    chat(args.stage, system=args.system, max_new_tokens=args.max_new_tokens, temperature=args.temperature,
         top_p=args.top_p, seed=args.seed)
    return 0


def _cmd_export(args) -> int:
    from align.export import export_stage

    export_stage(args.stage, args.merge or args.adapter_only, merge=bool(args.merge), format=args.format,
                 gguf_type=args.type, pre=args.pre)
    return 0


def _cmd_serve(args) -> int:
    from align.serve import serve

    serve(args.run, args.stages, args.host, args.port, args.max_tokens)
    return 0


def _cmd_data_inspect(args) -> int:
    from align.data.inspect import inspect_file

    if args.stage:
        return _inspect_stage(args)
    inspect_file(args.file, model=args.model or DEFAULT_INSPECT_MODEL, kind=args.kind, format=args.format,
                 skip_bad_rows=args.skip_bad_rows, row=args.row, max_length=args.max_length)
    return 0


def _inspect_stage(args) -> int:
    """A recipe stage's training data as the stage would load it: each source, and a mixture's composition."""
    from align.config import load_recipe
    from align.data.inspect import inspect_loaded
    from align.data.mixture import load_section
    from align.refs import parse_refs
    from align.stages.kind import kind_of

    recipe = load_recipe(args.file)
    stage = recipe.stage(args.stage)
    for source in stage.sources:
        if list(parse_refs(source.path)):
            raise AlignError(f"{args.file}: stage '{stage.name}' reads {source.path}, which a run makes; inspect it in "
                             "the run folder after `align run`")
    kind = kind_of(stage).data
    loaded = load_section(stage.data, kind, stage.train.seed)
    inspect_loaded(f"{args.file}: stage {stage.name}", kind, loaded, args.model or recipe.model.base, (), args.row,
                   args.max_length)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="align", description="Align language models: SFT, reward models, PPO, the "
                                     "DPO family and listwise ranking on QLoRA adapters; evaluate, chat, export; "
                                     "collect preferences.")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("run", help="run a recipe's stages (finished ones are skipped, interrupted ones resume)")
    p.add_argument("recipe")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="e.g. stages.dpo.loss.beta=0.05")
    p.add_argument("--quiet", action="store_true", help="log lines instead of progress bars")
    p.set_defaults(fn=_cmd_run)

    p = sub.add_parser("sweep", help="search recipe settings on Optuna: trials in runs/<study>/, the best recipe, a "
                                     "report; rerun to resume, or run several at once to share the trials")
    p.add_argument("recipe", nargs="?", help="the recipe to sweep; default: the sweep file's `recipe`")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="applied to the recipe before each trial's values")
    p.add_argument("--space", required=True, metavar="SWEEP.yaml", help="the search space, objective, pruning "
                   "(see recipes/sweep_quickstart_dpo.yaml)")
    p.add_argument("--trials", type=int, metavar="N", help="complete plus pruned trials across every process on the "
                   "study; default: the sweep file's `trials`")
    p.add_argument("--study", metavar="NAME", help="the study, and its folder under the recipe's output_dir; "
                   "default: the sweep file's name")
    p.add_argument("--quiet", action="store_true", help="log lines instead of progress bars")
    p.set_defaults(fn=_cmd_sweep)

    p = sub.add_parser("validate", help="check a recipe without running it")
    p.add_argument("recipe")
    p.add_argument("overrides", nargs="*", metavar="key=value")
    p.set_defaults(fn=_cmd_validate)

    p = sub.add_parser("eval", help="judge each stage's replies against a reference; "
                                    "writes RUN/eval/ with an HTML report")
    p.add_argument("runs", nargs="+", metavar="RUN", help="run folders (runs/<recipe>); "
                                                          "several are also compared on one page")
    p.add_argument("--stages", nargs="+", metavar="STAGE", help="stages to evaluate ('base' for the untrained model); "
                                                               "default: all finished")
    p.add_argument("--prompts", metavar="FILE", help="prompt set: .txt (a prompt per line), JSONL prompts, "
                                                     "MT-Bench/Vicuna-Bench questions, or preference data "
                                                     "(its prompts)")
    p.add_argument("--tasks", metavar="FILE", help="prompts with rules, for task accuracy")
    p.add_argument("--max-prompts", type=int, metavar="N", help="use the first N prompts")
    p.add_argument("--reference", metavar="STAGE", help="the stage to compare against; "
                                                        "default: the last sft stage, else base")
    p.add_argument("--judge", metavar="RM", help=f"an rm stage, a reward card ({', '.join(cards())}) or rule file, "
                                                 "or an rm stage folder")
    p.add_argument("--preferences", metavar="FILE", help="held-out preference pairs: "
                                                         "judge and implicit-reward accuracy")
    p.add_argument("--verdicts", metavar="FILE", help="human verdicts: preference rows over this eval's pairs.jsonl")
    p.add_argument("--max-new-tokens", type=int, metavar="N")
    p.add_argument("--batch-size", type=int, metavar="N")
    p.add_argument("--sample", action="store_true", help="sample replies instead of greedy decoding")
    p.add_argument("--temperature", type=float, metavar="T")
    p.add_argument("--top-p", type=float, metavar="P")
    p.add_argument("--seed", type=int)
    p.add_argument("--bootstrap", type=int, metavar="N", help="paired-bootstrap resamples for the 95%% interval of "
                   "each stage's task-accuracy change against the reference (default 2000)")
    p.add_argument("--out", metavar="DIR", help="output folder; default RUN/eval/")
    p.add_argument("--compare", default="runs/compare.html", metavar="HTML", help="the page comparing several runs")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(fn=_cmd_eval)

    p = sub.add_parser("report", help="one HTML page from existing evaluations (RUN folders or eval.json files)")
    p.add_argument("results", nargs="+", metavar="RUN_OR_EVAL_JSON")
    p.add_argument("--out", default="runs/report.html")
    p.set_defaults(fn=_cmd_report)

    p = sub.add_parser("chat", help="talk with a stage's model, replies streamed (/reset, /system TEXT, /exit)")
    p.add_argument("stage", metavar="RUN/STAGE", help="e.g. runs/quickstart/dpo ('base' for the untrained model)")
    p.add_argument("--system", help="system prompt")
    p.add_argument("--max-new-tokens", type=int, default=256)
    p.add_argument("--temperature", type=float, default=0.7, help="0 = greedy")
    p.add_argument("--top-p", type=float, default=0.9)
    p.add_argument("--seed", type=int, help="makes sampling repeatable")
    p.set_defaults(fn=_cmd_chat)

    p = sub.add_parser("export", help="a stage's model as a merged transformers folder, or its PEFT adapter")
    p.add_argument("stage", metavar="RUN/STAGE", help="e.g. runs/quickstart/dpo ('base' for the untrained model)")
    what = p.add_mutually_exclusive_group(required=True)
    what.add_argument("--merge", metavar="OUT", help="base (4-bit weights dequantized) + adapter merged: loads with "
                                                     "AutoModelForCausalLM alone")
    what.add_argument("--adapter-only", metavar="OUT", help="the PEFT adapter and tokenizer; load it onto the base "
                                                            "quantized as in training (nf4) to get the same outputs")
    p.add_argument("--format", choices=["transformers", "gguf"], default="transformers",
                   help="with --merge: a transformers folder, or a GGUF file (llama.cpp, Ollama) with a Modelfile")
    p.add_argument("--type", choices=["f16", "q8_0"], default="f16", help="the GGUF's weight type")
    p.add_argument("--pre", metavar="NAME", help="the GGUF's llama.cpp pre-tokenizer name, for a tokenizer align does "
                   "not know (it knows SmolLM2's)")
    p.set_defaults(fn=_cmd_export)

    p = sub.add_parser("serve", help="an OpenAI-compatible server (/v1/chat/completions, /v1/models) for a run's "
                                     "stages, each by its name as the model")
    p.add_argument("run", metavar="RUN[/STAGE]", help="a run folder (its finished policy stages), or one stage")
    p.add_argument("--stages", nargs="+", metavar="STAGE", help="the stages to serve ('base' for the untrained model)")
    p.add_argument("--host", default="127.0.0.1", help="the address to listen on (default: loopback only)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--max-tokens", type=int, default=512, help="the most new tokens a request may ask for")
    p.set_defaults(fn=_cmd_serve)

    collect_commands.add_parser(sub)

    data = sub.add_parser("data", help="look at data files").add_subparsers(dest="data_command", required=True)
    p = data.add_parser("inspect", help="format, rows, lengths, and one row through the chat template")
    p.add_argument("file", help="a data file, or a recipe with --stage")
    p.add_argument("--stage", metavar="NAME", help="FILE is a recipe: its stage's training data, a mixture's "
                   "composition included")
    p.add_argument("--model", help="whose tokenizer and chat template to use; default: the recipe's base with --stage, "
                   f"else {DEFAULT_INSPECT_MODEL}")
    p.add_argument("--kind", default="auto", choices=["auto", *KINDS])
    p.add_argument("--format", default="auto", help="override format detection")
    p.add_argument("--skip-bad-rows", action="store_true", help="skip malformed rows and list them")
    p.add_argument("--row", type=int, default=1, help="which row to render (1-based)")
    p.add_argument("--max-length", type=int, default=512, help="report rows longer than this many tokens")
    p.set_defaults(fn=_cmd_data_inspect)
    return parser


def main(argv: list[str] | None = None) -> int:
    # Nothing is fetched at run time unless the user opts in: a hub lookup without network hangs.
    if os.environ.get("ALIGN_ALLOW_HUB") != "1":
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    for noisy in ("transformers", "peft", "accelerate", "datasets", "bitsandbytes", "httpx"):
        logging.getLogger(noisy).setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=UserWarning, module="torch|transformers|peft|bitsandbytes")
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # our own progress bars say what is happening
    hf_logging.set_verbosity_error()
    args = build_parser().parse_args(argv)
    try:
        return args.fn(args)
    except AlignError as err:
        from rich.markup import escape

        from align.ui import console

        console.print("[bold red]error:[/] " + escape(str(err)), highlight=False, soft_wrap=True)
        return 2
    except KeyboardInterrupt:
        print("interrupted; run the same command again to resume", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
