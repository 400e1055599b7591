"""`align` command line: run, validate, data inspect.

User mistakes (recipes, data, model paths) are `AlignError`s and print as one message naming the
file, line/row and key/field; anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import warnings

from align.data.formats import KINDS
from align.errors import AlignError


def _cmd_validate(args) -> int:
    from align.config import load_recipe
    from align.ui import console

    recipe = load_recipe(args.recipe, args.overrides)
    stages = " → ".join(f"{s.name} ({s.kind})" for s in recipe.stages)
    console.print(f"[green]ok[/] {args.recipe}: recipe '{recipe.name}', stages {stages}")
    return 0


def _cmd_run(args) -> int:
    from align.config import load_recipe
    from align.pipeline import run_recipe

    recipe = load_recipe(args.recipe, args.overrides)
    run_recipe(recipe, quiet=args.quiet)
    return 0


def _cmd_data_inspect(args) -> int:
    from align.data.inspect import inspect_file

    inspect_file(args.file, model=args.model, kind=args.kind, format=args.format,
                 skip_bad_rows=args.skip_bad_rows, row=args.row, max_length=args.max_length)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="align", description="Align language models: SFT → DPO on QLoRA adapters.")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("run", help="run a recipe's stages (finished ones are skipped, interrupted ones resume)")
    p.add_argument("recipe")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="e.g. stages.dpo.loss.beta=0.05")
    p.add_argument("--quiet", action="store_true", help="log lines instead of progress bars")
    p.set_defaults(fn=_cmd_run)

    p = sub.add_parser("validate", help="check a recipe without running it")
    p.add_argument("recipe")
    p.add_argument("overrides", nargs="*", metavar="key=value")
    p.set_defaults(fn=_cmd_validate)

    data = sub.add_parser("data", help="look at data files").add_subparsers(dest="data_command", required=True)
    p = data.add_parser("inspect", help="format, rows, lengths, and one row through the chat template")
    p.add_argument("file")
    p.add_argument("--model", default="builtin:smollm2-135m-instruct", help="whose tokenizer and chat template to use")
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
